//! Errors raised while building trust stores and TLS configurations.

use std::path::PathBuf;

/// A failure to set up the TLS policy machinery (never a verdict about a peer).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A trust anchor file could not be read.
    #[error("cannot read trust anchor file {path}: {source}")]
    ReadAnchor {
        /// The file named in the configuration.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A trust anchor file is not valid PEM.
    #[error("trust anchor file {path} is not valid PEM: {source}")]
    AnchorPem {
        /// The file named in the configuration.
        path: PathBuf,
        /// The PEM parser's error.
        source: rustls_pki_types::pem::Error,
    },
    /// A trust anchor file holds no certificate.
    #[error("trust anchor file {path} holds no CERTIFICATE block")]
    NoAnchorInFile {
        /// The file named in the configuration.
        path: PathBuf,
    },
    /// A certificate in a trust anchor file cannot be used as a trust anchor.
    #[error(
        "certificate #{index} in trust anchor file {path} is not a usable trust anchor: {source}"
    )]
    BadAnchor {
        /// The file named in the configuration.
        path: PathBuf,
        /// Position of the certificate in the file, starting at 1.
        index: usize,
        /// Why rustls refused it.
        source: rustls::Error,
    },
    /// The certificate verifier could not be built from the trust store.
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
    /// The MX host name is not a valid DNS name or IP address.
    #[error("invalid server name {name:?}")]
    InvalidServerName {
        /// The name that was given.
        name: String,
    },
    /// rustls refused the protocol versions of the NIST profile.
    #[error("rustls refused the NIST protocol profile: {0}")]
    Profile(rustls::Error),
    /// The server certificate chain is empty.
    #[error("the server certificate chain is empty")]
    EmptyChain,
    /// rustls refused the server certificate or key.
    #[error("rustls refused the server certificate or key: {0}")]
    ServerCertificate(rustls::Error),
}
