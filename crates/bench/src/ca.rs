//! The bench CA: a root written to disk and leaves for the sink and the relays.

use crate::error::BenchError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

/// A root CA (ECDSA P-256) whose certificate is `dir/bench-ca.pem`.
pub struct BenchCa {
    dir: PathBuf,
    root: Issuer<'static, KeyPair>,
    root_path: PathBuf,
}

impl std::fmt::Debug for BenchCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchCa")
            .field("root", &self.root_path)
            .finish()
    }
}

/// A leaf certificate's files.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// PEM certificate chain (leaf only; the root is the trust anchor).
    pub chain_pem: PathBuf,
    /// PEM PKCS#8 private key.
    pub key_pem: PathBuf,
}

fn write(path: &Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|e| BenchError::io("writing", path, e))
}

fn validity(params: &mut CertificateParams) {
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2090, 1, 1);
}

impl BenchCa {
    /// Creates the root and writes its certificate into `dir` (created if missing).
    pub fn create(dir: &Path) -> Result<BenchCa, BenchError> {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io("creating", dir, e))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Sealpost Bench Root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let cert = params.self_signed(&key)?;
        let root_path = dir.join("bench-ca.pem");
        write(&root_path, &cert.pem())?;
        Ok(BenchCa {
            dir: dir.to_path_buf(),
            root: Issuer::new(params, key),
            root_path,
        })
    }

    /// Path of the root certificate (the trust anchor).
    pub fn root_pem(&self) -> &Path {
        &self.root_path
    }

    /// Issues an ECDSA P-256 server certificate for `names` as `dir/<stem>.pem` and `.key`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> Result<Leaf, BenchError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        let cn = names.first().cloned().unwrap_or_else(|| stem.to_string());
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::NoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let cert = params.signed_by(&key, &self.root)?;
        let leaf = Leaf {
            chain_pem: self.dir.join(format!("{stem}.pem")),
            key_pem: self.dir.join(format!("{stem}.key")),
        };
        write(&leaf.chain_pem, &cert.pem())?;
        write(&leaf.key_pem, &key.serialize_pem())?;
        Ok(leaf)
    }
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, BenchError> {
    let pem_err = |detail: String| BenchError::Pem {
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate".into()));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, BenchError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| BenchError::Pem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// A root store holding the certificates of a PEM file.
pub fn roots(path: &Path) -> Result<rustls::RootCertStore, BenchError> {
    let mut store = rustls::RootCertStore::empty();
    for c in load_certs(path)? {
        store.add(c)?;
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_verifies_against_root_for_its_name_only() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::{ServerName, UnixTime};
        let dir = tempfile::tempdir().unwrap();
        let ca = BenchCa::create(dir.path()).unwrap();
        let leaf = ca.issue("sink", &["mx.bench.test"]).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots(ca.root_pem()).unwrap().into(),
            provider,
        )
        .build()
        .unwrap();
        let chain = load_certs(&leaf.chain_pem).unwrap();
        let ok = ServerName::try_from("mx.bench.test").unwrap();
        let bad = ServerName::try_from("other.bench.test").unwrap();
        assert!(verifier
            .verify_server_cert(&chain[0], &[], &ok, &[], UnixTime::now())
            .is_ok());
        assert!(verifier
            .verify_server_cert(&chain[0], &[], &bad, &[], UnixTime::now())
            .is_err());
        load_key(&leaf.key_pem).unwrap();
    }
}
