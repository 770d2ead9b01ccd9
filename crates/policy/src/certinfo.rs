//! Facts read from certificates: fingerprints, names, dates, key and signature strength.

use aws_lc_rs::digest;
use chrono::{DateTime, SecondsFormat};
use x509_parser::oid_registry::Oid;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::public_key::PublicKey;
use x509_parser::time::ASN1Time;

use crate::evidence::LeafFacts;
use crate::verdict::{PolicyViolation, Verdict};

/// The lowercase-hex SHA-256 fingerprint of a DER certificate.
pub(crate) fn sha256_hex(der: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, der))
}

/// What we read from the leaf, plus our own strength findings.
pub(crate) struct LeafReport {
    pub(crate) facts: LeafFacts,
    /// Set when the leaf key is outside the allowed set.
    pub(crate) weak_key: Option<PolicyViolation>,
    /// Set when the leaf signature algorithm is below SHA-256.
    pub(crate) weak_signature: Option<PolicyViolation>,
}

/// Signature algorithm OIDs whose hash is below SHA-256, with their names.
const WEAK_SIGNATURES: &[(&str, &str)] = &[
    ("1.2.840.113549.1.1.2", "md2WithRSAEncryption"),
    ("1.2.840.113549.1.1.3", "md4WithRSAEncryption"),
    ("1.2.840.113549.1.1.4", "md5WithRSAEncryption"),
    ("1.2.840.113549.1.1.5", "sha1WithRSAEncryption"),
    ("1.2.840.113549.1.1.14", "sha224WithRSAEncryption"),
    ("1.3.14.3.2.29", "sha1WithRSASignature"),
    ("1.2.840.10045.4.1", "ecdsa-with-SHA1"),
    ("1.2.840.10045.4.3.1", "ecdsa-with-SHA224"),
    ("1.2.840.10040.4.3", "dsa-with-sha1"),
    ("2.16.840.1.101.3.4.3.1", "dsa-with-sha224"),
];

const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";
const OID_ED25519: &str = "1.3.101.112";
const OID_ED448: &str = "1.3.101.113";

/// Reads the leaf certificate; `Err` carries the parser's message.
pub(crate) fn read_leaf(der: &[u8]) -> Result<LeafReport, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(e.to_string()),
    };
    let (key, key_ok) = describe_key(&cert);
    let signature_oid = cert.signature_algorithm.algorithm.to_id_string();
    let signature = oid_name(&cert.signature_algorithm.algorithm);
    let weak_signature = WEAK_SIGNATURES
        .iter()
        .any(|(oid, _)| *oid == signature_oid)
        .then(|| PolicyViolation {
            verdict: Verdict::WeakSignature,
            detail: format!("leaf certificate signed with {signature}, below SHA-256"),
        });
    let weak_key = (!key_ok).then(|| PolicyViolation {
        verdict: Verdict::WeakKey,
        detail: format!("leaf key {key} is not RSA >= 2048 bits or ECDSA P-256/P-384"),
    });
    let facts = LeafFacts {
        subject: cert.subject().to_string(),
        sans,
        issuer: cert.issuer().to_string(),
        not_before: rfc3339(cert.validity().not_before),
        not_after: rfc3339(cert.validity().not_after),
        key,
        signature,
        self_signed: cert.issuer().as_raw() == cert.subject().as_raw(),
    };
    Ok(LeafReport {
        facts,
        weak_key,
        weak_signature,
    })
}

fn oid_name(oid: &Oid<'_>) -> String {
    let dotted = oid.to_id_string();
    if let Some((_, name)) = WEAK_SIGNATURES.iter().find(|(weak, _)| *weak == dotted) {
        return (*name).to_owned();
    }
    x509_parser::objects::oid2sn(oid, x509_parser::objects::oid_registry())
        .map_or_else(|_| oid.to_id_string(), str::to_owned)
}

fn rfc3339(time: ASN1Time) -> String {
    DateTime::from_timestamp(time.timestamp(), 0).map_or_else(
        || time.to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}

/// Bits of an unsigned big-endian integer.
fn bit_length(bytes: &[u8]) -> usize {
    let trimmed: &[u8] = match bytes.iter().position(|b| *b != 0) {
        Some(start) => bytes.get(start..).unwrap_or_default(),
        None => return 0,
    };
    match trimmed.first() {
        Some(first) => trimmed.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

/// The key's audit name ("RSA-2048", "ECDSA-P256") and whether the profile allows it.
fn describe_key(cert: &X509Certificate<'_>) -> (String, bool) {
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => {
            let bits = bit_length(rsa.modulus);
            (format!("RSA-{bits}"), bits >= 2048)
        }
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            match curve.as_deref() {
                Some(OID_P256) => ("ECDSA-P256".to_owned(), true),
                Some(OID_P384) => ("ECDSA-P384".to_owned(), true),
                Some(OID_P521) => ("ECDSA-P521".to_owned(), false),
                Some(other) => (format!("ECDSA-{other}"), false),
                None => ("ECDSA-unknown-curve".to_owned(), false),
            }
        }
        _ if alg == OID_ED25519 => ("Ed25519".to_owned(), false),
        _ if alg == OID_ED448 => ("Ed448".to_owned(), false),
        Ok(PublicKey::DSA(_)) => ("DSA".to_owned(), false),
        _ => (format!("unknown-{alg}"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf_with(alg: &'static rcgen::SignatureAlgorithm) -> (Vec<u8>, LeafReport) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::new(vec![
            "mx.example.org".to_owned(),
            "alt.example.org".to_owned(),
        ])
        .unwrap();
        params.not_before = rcgen::date_time_ymd(2025, 1, 2);
        params.not_after = rcgen::date_time_ymd(2030, 3, 4);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let report = read_leaf(&der).unwrap();
        (der, report)
    }

    #[test]
    fn reads_names_dates_and_a_p256_key() {
        let (_, report) = leaf_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        let f = &report.facts;
        assert_eq!(f.sans, vec!["mx.example.org", "alt.example.org"]);
        assert_eq!(f.not_before, "2025-01-02T00:00:00Z");
        assert_eq!(f.not_after, "2030-03-04T00:00:00Z");
        assert_eq!(f.key, "ECDSA-P256");
        assert_eq!(f.signature, "ecdsa-with-SHA256");
        assert!(f.self_signed);
        assert!(report.weak_key.is_none());
        assert!(report.weak_signature.is_none());
    }

    #[test]
    fn rsa_2048_is_measured_exactly_and_ed25519_is_outside_the_profile() {
        let key =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .unwrap();
        let params = rcgen::CertificateParams::new(vec!["mx.example.org".to_owned()]).unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let report = read_leaf(&der).unwrap();
        assert_eq!(report.facts.key, "RSA-2048");
        assert!(report.weak_key.is_none());

        let (_, report) = leaf_with(&rcgen::PKCS_ED25519);
        assert_eq!(report.facts.key, "Ed25519");
        assert_eq!(report.weak_key.map(|v| v.verdict), Some(Verdict::WeakKey));
    }

    #[test]
    fn fingerprint_is_sha256_of_the_der() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x01]), 1);
        assert_eq!(bit_length(&[0x00]), 0);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(read_leaf(b"not a certificate").is_err());
    }
}
