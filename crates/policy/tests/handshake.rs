//! Real TLS handshakes against in-process rustls servers and `openssl s_server`, checking the
//! verdict and the recorded evidence for each kind of peer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup step should panic

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SignatureAlgorithm,
};
use rustls::crypto::aws_lc_rs as provider;
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sealpost_policy::{
    connector, judge, server_config, Evidence, PolicySpec, TlsRequirement, TrustStore, Verdict,
};
use tokio::net::{TcpListener, TcpStream};

const MX: &str = "mx.example.org";

type Ca = CertifiedIssuer<'static, KeyPair>;

fn aws_lc_rs_sha256(der: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .to_vec()
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(aws_lc_rs_sha256(der))
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn root_ca(cn: &str) -> Ca {
    CertifiedIssuer::self_signed(ca_params(cn), KeyPair::generate().unwrap()).unwrap()
}

fn leaf_params(names: &[&str]) -> CertificateParams {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params
}

fn rsa2048() -> KeyPair {
    KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// The test CA(s) written to a temp PEM and loaded as extra trust anchors.
fn trust_with(dir: &Path, cas: &[&Ca]) -> TrustStore {
    let path = dir.join("anchors.pem");
    let pem: String = cas.iter().map(|ca| ca.pem()).collect();
    std::fs::write(&path, pem).unwrap();
    TrustStore::new(&[path]).unwrap()
}

/// A rustls server config from the full aws-lc-rs provider, narrowed by the caller.
fn test_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    narrow: impl FnOnce(&mut rustls::crypto::CryptoProvider),
) -> ServerConfig {
    let mut provider = provider::default_provider();
    narrow(&mut provider);
    ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap()
}

/// Accepts one connection on a loopback port and runs the server side of the handshake.
async fn serve_once(config: ServerConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                use tokio::io::AsyncWriteExt;
                let _ = tls.write_all(b"220 ok\r\n").await;
                let _ = tls.shutdown().await;
            }
        }
    });
    addr
}

/// Runs the client side under `spec` and judges it, as the delivery client will.
async fn attempt(spec: &PolicySpec, trust: &TrustStore, addr: SocketAddr) -> Evidence {
    let (connector, recorder) = connector(spec, trust, MX).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let handshake = tokio::time::timeout(
        Duration::from_secs(20),
        connector.connect(recorder.server_name(), tcp),
    )
    .await
    .expect("handshake timed out");
    let evidence = match handshake {
        Ok(tls) => Evidence::from_handshake(&recorder, Some(addr.ip()), tls.get_ref().1),
        Err(err) => Evidence::from_handshake_error(&recorder, Some(addr.ip()), &err),
    };
    match judge(spec, evidence) {
        Ok(peer) => peer.into_evidence(),
        Err(rejected) => {
            assert_eq!(rejected.verdict, rejected.evidence.reason);
            *rejected.evidence
        }
    }
}

fn verified_spec() -> PolicySpec {
    PolicySpec::new("phi", TlsRequirement::Verified)
}

