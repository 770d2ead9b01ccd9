//! The recording certificate verifier and the per-connection TLS connector.

use std::sync::{Arc, Mutex, MutexGuard};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::certinfo::{read_leaf, sha256_hex};
use crate::evidence::{LeafFacts, TlsFacts};
use crate::profile::VERSIONS;
use crate::verdict::{map_certificate_error, PolicyViolation};
use crate::{nist_provider, PolicyError, PolicySpec, TlsRequirement, TrustStore, Verdict};

/// What the verifier saw and decided on one connection.
#[derive(Debug, Default, Clone)]
pub(crate) struct Recording {
    chain_sha256: Vec<String>,
    leaf: Option<LeafFacts>,
    certificate_check: Option<(Verdict, Option<String>)>,
    pub(crate) rejection: Option<PolicyViolation>,
}

impl Recording {
    /// The certificate part of the TLS facts (handshake parameters left empty).
    pub(crate) fn facts(&self) -> TlsFacts {
        TlsFacts {
            version: None,
            cipher: None,
            group: None,
            chain_sha256: self.chain_sha256.clone(),
            leaf: self.leaf.clone(),
            certificate_check: self.certificate_check.as_ref().map(|(v, _)| *v),
            certificate_detail: self.certificate_check.as_ref().and_then(|(_, d)| d.clone()),
        }
    }
}

/// One connection's evidence slot, filled by its verifier during the handshake.
#[derive(Debug, Clone)]
pub struct Recorder {
    slot: Arc<Mutex<Recording>>,
    mx: String,
    server_name: ServerName<'static>,
    policy: String,
    requirement: TlsRequirement,
}

impl Recorder {
    /// The MX host name the certificate is verified against.
    pub fn mx(&self) -> &str {
        &self.mx
    }

    /// The server name to pass to `TlsConnector::connect` (sent as SNI).
    pub fn server_name(&self) -> ServerName<'static> {
        self.server_name.clone()
    }

    /// The name of the policy this connection applies.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// The requirement this connection enforces.
    pub fn requirement(&self) -> TlsRequirement {
        self.requirement
    }

    pub(crate) fn snapshot(&self) -> Recording {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Recording> {
        // A poisoned slot still holds the facts written before the panic; keep them.
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A `ServerCertVerifier` that records the chain, then applies the policy.
#[derive(Debug)]
struct RecordingVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
    spec: PolicySpec,
    recorder: Recorder,
}

impl RecordingVerifier {
    /// The full Verified-level check: WebPKI chain, dates and name, then leaf key and signature.
    fn certificate_check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        leaf: &Result<crate::certinfo::LeafReport, String>,
    ) -> Result<(), (PolicyViolation, rustls::Error)> {
        if let Err(err) = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            &self.recorder.server_name,
            &[],
            now,
        ) {
            let mut verdict = match &err {
                rustls::Error::InvalidCertificate(cert) => map_certificate_error(cert),
                _ => Verdict::HandshakeFailed,
            };
            // WebPKI calls a SHA-1 or small-key signature "unsupported"; name it precisely.
            if verdict == Verdict::WeakSignature {
                if let Ok(report) = leaf {
                    if let Some(weak) = report.weak_key.as_ref() {
                        verdict = weak.verdict;
                    }
                }
            }
            let violation = PolicyViolation {
                verdict,
                detail: err.to_string(),
            };
            return Err((violation, err));
        }
        let report = match leaf {
            Ok(report) => report,
            Err(parse_error) => {
                let violation = PolicyViolation {
                    verdict: Verdict::HandshakeFailed,
                    detail: format!("leaf certificate cannot be parsed: {parse_error}"),
                };
                return Err((violation.clone(), violation.into_rustls()));
            }
        };
        if let Some(weak) = report.weak_key.as_ref().or(report.weak_signature.as_ref()) {
            return Err((weak.clone(), weak.clone().into_rustls()));
        }
        Ok(())
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Always verify against the MX host this connector was made for, whatever name the
        // caller passed to `connect`.
        let leaf = read_leaf(end_entity.as_ref());
        let leaf_fp = sha256_hex(end_entity.as_ref());
        let check = self.certificate_check(end_entity, intermediates, now, &leaf);
        let mut slot = self.recorder.lock();
        slot.chain_sha256 = std::iter::once(leaf_fp.clone())
            .chain(intermediates.iter().map(|c| sha256_hex(c.as_ref())))
            .collect();
        slot.leaf = leaf.as_ref().ok().map(|report| report.facts.clone());
        slot.certificate_check = Some(match &check {
            Ok(()) => (Verdict::Verified, None),
            Err((violation, _)) => (violation.verdict, Some(violation.detail.clone())),
        });
        if let (TlsRequirement::Verified, Err((violation, err))) = (self.spec.requirement, check) {
            slot.rejection = Some(violation);
            return Err(err);
        }
        if !self.spec.pin_allows(Some(&leaf_fp)) {
            let violation = PolicyViolation {
                verdict: Verdict::FingerprintMismatch,
                detail: format!("leaf sha256 {leaf_fp} matches none of the policy's pins"),
            };
            slot.rejection = Some(violation.clone());
            return Err(violation.into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.webpki.root_hint_subjects()
    }
}

/// A TLS connector for one connection to `server_name` under `spec`, and its evidence slot.
///
/// The connector offers TLS 1.2/1.3 with the NIST profile only, disables resumption and
/// early data, and records what the server presented into the returned [`Recorder`].
pub fn connector(
    spec: &PolicySpec,
    trust: &TrustStore,
    server_name: &str,
) -> Result<(tokio_rustls::TlsConnector, Recorder), PolicyError> {
    let parsed = ServerName::try_from(server_name.to_owned()).map_err(|_| {
        PolicyError::InvalidServerName {
            name: server_name.to_owned(),
        }
    })?;
    let recorder = Recorder {
        slot: Arc::new(Mutex::new(Recording::default())),
        mx: server_name.to_owned(),
        server_name: parsed,
        policy: spec.name.clone(),
        requirement: spec.requirement,
    };
    let provider = nist_provider();
    let verifier = RecordingVerifier {
        webpki: trust.webpki(),
        provider: provider.clone(),
        spec: spec.clone(),
        recorder: recorder.clone(),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(PolicyError::Profile)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    config.enable_sni = true;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), recorder))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_an_invalid_server_name() {
        let trust = TrustStore::new(&[]).unwrap();
        let spec = PolicySpec::new("phi", TlsRequirement::Verified);
        let result = connector(&spec, &trust, "not a host name!");
        assert!(matches!(result, Err(PolicyError::InvalidServerName { .. })));
        let (_, recorder) = connector(&spec, &trust, "mx.example.org").unwrap();
        assert_eq!(recorder.mx(), "mx.example.org");
        assert!(recorder.snapshot().leaf.is_none());
    }
}
