//! The NIST SP 800-52r2 profile: TLS 1.2/1.3, AES-GCM suites with ECDHE, P-256/P-384.

use std::sync::{Arc, OnceLock};

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::{CipherSuite, NamedGroup, ProtocolVersion, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::PolicyError;

/// The IANA names of the cipher suites the NIST profile allows.
pub const NIST_CIPHER_SUITES: &[&str] = &[
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
];

/// The names of the key-exchange groups the NIST profile allows.
pub const NIST_GROUPS: &[&str] = &["secp256r1", "secp384r1"];

/// The protocol version names the NIST profile allows.
pub(crate) const NIST_VERSIONS: &[&str] = &["TLSv1.2", "TLSv1.3"];

const SUITES: &[CipherSuite] = &[
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
];

/// The aws-lc-rs provider reduced to the NIST profile (shared by inbound and outbound TLS).
///
/// Key exchange is P-256 and P-384 only: X25519 and the hybrid X25519MLKEM768 group are not
/// NIST-approved key agreements, so they are not offered.
pub fn nist_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = aws_lc_rs::default_provider();
            provider
                .cipher_suites
                .retain(|suite| SUITES.contains(&suite.suite()));
            provider.kx_groups = vec![
                aws_lc_rs::kx_group::SECP256R1,
                aws_lc_rs::kx_group::SECP384R1,
            ];
            Arc::new(provider)
        })
        .clone()
}

/// The protocol versions of the NIST profile.
pub(crate) static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS12, &rustls::version::TLS13];

/// A server configuration for the submission listeners with the NIST profile.
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, PolicyError> {
    if cert_chain.is_empty() {
        return Err(PolicyError::EmptyChain);
    }
    ServerConfig::builder_with_provider(nist_provider())
        .with_protocol_versions(VERSIONS)
        .map_err(PolicyError::Profile)?
        .with_no_client_auth()
        .with_single_cert(cert_chain, key)
        .map_err(PolicyError::ServerCertificate)
}

/// The audit name of a protocol version ("TLSv1.3").
pub(crate) fn version_name(version: ProtocolVersion) -> String {
    match version {
        ProtocolVersion::SSLv2 => "SSLv2".to_owned(),
        ProtocolVersion::SSLv3 => "SSLv3".to_owned(),
        ProtocolVersion::TLSv1_0 => "TLSv1.0".to_owned(),
        ProtocolVersion::TLSv1_1 => "TLSv1.1".to_owned(),
        ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
        ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
        other => format!("{other:?}"),
    }
}

/// The IANA name of a cipher suite.
pub(crate) fn suite_name(suite: CipherSuite) -> String {
    suite
        .as_str()
        .map_or_else(|| format!("{suite:?}"), str::to_owned)
}

/// The name of a key-exchange group.
pub(crate) fn group_name(group: NamedGroup) -> String {
    group
        .as_str()
        .map_or_else(|| format!("{group:?}"), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_holds_exactly_the_nist_suites_and_groups() {
        let provider = nist_provider();
        let mut suites: Vec<String> = provider
            .cipher_suites
            .iter()
            .map(|s| suite_name(s.suite()))
            .collect();
        suites.sort();
        let mut expected: Vec<String> = NIST_CIPHER_SUITES.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(suites, expected);
        let groups: Vec<String> = provider
            .kx_groups
            .iter()
            .map(|g| group_name(g.name()))
            .collect();
        assert_eq!(groups, NIST_GROUPS);
    }

    #[test]
    fn names_are_the_audit_spellings() {
        assert_eq!(version_name(ProtocolVersion::TLSv1_2), "TLSv1.2");
        assert_eq!(version_name(ProtocolVersion::TLSv1_3), "TLSv1.3");
        assert_eq!(
            suite_name(CipherSuite::TLS13_AES_256_GCM_SHA384),
            "TLS13_AES_256_GCM_SHA384"
        );
        assert_eq!(group_name(NamedGroup::secp384r1), "secp384r1");
    }

    #[test]
    fn server_config_refuses_an_empty_chain() {
        let key = PrivateKeyDer::Pkcs8(vec![0u8; 4].into());
        assert!(matches!(
            server_config(Vec::new(), key),
            Err(PolicyError::EmptyChain)
        ));
    }
}
