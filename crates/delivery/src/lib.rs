//! Sealpost's outbound delivery: MX resolution, the verified-TLS SMTP client, connection reuse
//! and limits, the fallback decision, and the engine (queue manager) that ties them to the
//! queue and the audit log.
//!
//! PHI only leaves over a connection that [`sealpost_policy::judge`] accepted; there is no
//! plaintext or unverified path. Every MX tried is recorded as an `attempt` audit event with
//! its evidence.

pub mod client;
pub mod dns;
pub mod engine;
pub mod error;
pub mod fallback;
pub mod pool;
pub mod smarthost;

pub use client::{
    open, open_at, AuthError, ClientSettings, OpenError, RcptResult, Session, SessionError,
    TlsStart, Transaction, TxnRecipient,
};
pub use dns::{HostAddrs, MxAnswer, MxHost, MxResolver};
pub use engine::{resolve_policies, Engine, ResolvedPolicy, IDLE_TIMEOUT};
pub use error::DeliveryError;
pub use fallback::{decide, decide_from, step_name, FallbackAction};
pub use pool::{Permits, Pool, PoolKey};
pub use smarthost::{resolve_smarthosts, PasswordError, SmarthostTarget};
