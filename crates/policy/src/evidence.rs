//! What one connection showed: the facts the judge decides on and the audit log records.

use std::io;
use std::net::IpAddr;

use rustls::ClientConnection;
use serde::Serialize;

use crate::profile::{group_name, suite_name, version_name};
use crate::verdict::{map_io_error, map_tls_error};
use crate::{PolicySpec, Recorder, TlsRequirement, Verdict};

/// Everything known about one delivery attempt's TLS step (serialised into the audit log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// The MX host name the connection was made to (and verified against).
    pub mx: String,
    /// The IP address connected to, when known.
    pub ip: Option<IpAddr>,
    /// The name of the policy applied.
    pub policy: String,
    /// The requirement of that policy.
    pub requirement: TlsRequirement,
    /// Handshake and certificate facts; `None` when no TLS handshake was attempted.
    pub tls: Option<TlsFacts>,
    /// Whether the peer was authenticated (reason is `verified`).
    pub verified: bool,
    /// The verdict.
    pub reason: Verdict,
    /// The error text behind a failing verdict (rustls' or our verifier's).
    pub detail: Option<String>,
}

/// Facts of a TLS handshake, complete after success, partial after failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsFacts {
    /// The negotiated protocol version ("TLSv1.3"); `None` if the handshake did not finish.
    pub version: Option<String>,
    /// The negotiated cipher suite's IANA name ("TLS13_AES_256_GCM_SHA384").
    pub cipher: Option<String>,
    /// The negotiated key-exchange group ("secp256r1").
    pub group: Option<String>,
    /// SHA-256 fingerprints (lowercase hex) of the presented chain, leaf first.
    pub chain_sha256: Vec<String>,
    /// Facts read from the leaf certificate, if one was presented and parsed.
    pub leaf: Option<LeafFacts>,
    /// Outcome of the full Verified-level certificate check (chain, dates, name, key,
    /// signature), recorded whatever the requirement; `None` if no certificate was seen.
    pub certificate_check: Option<Verdict>,
    /// Error text behind a failing `certificate_check`.
    pub certificate_detail: Option<String>,
}

/// Facts read from the leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeafFacts {
    /// Subject distinguished name.
    pub subject: String,
    /// DNS names of the subjectAltName extension.
    pub sans: Vec<String>,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Start of validity (RFC 3339, UTC).
    pub not_before: String,
    /// End of validity (RFC 3339, UTC).
    pub not_after: String,
    /// Key algorithm and size ("RSA-2048", "ECDSA-P256").
    pub key: String,
    /// Signature algorithm of the certificate ("sha256WithRSAEncryption").
    pub signature: String,
    /// Whether issuer and subject names are identical.
    pub self_signed: bool,
}

impl Evidence {
    /// Evidence for a completed handshake, from the connection's recorder and rustls state.
    pub fn from_handshake(
        recorder: &Recorder,
        ip: Option<IpAddr>,
        conn: &ClientConnection,
    ) -> Evidence {
        let recording = recorder.snapshot();
        let mut tls = recording.facts();
        tls.version = conn.protocol_version().map(version_name);
        tls.cipher = conn
            .negotiated_cipher_suite()
            .map(|s| suite_name(s.suite()));
        tls.group = conn
            .negotiated_key_exchange_group()
            .map(|g| group_name(g.name()));
        let (reason, detail) = match (tls.certificate_check, recorder.requirement()) {
            (None, _) => (
                Verdict::HandshakeFailed,
                Some("the certificate verifier did not run".to_owned()),
            ),
            (Some(_), TlsRequirement::Encrypted) => (Verdict::EncryptedUnverified, None),
            (Some(Verdict::Verified), TlsRequirement::Verified) => (Verdict::Verified, None),
            (Some(check), TlsRequirement::Verified) => (check, tls.certificate_detail.clone()),
        };
        Evidence::assemble(recorder, ip, Some(tls), reason, detail)
    }

    /// Evidence for a handshake that failed with the I/O error tokio-rustls returned.
    pub fn from_handshake_error(
        recorder: &Recorder,
        ip: Option<IpAddr>,
        err: &io::Error,
    ) -> Evidence {
        let inner = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        match inner {
            Some(tls_err) => Evidence::from_tls_error(recorder, ip, tls_err),
            None => {
                let recording = recorder.snapshot();
                Evidence::assemble(
                    recorder,
                    ip,
                    Some(recording.facts()),
                    map_io_error(err),
                    Some(err.to_string()),
                )
            }
        }
    }

    /// Evidence for a handshake that failed with a rustls error.
    pub fn from_tls_error(
        recorder: &Recorder,
        ip: Option<IpAddr>,
        err: &rustls::Error,
    ) -> Evidence {
        let recording = recorder.snapshot();
        let mapped = map_tls_error(err);
        let (reason, detail) = match &recording.rejection {
            Some(violation)
                if violation.verdict == mapped || mapped == Verdict::HandshakeFailed =>
            {
                (violation.verdict, violation.detail.clone())
            }
            _ => (mapped, err.to_string()),
        };
        Evidence::assemble(recorder, ip, Some(recording.facts()), reason, Some(detail))
    }

    /// Evidence for an attempt that ended before any TLS handshake (no STARTTLS, refused,
    /// connection lost, timeout).
    pub fn without_tls(
        spec: &PolicySpec,
        mx: &str,
        ip: Option<IpAddr>,
        reason: Verdict,
        detail: Option<String>,
    ) -> Evidence {
        Evidence {
            mx: mx.to_owned(),
            ip,
            policy: spec.name.clone(),
            requirement: spec.requirement,
            tls: None,
            verified: reason == Verdict::Verified,
            reason,
            detail,
        }
    }

    fn assemble(
        recorder: &Recorder,
        ip: Option<IpAddr>,
        tls: Option<TlsFacts>,
        reason: Verdict,
        detail: Option<String>,
    ) -> Evidence {
        Evidence {
            mx: recorder.mx().to_owned(),
            ip,
            policy: recorder.policy().to_owned(),
            requirement: recorder.requirement(),
            tls,
            verified: reason == Verdict::Verified,
            reason,
            detail,
        }
    }

    /// The same evidence with a new verdict (used by the judge).
    pub(crate) fn with_verdict(mut self, reason: Verdict, detail: Option<String>) -> Evidence {
        self.verified = reason == Verdict::Verified;
        self.reason = reason;
        if detail.is_some() {
            self.detail = detail;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_tls_serialises_the_audit_shape() {
        let spec = PolicySpec::new("phi", TlsRequirement::Verified);
        let ev = Evidence::without_tls(
            &spec,
            "mx.example.org",
            Some("192.0.2.1".parse().unwrap()),
            Verdict::StarttlsNotOffered,
            None,
        );
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["mx"], "mx.example.org");
        assert_eq!(json["ip"], "192.0.2.1");
        assert_eq!(json["policy"], "phi");
        assert_eq!(json["requirement"], "verified");
        assert_eq!(json["tls"], serde_json::Value::Null);
        assert_eq!(json["verified"], false);
        assert_eq!(json["reason"], "starttls_not_offered");
    }
}