/// Runs a one-leaf server signed by `ca` (or self-signed when `ca` is None) with params
/// adjusted by `adjust`, and returns the evidence plus the leaf DER.
async fn one_leaf(
    spec: &PolicySpec,
    trusted: &Ca,
    signer: Option<&Ca>,
    names: &[&str],
    adjust: impl FnOnce(&mut CertificateParams),
) -> (Evidence, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let trust = trust_with(dir.path(), &[trusted]);
    let key = p256();
    let mut params = leaf_params(names);
    adjust(&mut params);
    let cert = match signer {
        Some(ca) => params.signed_by(&key, ca).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    let der = cert.der().to_vec();
    let config = server_config(vec![cert.der().clone()], key_der(&key)).unwrap();
    let addr = serve_once(config).await;
    (attempt(spec, &trust, addr).await, der)
}

#[tokio::test]
async fn rsa_chain_via_intermediate_over_tls12_is_verified() {
    let root = root_ca("Test Root");
    let intermediate = CertifiedIssuer::signed_by(
        ca_params("Test Intermediate"),
        KeyPair::generate().unwrap(),
        &root,
    )
    .unwrap();
    let key = rsa2048();
    let leaf = leaf_params(&[MX]).signed_by(&key, &intermediate).unwrap();
    let config = test_server(
        vec![leaf.der().clone(), intermediate.der().clone()],
        key_der(&key),
        &[&rustls::version::TLS12],
        |_| {},
    );
    let addr = serve_once(config).await;
    let dir = tempfile::tempdir().unwrap();
    let trust = trust_with(dir.path(), &[&root]);

    let ev = attempt(&verified_spec(), &trust, addr).await;
    assert_eq!(ev.reason, Verdict::Verified, "{ev:?}");
    assert!(ev.verified);
    let tls = ev.tls.as_ref().unwrap();
    assert_eq!(tls.version.as_deref(), Some("TLSv1.2"));
    let cipher = tls.cipher.as_deref().unwrap();
    assert!(
        cipher == "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"
            || cipher == "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "{cipher}"
    );
    assert_eq!(tls.group.as_deref(), Some("secp256r1"));
    assert_eq!(
        tls.chain_sha256,
        vec![sha256_hex(leaf.der()), sha256_hex(intermediate.der())]
    );
    let facts = tls.leaf.as_ref().unwrap();
    assert_eq!(facts.key, "RSA-2048");
    assert_eq!(facts.sans, vec![MX]);
    assert!(
        facts.issuer.contains("Test Intermediate"),
        "{}",
        facts.issuer
    );
    assert!(!facts.self_signed);
    assert_eq!(tls.certificate_check, Some(Verdict::Verified));
    assert_eq!(ev.ip, Some("127.0.0.1".parse().unwrap()));
}

#[tokio::test]
async fn ecdsa_p256_over_tls13_with_our_server_config_is_verified() {
    let root = root_ca("Test Root");
    let (ev, der) = one_leaf(&verified_spec(), &root, Some(&root), &[MX], |_| {}).await;
    assert_eq!(ev.reason, Verdict::Verified, "{ev:?}");
    let tls = ev.tls.as_ref().unwrap();
    assert_eq!(tls.version.as_deref(), Some("TLSv1.3"));
    assert!(
        sealpost_policy::NIST_CIPHER_SUITES.contains(&tls.cipher.as_deref().unwrap())
            && tls.cipher.as_deref().unwrap().starts_with("TLS13_AES_"),
        "{:?}",
        tls.cipher
    );
    assert_eq!(tls.group.as_deref(), Some("secp256r1"));
    assert_eq!(tls.chain_sha256, vec![sha256_hex(&der)]);
    assert_eq!(tls.leaf.as_ref().unwrap().key, "ECDSA-P256");

    let json = serde_json::to_value(&ev).unwrap();
    assert_eq!(json["reason"], "verified");
    assert_eq!(json["verified"], true);
    assert_eq!(json["tls"]["version"], "TLSv1.3");
    assert_eq!(json["tls"]["group"], "secp256r1");
    assert_eq!(json["tls"]["chain_sha256"][0], sha256_hex(&der));
}

#[tokio::test]
async fn self_signed_leaf_is_unknown_issuer_and_marked_self_signed() {
    let root = root_ca("Test Root");
    let (ev, der) = one_leaf(&verified_spec(), &root, None, &[MX], |_| {}).await;
    assert_eq!(ev.reason, Verdict::UnknownIssuer, "{ev:?}");
    assert!(!ev.verified);
    let tls = ev.tls.as_ref().unwrap();
    assert!(tls.leaf.as_ref().unwrap().self_signed);
    assert_eq!(tls.chain_sha256, vec![sha256_hex(&der)]);
    assert!(
        ev.detail.as_deref().unwrap().contains("UnknownIssuer"),
        "{:?}",
        ev.detail
    );
    assert_eq!(
        tls.version, None,
        "a failed handshake has no negotiated version"
    );
}

#[tokio::test]
async fn expired_leaf_is_expired() {
    let root = root_ca("Test Root");
    let (ev, _) = one_leaf(&verified_spec(), &root, Some(&root), &[MX], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    })
    .await;
    assert_eq!(ev.reason, Verdict::Expired, "{ev:?}");
    let leaf = ev.tls.as_ref().unwrap().leaf.clone().unwrap();
    assert_eq!(leaf.not_after, "2021-01-01T00:00:00Z");
}

