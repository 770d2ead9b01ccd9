//! A certificate factory for tests: a root CA, an optional intermediate, and leaves with a chosen
//! key type, validity window and names, written as PEM files.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SignatureAlgorithm,
};
use std::path::{Path, PathBuf};

/// Key algorithm of a generated certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256 with SHA-256.
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384,
    /// RSA 2048 with PKCS#1 v1.5 SHA-256 signatures.
    Rsa2048,
}

impl KeyKind {
    fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    fn generate(self) -> KeyPair {
        KeyPair::generate_for(self.algorithm())
            .unwrap_or_else(|e| panic!("generating a {self:?} key: {e}"))
    }
}

/// Validity window of a generated certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid now (2020 to 2090).
    Current,
    /// Expired (2020 to 2021).
    Expired,
    /// Not valid yet (2090 to 2091).
    NotYetValid,
}

impl Validity {
    fn apply(self, params: &mut CertificateParams) {
        let (from, to) = match self {
            Validity::Current => (2020, 2090),
            Validity::Expired => (2020, 2021),
            Validity::NotYetValid => (2090, 2091),
        };
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
}

/// What leaf certificate to make.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Subject alternative names: DNS names, or IP addresses written as text.
    pub names: Vec<String>,
    /// Key algorithm.
    pub key: KeyKind,
    /// Validity window.
    pub validity: Validity,
    /// Sign with the intermediate CA (if the CA has one) instead of the root.
    pub via_intermediate: bool,
}

impl LeafSpec {
    /// A current ECDSA P-256 leaf for these names, signed by the root (or the intermediate if any).
    pub fn new<S: AsRef<str>>(names: &[S]) -> LeafSpec {
        LeafSpec {
            names: names.iter().map(|s| s.as_ref().to_string()).collect(),
            key: KeyKind::EcdsaP256,
            validity: Validity::Current,
            via_intermediate: true,
        }
    }

    /// The same spec with another key algorithm.
    pub fn key(mut self, key: KeyKind) -> LeafSpec {
        self.key = key;
        self
    }

    /// The same spec with another validity window.
    pub fn validity(mut self, validity: Validity) -> LeafSpec {
        self.validity = validity;
        self
    }
}

/// A written certificate: PEM files and facts a test asserts on.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM chain, leaf first (intermediate after it when there is one).
    pub chain_pem: PathBuf,
    /// PEM private key (PKCS#8).
    pub key_pem: PathBuf,
    /// DER of the leaf.
    pub leaf_der: Vec<u8>,
    /// SHA-256 of the leaf DER, lower-case hex.
    pub leaf_sha256: String,
    /// SHA-256 of each chain certificate DER (leaf first), lower-case hex.
    pub chain_sha256: Vec<String>,
}

/// A test certificate authority: root, optional intermediate, files in a directory.
pub struct TestCa {
    dir: PathBuf,
    root: Issuer<'static, KeyPair>,
    root_pem: String,
    root_der: Vec<u8>,
    root_path: PathBuf,
    intermediate: Option<(Issuer<'static, KeyPair>, String, Vec<u8>)>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("dir", &self.dir)
            .field("root", &self.root_path)
            .field("intermediate", &self.intermediate.is_some())
            .finish()
    }
}

/// SHA-256 of some bytes, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes))
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("CA params: {e}"));
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Sealpost tests");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Validity::Current.apply(&mut params);
    params
}

fn leaf_params(spec: &LeafSpec) -> CertificateParams {
    let mut params =
        CertificateParams::new(spec.names.clone()).unwrap_or_else(|e| panic!("leaf params: {e}"));
    let cn = spec.names.first().cloned().unwrap_or_else(|| "leaf".into());
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::NoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = match spec.key {
        KeyKind::Rsa2048 => vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ],
        _ => vec![KeyUsagePurpose::DigitalSignature],
    };
    params.use_authority_key_identifier_extension = true;
    spec.validity.apply(&mut params);
    params
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

