//! The closed set of outcomes of a delivery attempt's TLS step, and how errors map to them.

use std::io;

use rustls::{AlertDescription, CertificateError, Error, PeerIncompatible, PeerMisbehaved};
use serde::Serialize;

/// The outcome of the TLS step of one connection, as recorded in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// TLS 1.2+, NIST suite and group, certificate authenticated for the MX host.
    Verified,
    /// TLS 1.2+ and NIST suite and group, certificate not authenticated (Encrypted policy only).
    EncryptedUnverified,
    /// The server did not advertise STARTTLS.
    StarttlsNotOffered,
    /// The server answered STARTTLS with an error.
    StarttlsRefused,
    /// The handshake failed for a reason not covered by a more precise verdict.
    HandshakeFailed,
    /// The server only speaks a protocol version below TLS 1.2.
    ProtocolVersion,
    /// No cipher suite or key-exchange group of the NIST profile is shared with the server.
    NoSharedCipher,
    /// The chain does not lead to a trust anchor (this includes self-signed certificates).
    UnknownIssuer,
    /// A certificate of the chain is past its notAfter date.
    Expired,
    /// A certificate of the chain is before its notBefore date.
    NotYetValid,
    /// The leaf certificate is not valid for the MX host name.
    NameMismatch,
    /// The leaf key is too weak or outside the allowed set (RSA < 2048, EC not P-256/P-384).
    WeakKey,
    /// A signature in the chain uses an algorithm below SHA-256 or outside the profile.
    WeakSignature,
    /// A certificate or handshake signature does not verify.
    BadSignature,
    /// The leaf does not match any of the policy's pinned fingerprints.
    FingerprintMismatch,
    /// The connection closed or reset during the attempt.
    ConnectionLost,
    /// The attempt took too long.
    Timeout,
}

impl Verdict {
    /// Whether this verdict lets mail be sent (given it matches the policy's requirement).
    pub fn is_accepting(self) -> bool {
        matches!(self, Verdict::Verified | Verdict::EncryptedUnverified)
    }

    /// The snake_case name used in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Verified => "verified",
            Verdict::EncryptedUnverified => "encrypted_unverified",
            Verdict::StarttlsNotOffered => "starttls_not_offered",
            Verdict::StarttlsRefused => "starttls_refused",
            Verdict::HandshakeFailed => "handshake_failed",
            Verdict::ProtocolVersion => "protocol_version",
            Verdict::NoSharedCipher => "no_shared_cipher",
            Verdict::UnknownIssuer => "unknown_issuer",
            Verdict::Expired => "expired",
            Verdict::NotYetValid => "not_yet_valid",
            Verdict::NameMismatch => "name_mismatch",
            Verdict::WeakKey => "weak_key",
            Verdict::WeakSignature => "weak_signature",
            Verdict::BadSignature => "bad_signature",
            Verdict::FingerprintMismatch => "fingerprint_mismatch",
            Verdict::ConnectionLost => "connection_lost",
            Verdict::Timeout => "timeout",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection decided by our own verifier, carried inside a rustls error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{verdict}: {detail}")]
pub(crate) struct PolicyViolation {
    pub(crate) verdict: Verdict,
    pub(crate) detail: String,
}

impl PolicyViolation {
    /// The rustls error that aborts the handshake with this violation inside.
    pub(crate) fn into_rustls(self) -> Error {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
            std::sync::Arc::new(self),
        )))
    }
}

/// The verdict for a certificate error reported by WebPKI or our verifier.
pub(crate) fn map_certificate_error(err: &CertificateError) -> Verdict {
    #[allow(deprecated)]
    match err {
        CertificateError::UnknownIssuer => Verdict::UnknownIssuer,
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => Verdict::Expired,
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            Verdict::NotYetValid
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            Verdict::NameMismatch
        }
        CertificateError::BadSignature => Verdict::BadSignature,
        CertificateError::UnsupportedSignatureAlgorithm
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            Verdict::WeakSignature
        }
        CertificateError::Other(other) => match other.0.downcast_ref::<PolicyViolation>() {
            Some(violation) => violation.verdict,
            None => Verdict::HandshakeFailed,
        },
        _ => Verdict::HandshakeFailed,
    }
}

