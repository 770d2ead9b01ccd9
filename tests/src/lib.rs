//! Test harness for black-box tests of the real `sealpost` binary: a certificate factory
//! ([`certs`]), a running relay in a temp dir ([`relay`]), and a raw SMTP client ([`client`]).

pub mod binary;
pub mod certs;
pub mod client;
pub mod dns;
pub mod postfix;
pub mod receiver;
pub mod relay;

pub use binary::{hash_password, run_sealpost, sealpost_bin};
pub use certs::{CertFiles, KeyKind, LeafSpec, TestCa, Validity};
pub use client::{message, queue_id_of, ClientError, Reply, SmtpClient};
pub use relay::{Relay, RelayConfig, TestUser, DEFAULT_PASSWORD, DEFAULT_USER, RELAY_HOSTNAME};
