//! Sealpost's TLS policy engine for outbound delivery.
//!
//! The delivery client builds one [`connector`] per connection, runs the STARTTLS handshake
//! with it, turns what happened into [`Evidence`] and asks [`judge`] for a decision. Only an
//! [`AcceptedPeer`] (which only [`judge`] can create) allows sending MAIL/RCPT/DATA; the
//! evidence is recorded in the audit log whatever the verdict.

mod certinfo;
mod error;
mod evidence;
mod judge;
mod profile;
mod spec;
mod trust;
mod verdict;
mod verifier;

pub use error::PolicyError;
pub use evidence::{Evidence, LeafFacts, TlsFacts};
pub use judge::{judge, AcceptedPeer, Rejected};
pub use profile::{nist_provider, server_config, NIST_CIPHER_SUITES, NIST_GROUPS};
pub use spec::{PolicySpec, TlsRequirement};
pub use trust::TrustStore;
pub use verdict::Verdict;
pub use verifier::{connector, Recorder};