/// The verdict for a rustls error that ended a handshake.
pub(crate) fn map_tls_error(err: &Error) -> Verdict {
    match err {
        Error::InvalidCertificate(cert) => map_certificate_error(cert),
        Error::AlertReceived(alert) => match alert {
            AlertDescription::ProtocolVersion => Verdict::ProtocolVersion,
            AlertDescription::HandshakeFailure | AlertDescription::InsufficientSecurity => {
                Verdict::NoSharedCipher
            }
            _ => Verdict::HandshakeFailed,
        },
        Error::PeerIncompatible(incompatible) => match incompatible {
            PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled => Verdict::ProtocolVersion,
            PeerIncompatible::NoCipherSuitesInCommon
            | PeerIncompatible::NoKxGroupsInCommon
            | PeerIncompatible::NoSignatureSchemesInCommon => Verdict::NoSharedCipher,
            _ => Verdict::HandshakeFailed,
        },
        Error::PeerMisbehaved(
            PeerMisbehaved::SelectedUnofferedCipherSuite | PeerMisbehaved::SelectedUnofferedKxGroup,
        ) => Verdict::NoSharedCipher,
        _ => Verdict::HandshakeFailed,
    }
}

/// The verdict and detail text for an I/O error returned by a tokio-rustls handshake.
pub(crate) fn map_io_error(err: &io::Error) -> Verdict {
    if let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        return map_tls_error(tls);
    }
    match err.kind() {
        io::ErrorKind::TimedOut => Verdict::Timeout,
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected => Verdict::ConnectionLost,
        _ => Verdict::HandshakeFailed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_snake_case_and_matches_as_str() {
        for v in [
            Verdict::Verified,
            Verdict::EncryptedUnverified,
            Verdict::StarttlsNotOffered,
            Verdict::NotYetValid,
            Verdict::FingerprintMismatch,
            Verdict::Timeout,
        ] {
            assert_eq!(
                serde_json::to_string(&v).unwrap(),
                format!("\"{}\"", v.as_str())
            );
        }
        assert_eq!(
            Verdict::EncryptedUnverified.as_str(),
            "encrypted_unverified"
        );
    }

    #[test]
    fn certificate_errors_map_precisely() {
        let cases = [
            (CertificateError::UnknownIssuer, Verdict::UnknownIssuer),
            (CertificateError::Expired, Verdict::Expired),
            (CertificateError::NotValidYet, Verdict::NotYetValid),
            (CertificateError::NotValidForName, Verdict::NameMismatch),
            (CertificateError::BadSignature, Verdict::BadSignature),
            (CertificateError::BadEncoding, Verdict::HandshakeFailed),
        ];
        for (err, verdict) in cases {
            assert_eq!(map_tls_error(&Error::InvalidCertificate(err)), verdict);
        }
        let ours = PolicyViolation {
            verdict: Verdict::WeakKey,
            detail: "RSA-1024".into(),
        };
        assert_eq!(map_tls_error(&ours.into_rustls()), Verdict::WeakKey);
    }

    #[test]
    fn alerts_and_incompatibilities_map_precisely() {
        assert_eq!(
            map_tls_error(&Error::AlertReceived(AlertDescription::ProtocolVersion)),
            Verdict::ProtocolVersion
        );
        assert_eq!(
            map_tls_error(&Error::AlertReceived(AlertDescription::HandshakeFailure)),
            Verdict::NoSharedCipher
        );
        assert_eq!(
            map_tls_error(&Error::PeerIncompatible(
                PeerIncompatible::ServerDoesNotSupportTls12Or13
            )),
            Verdict::ProtocolVersion
        );
        assert_eq!(
            map_tls_error(&Error::AlertReceived(AlertDescription::DecodeError)),
            Verdict::HandshakeFailed
        );
    }

    #[test]
    fn io_errors_map_to_connection_verdicts_or_the_inner_tls_error() {
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(map_io_error(&eof), Verdict::ConnectionLost);
        let timeout = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(map_io_error(&timeout), Verdict::Timeout);
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            Error::InvalidCertificate(CertificateError::Expired),
        );
        assert_eq!(map_io_error(&wrapped), Verdict::Expired);
    }
}