impl TestCa {
    /// A root CA (ECDSA P-256) whose PEM is written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> TestCa {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let key = KeyKind::EcdsaP256.generate();
        let params = ca_params("Sealpost Test Root CA");
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("self-signing the root: {e}"));
        let root_pem = cert.pem();
        let root_path = dir.join("ca.pem");
        write(&root_path, &root_pem);
        TestCa {
            dir: dir.to_path_buf(),
            root: Issuer::new(params, key),
            root_pem,
            root_der: cert.der().to_vec(),
            root_path,
            intermediate: None,
        }
    }

    /// A root CA plus an intermediate CA that signs leaves by default.
    pub fn with_intermediate(dir: &Path) -> TestCa {
        let mut ca = TestCa::new(dir);
        let key = KeyKind::EcdsaP256.generate();
        let mut params = ca_params("Sealpost Test Intermediate CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &ca.root)
            .unwrap_or_else(|e| panic!("signing the intermediate: {e}"));
        ca.intermediate = Some((Issuer::new(params, key), cert.pem(), cert.der().to_vec()));
        ca
    }

    /// Path of the root certificate PEM (the trust anchor).
    pub fn root_pem_path(&self) -> &Path {
        &self.root_path
    }

    /// The root certificate PEM text.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// Issues a leaf and writes `dir/<stem>.pem` (chain) and `dir/<stem>.key`.
    pub fn issue(&self, stem: &str, spec: &LeafSpec) -> CertFiles {
        let key = spec.key.generate();
        let params = leaf_params(spec);
        let (cert, extra) = match (&self.intermediate, spec.via_intermediate) {
            (Some((issuer, pem, der)), true) => (
                params.signed_by(&key, issuer),
                Some((pem.clone(), der.clone())),
            ),
            _ => (params.signed_by(&key, &self.root), None),
        };
        let cert = cert.unwrap_or_else(|e| panic!("signing leaf {stem}: {e}"));
        let mut chain = cert.pem();
        let mut chain_sha256 = vec![sha256_hex(cert.der())];
        if let Some((pem, der)) = extra {
            chain.push_str(&pem);
            chain_sha256.push(sha256_hex(&der));
        }
        self.finish(stem, chain, &key, cert.der().to_vec(), chain_sha256)
    }

    /// Issues a leaf like [`TestCa::issue`], with file names chosen for it (`leaf-N`).
    pub fn leaf(&self, spec: &LeafSpec) -> CertFiles {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.issue(&format!("leaf-{n}"), spec)
    }

    /// Makes a self-signed leaf (not issued by this CA) and writes it like [`TestCa::issue`].
    pub fn self_signed(&self, stem: &str, spec: &LeafSpec) -> CertFiles {
        let key = spec.key.generate();
        let params = leaf_params(spec);
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("self-signing leaf {stem}: {e}"));
        let der = cert.der().to_vec();
        let sha = vec![sha256_hex(&der)];
        self.finish(stem, cert.pem(), &key, der, sha)
    }

    fn finish(
        &self,
        stem: &str,
        chain: String,
        key: &KeyPair,
        leaf_der: Vec<u8>,
        chain_sha256: Vec<String>,
    ) -> CertFiles {
        let chain_pem = self.dir.join(format!("{stem}.pem"));
        let key_pem = self.dir.join(format!("{stem}.key"));
        write(&chain_pem, &chain);
        write(&key_pem, &key.serialize_pem());
        CertFiles {
            chain_pem,
            key_pem,
            leaf_sha256: sha256_hex(&leaf_der),
            leaf_der,
            chain_sha256,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_chains_with_every_key_kind() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::with_intermediate(dir.path());
        for kind in [KeyKind::EcdsaP256, KeyKind::EcdsaP384, KeyKind::Rsa2048] {
            let files = ca.issue(
                &format!("{kind:?}"),
                &LeafSpec::new(&["mx.example"]).key(kind),
            );
            let pem = std::fs::read_to_string(&files.chain_pem).unwrap();
            assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
            assert_eq!(files.chain_sha256.len(), 2);
            assert_eq!(files.leaf_sha256, sha256_hex(&files.leaf_der));
            assert_eq!(files.leaf_sha256.len(), 64);
        }
        assert!(ca.root_pem().contains("BEGIN CERTIFICATE"));
        assert!(!ca.root_der().is_empty());
    }

    /// What rustls' WebPKI verifier says about a written chain for `name`.
    fn verify(ca: &TestCa, files: &CertFiles, name: &str) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.root_der().to_vec()))
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.chain_pem)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(chain[0].as_ref(), files.leaf_der.as_slice());
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn validity_names_and_self_signed_are_what_a_verifier_sees() {
        use rustls::{CertificateError, Error};
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::with_intermediate(dir.path());
        let good = ca.issue("good", &LeafSpec::new(&["mx.example", "127.0.0.1"]));
        verify(&ca, &good, "mx.example").unwrap();
        verify(&ca, &good, "127.0.0.1").unwrap();
        assert!(matches!(
            verify(&ca, &good, "other.example"),
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForNameContext { .. }
            ))
        ));
        let expired = ca.leaf(&LeafSpec::new(&["mx.example"]).validity(Validity::Expired));
        assert!(matches!(
            verify(&ca, &expired, "mx.example"),
            Err(Error::InvalidCertificate(
                CertificateError::ExpiredContext { .. }
            ))
        ));
        let early = ca.leaf(&LeafSpec::new(&["mx.example"]).validity(Validity::NotYetValid));
        assert!(matches!(
            verify(&ca, &early, "mx.example"),
            Err(Error::InvalidCertificate(
                CertificateError::NotValidYetContext { .. }
            ))
        ));
        let selfsigned = ca.self_signed("self", &LeafSpec::new(&["mx.example"]));
        assert_eq!(
            verify(&ca, &selfsigned, "mx.example"),
            Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
        );
        let rsa = ca.leaf(&LeafSpec::new(&["mx.example"]).key(KeyKind::Rsa2048));
        verify(&ca, &rsa, "mx.example").unwrap();
    }
}
