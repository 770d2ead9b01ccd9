//! Inbound SMTP submission: listeners (STARTTLS, implicit TLS, plain for allow-listed networks),
//! ESMTP sessions with AUTH, SES-compatible replies, header processing, and the hand-off to the
//! queue. A `250` is sent only after the queue's durable commit and the audit record returned.

mod auth;
mod limits;
mod listener;
mod message;
mod replies;
mod session;
mod stream;

pub use auth::{SenderPattern, UserEntry, Users};
pub use limits::{Connections, SendRates};
pub use listener::{bind, serve, Bound};
pub use message::{parse_tags, prepare, Prepared, Trace};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sealpost_audit::AuditLog;
use sealpost_config::Config;
use sealpost_queue::Queue;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// Errors setting up submission.
#[derive(Debug, thiserror::Error)]
pub enum SubmissionError {
    /// A listener address could not be bound.
    #[error("cannot listen on {address}")]
    Bind {
        /// The configured address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A certificate or key file could not be read or parsed.
    #[error("cannot load TLS {what} from {path}: {detail}")]
    Pem {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the certificate/key pair.
    #[error("TLS server configuration: {0}")]
    Tls(String),
}

/// Everything a session needs that a config reload replaces at once.
pub struct Runtime {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Users by name.
    pub users: Arc<Users>,
    /// The listeners' TLS acceptor (NIST profile).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Runtime {
    /// Builds a runtime from a configuration and the listener certificate files.
    pub fn new(
        config: Arc<Config>,
        certificate: &Path,
        private_key: &Path,
    ) -> Result<Runtime, SubmissionError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| SubmissionError::Pem {
                what: "certificate",
                path: certificate.to_path_buf(),
                detail: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(SubmissionError::Pem {
                what: "certificate",
                path: certificate.to_path_buf(),
                detail: "no CERTIFICATE block found".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(private_key).map_err(|e| SubmissionError::Pem {
            what: "private key",
            path: private_key.to_path_buf(),
            detail: e.to_string(),
        })?;
        let server = sealpost_policy::server_config(certs, key)
            .map_err(|e| SubmissionError::Tls(e.to_string()))?;
        let users = Arc::new(Users::from_config(&config));
        Ok(Runtime {
            config,
            users,
            tls: Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))),
        })
    }
}

/// State shared by all sessions for the life of the process.
pub struct Shared {
    /// The current runtime; replaced on reload, read at each connection.
    pub runtime: watch::Receiver<Arc<Runtime>>,
    /// The durable queue.
    pub queue: Queue,
    /// The audit log.
    pub audit: AuditLog,
    /// Open-session counters.
    pub connections: Arc<Connections>,
    /// Per-user send-rate buckets.
    pub rates: SendRates,
    /// Becomes true on shutdown: sessions finish their transaction, then say 421 and close.
    pub stopping: watch::Receiver<bool>,
    /// Password verifications allowed at once (argon2id is memory- and CPU-hungry).
    pub auth_slots: tokio::sync::Semaphore,
}

/// How many argon2id verifications may run at once: one per core, at least two.
pub fn auth_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}