#[tokio::test]
async fn future_leaf_is_not_yet_valid() {
    let root = root_ca("Test Root");
    let (ev, _) = one_leaf(&verified_spec(), &root, Some(&root), &[MX], |p| {
        p.not_before = rcgen::date_time_ymd(2090, 1, 1);
        p.not_after = rcgen::date_time_ymd(2091, 1, 1);
    })
    .await;
    assert_eq!(ev.reason, Verdict::NotYetValid, "{ev:?}");
}

#[tokio::test]
async fn leaf_for_another_name_is_name_mismatch() {
    let root = root_ca("Test Root");
    let (ev, _) = one_leaf(
        &verified_spec(),
        &root,
        Some(&root),
        &["other.example.net"],
        |_| {},
    )
    .await;
    assert_eq!(ev.reason, Verdict::NameMismatch, "{ev:?}");
    assert_eq!(
        ev.tls.as_ref().unwrap().leaf.as_ref().unwrap().sans,
        vec!["other.example.net"]
    );
}

#[tokio::test]
async fn leaf_from_an_untrusted_ca_is_unknown_issuer() {
    let trusted = root_ca("Trusted Root");
    let stranger = root_ca("Stranger Root");
    let (ev, _) = one_leaf(&verified_spec(), &trusted, Some(&stranger), &[MX], |_| {}).await;
    assert_eq!(ev.reason, Verdict::UnknownIssuer, "{ev:?}");
    assert!(!ev.tls.as_ref().unwrap().leaf.as_ref().unwrap().self_signed);
}

#[tokio::test]
async fn pins_must_match_the_leaf() {
    let root = root_ca("Test Root");
    let mut spec = verified_spec();
    spec.pins.push([0x5a; 32]);
    let (ev, _) = one_leaf(&spec, &root, Some(&root), &[MX], |_| {}).await;
    assert_eq!(ev.reason, Verdict::FingerprintMismatch, "{ev:?}");
    assert_eq!(
        ev.tls.as_ref().unwrap().certificate_check,
        Some(Verdict::Verified),
        "the chain itself was fine"
    );

    // Pin the actual leaf: build the cert first, then the server.
    let dir = tempfile::tempdir().unwrap();
    let trust = trust_with(dir.path(), &[&root]);
    let key = p256();
    let cert = leaf_params(&[MX]).signed_by(&key, &root).unwrap();
    let mut pin = [0u8; 32];
    pin.copy_from_slice(&aws_lc_rs_sha256(cert.der()));
    let mut spec = verified_spec();
    spec.pins = vec![[0x5a; 32], pin];
    let addr = serve_once(server_config(vec![cert.der().clone()], key_der(&key)).unwrap()).await;
    let ev = attempt(&spec, &trust, addr).await;
    assert_eq!(ev.reason, Verdict::Verified, "{ev:?}");
}

#[tokio::test]
async fn chacha_only_tls12_server_is_no_shared_cipher() {
    let root = root_ca("Test Root");
    let key = p256();
    let cert = leaf_params(&[MX]).signed_by(&key, &root).unwrap();
    let config = test_server(
        vec![cert.der().clone()],
        key_der(&key),
        &[&rustls::version::TLS12],
        |p| {
            p.cipher_suites.retain(|s| {
                s.suite() == rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            })
        },
    );
    let addr = serve_once(config).await;
    let dir = tempfile::tempdir().unwrap();
    let ev = attempt(&verified_spec(), &trust_with(dir.path(), &[&root]), addr).await;
    assert_eq!(ev.reason, Verdict::NoSharedCipher, "{ev:?}");
    assert!(
        ev.tls.as_ref().unwrap().chain_sha256.is_empty(),
        "no certificate was sent"
    );
}

