//! The benchmark's error type.

use std::path::PathBuf;

/// Everything that can stop a benchmark step.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or socket operation failed.
    #[error("{what} ({path}): {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or address involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A network operation failed.
    #[error("{what}: {source}")]
    Net {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Building a TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Generating a certificate failed.
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    /// A PEM file could not be read.
    #[error("PEM file {path}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The server's reply could not be read.
    #[error("reading an SMTP reply: {0}")]
    Reply(#[from] sealpost_smtp::ReplyError),
    /// The server answered a command with an unexpected code.
    #[error("{command} answered {code} {text}")]
    Unexpected {
        /// The command (verb only).
        command: &'static str,
        /// The reply code.
        code: u16,
        /// The reply text.
        text: String,
    },
    /// The sink received something that is not a message.
    #[error("receiving message data: {0}")]
    Data(#[from] sealpost_smtp::DataError),
    /// A size mix could not be parsed.
    #[error("size mix {text:?}: {detail}")]
    Mix {
        /// The text given.
        text: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A TLS server name is not valid.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// The queue refused an operation while prefilling.
    #[error("queue: {0}")]
    Queue(#[from] sealpost_queue::QueueError),
    /// The queue key could not be created or read.
    #[error("queue key: {0}")]
    Key(#[from] sealpost_queue::KeyError),
    /// A DNS message could not be built.
    #[error("DNS: {0}")]
    Dns(#[from] hickory_proto::ProtoError),
    /// Something did not happen in time.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
    },
    /// An external program (sealpost, postfix) failed.
    #[error("{program}: {detail}")]
    Program {
        /// The program.
        program: String,
        /// Its exit status and output.
        detail: String,
    },
    /// A `/proc` file did not have the expected shape.
    #[error("/proc/{pid}/{file}: unexpected format")]
    Proc {
        /// The process.
        pid: u32,
        /// The file.
        file: &'static str,
    },
    /// Writing JSON failed.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A benchmark option is out of range.
    #[error("option {option}: {detail}")]
    Option {
        /// The option.
        option: &'static str,
        /// What is wrong.
        detail: String,
    },
}

impl BenchError {
    /// An [`BenchError::Io`] for `path`.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BenchError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// A [`BenchError::Net`].
    pub fn net(what: &'static str, source: std::io::Error) -> Self {
        BenchError::Net { what, source }
    }
}
