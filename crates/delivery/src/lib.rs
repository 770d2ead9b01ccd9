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

pub use client::{
    open, ClientSettings, OpenError, RcptResult, Session, SessionError, Transaction, TxnRecipient,
};
pub use dns::{HostAddrs, MxAnswer, MxHost, MxResolver};
pub use engine::{resolve_policies, Engine, ResolvedPolicy, IDLE_TIMEOUT};
pub use error::DeliveryError;
pub use fallback::{decide, step_name, FallbackAction};
pub use pool::{Permits, Pool, PoolKey};