#[tokio::test]
async fn x25519_only_server_is_no_shared_cipher() {
    let root = root_ca("Test Root");
    let key = p256();
    let cert = leaf_params(&[MX]).signed_by(&key, &root).unwrap();
    let config = test_server(
        vec![cert.der().clone()],
        key_der(&key),
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        |p| p.kx_groups = vec![provider::kx_group::X25519],
    );
    let addr = serve_once(config).await;
    let dir = tempfile::tempdir().unwrap();
    let ev = attempt(&verified_spec(), &trust_with(dir.path(), &[&root]), addr).await;
    assert_eq!(ev.reason, Verdict::NoSharedCipher, "{ev:?}");
}

#[tokio::test]
async fn encrypted_policy_accepts_self_signed_and_still_records_the_chain() {
    let root = root_ca("Test Root");
    let spec = PolicySpec::new("bulk", TlsRequirement::Encrypted);
    let (ev, der) = one_leaf(&spec, &root, None, &["whatever.example.net"], |_| {}).await;
    assert_eq!(ev.reason, Verdict::EncryptedUnverified, "{ev:?}");
    assert!(!ev.verified);
    let tls = ev.tls.as_ref().unwrap();
    assert_eq!(tls.chain_sha256, vec![sha256_hex(&der)]);
    assert_eq!(tls.certificate_check, Some(Verdict::UnknownIssuer));
    assert!(tls.leaf.as_ref().unwrap().self_signed);
    assert_eq!(tls.version.as_deref(), Some("TLSv1.3"));

    // The same evidence never passes a Verified policy.
    let rejected = judge(&verified_spec(), ev).unwrap_err();
    assert_eq!(rejected.verdict, Verdict::UnknownIssuer);
}

#[tokio::test]
async fn encrypted_policy_still_enforces_pins() {
    let root = root_ca("Test Root");
    let mut spec = PolicySpec::new("bulk", TlsRequirement::Encrypted);
    spec.pins.push([0x01; 32]);
    let (ev, _) = one_leaf(&spec, &root, None, &[MX], |_| {}).await;
    assert_eq!(ev.reason, Verdict::FingerprintMismatch, "{ev:?}");
}

// ---- peers only OpenSSL can play: TLS 1.0 and a 1024-bit RSA key ----

/// An `openssl s_server` child process, killed when dropped.
struct OpensslServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for OpensslServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("the openssl CLI is required for these tests");
    assert!(status.success(), "openssl {args:?} failed");
}

async fn openssl_server(cert: &Path, key: &Path, extra: &[&str]) -> OpensslServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new("openssl")
        .arg("s_server")
        .args(["-accept", &addr.to_string(), "-quiet"])
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the openssl CLI is required for these tests");
    let server = OpensslServer { child, addr };
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("openssl s_server did not start on {addr}");
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[tokio::test]
async fn tls10_only_server_is_protocol_version() {
    let root = root_ca("Test Root");
    let dir = tempfile::tempdir().unwrap();
    let key = rsa2048();
    let cert = leaf_params(&[MX]).signed_by(&key, &root).unwrap();
    let cert_path = write(dir.path(), "cert.pem", &cert.pem());
    let key_path = write(dir.path(), "key.pem", &key.serialize_pem());
    let server = openssl_server(
        &cert_path,
        &key_path,
        &["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"],
    )
    .await;
    let ev = attempt(
        &verified_spec(),
        &trust_with(dir.path(), &[&root]),
        server.addr,
    )
    .await;
    assert_eq!(ev.reason, Verdict::ProtocolVersion, "{ev:?}");
}

#[tokio::test]
async fn tls11_only_server_is_protocol_version() {
    let root = root_ca("Test Root");
    let dir = tempfile::tempdir().unwrap();
    let key = rsa2048();
    let cert = leaf_params(&[MX]).signed_by(&key, &root).unwrap();
    let cert_path = write(dir.path(), "cert.pem", &cert.pem());
    let key_path = write(dir.path(), "key.pem", &key.serialize_pem());
    let server = openssl_server(
        &cert_path,
        &key_path,
        &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
    )
    .await;
    let ev = attempt(
        &verified_spec(),
        &trust_with(dir.path(), &[&root]),
        server.addr,
    )
    .await;
    assert_eq!(ev.reason, Verdict::ProtocolVersion, "{ev:?}");
}

/// A public key given as raw PKCS#1 bytes (rcgen cannot load 1024-bit RSA private keys).
struct RawRsaPublicKey(Vec<u8>);

impl PublicKeyData for RawRsaPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

#[tokio::test]
async fn rsa_1024_leaf_is_weak_key() {
    let root = root_ca("Test Root");
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("weak.key");
    let pub_path = dir.path().join("weak.pub.der");
    openssl(&["genrsa", "-out", key_path.to_str().unwrap(), "1024"]);
    openssl(&[
        "rsa",
        "-in",
        key_path.to_str().unwrap(),
        "-pubout",
        "-outform",
        "DER",
        "-out",
        pub_path.to_str().unwrap(),
    ]);
    let spki = std::fs::read(&pub_path).unwrap();
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
    let public = RawRsaPublicKey(parsed.subject_public_key.data.to_vec());
    let cert = leaf_params(&[MX]).signed_by(&public, &root).unwrap();
    let cert_path = write(dir.path(), "weak.pem", &cert.pem());
    let server = openssl_server(&cert_path, &key_path, &["-cipher", "DEFAULT:@SECLEVEL=0"]).await;
    let ev = attempt(
        &verified_spec(),
        &trust_with(dir.path(), &[&root]),
        server.addr,
    )
    .await;
    assert_eq!(ev.reason, Verdict::WeakKey, "{ev:?}");
    let tls = ev.tls.as_ref().unwrap();
    assert_eq!(tls.leaf.as_ref().unwrap().key, "RSA-1024");
    assert_eq!(tls.chain_sha256, vec![sha256_hex(cert.der())]);
}

#[tokio::test]
async fn leaf_signed_with_sha1_is_weak_signature() {
    let root = root_ca("Test Root");
    let dir = tempfile::tempdir().unwrap();
    let ca_cert = write(dir.path(), "ca.pem", &root.pem());
    let ca_key = write(dir.path(), "ca.key", &root.key().serialize_pem());
    let key = p256();
    let csr = leaf_params(&[MX]).serialize_request(&key).unwrap();
    let csr_path = write(dir.path(), "leaf.csr", &csr.pem().unwrap());
    let leaf_path = dir.path().join("leaf.pem");
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr_path.to_str().unwrap(),
        "-CA",
        ca_cert.to_str().unwrap(),
        "-CAkey",
        ca_key.to_str().unwrap(),
        "-CAcreateserial",
        "-copy_extensions",
        "copy",
        "-days",
        "30",
        "-sha1",
        "-out",
        leaf_path.to_str().unwrap(),
    ]);
    let leaf_pem = std::fs::read(&leaf_path).unwrap();
    use rustls_pki_types::pem::PemObject;
    let leaf = CertificateDer::from_pem_slice(&leaf_pem).unwrap();
    let config = server_config(vec![leaf.clone()], key_der(&key)).unwrap();
    let addr = serve_once(config).await;
    let ev = attempt(&verified_spec(), &trust_with(dir.path(), &[&root]), addr).await;
    assert_eq!(ev.reason, Verdict::WeakSignature, "{ev:?}");
    let facts = ev.tls.as_ref().unwrap().leaf.clone().unwrap();
    assert_eq!(facts.signature, "ecdsa-with-SHA1");
    assert_eq!(facts.sans, vec![MX]);
}

#[tokio::test]
async fn leaf_signed_by_an_impostor_key_is_bad_signature() {
    let root = root_ca("Test Root");
    // Same issuer name as the trusted root, different key: the signature cannot verify.
    let impostor = rcgen::Issuer::new(ca_params("Test Root"), KeyPair::generate().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let key = p256();
    let cert = leaf_params(&[MX]).signed_by(&key, &impostor).unwrap();
    let addr = serve_once(server_config(vec![cert.der().clone()], key_der(&key)).unwrap()).await;
    let ev = attempt(&verified_spec(), &trust_with(dir.path(), &[&root]), addr).await;
    assert_eq!(ev.reason, Verdict::BadSignature, "{ev:?}");
}
