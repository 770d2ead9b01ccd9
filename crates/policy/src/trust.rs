//! The trust anchors used to authenticate MX hosts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::{nist_provider, PolicyError};

/// Mozilla's roots (webpki-roots) plus the operator's extra anchors; cheap to clone.
#[derive(Clone)]
pub struct TrustStore {
    roots: Arc<RootCertStore>,
    webpki: Arc<WebPkiServerVerifier>,
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustStore")
            .field("anchors", &self.roots.len())
            .finish()
    }
}

impl TrustStore {
    /// Mozilla's roots plus every certificate in the given PEM files.
    pub fn new(extra_anchor_pems: &[PathBuf]) -> Result<TrustStore, PolicyError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for path in extra_anchor_pems {
            add_pem_file(&mut roots, path)?;
        }
        let roots = Arc::new(roots);
        let webpki =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), nist_provider()).build()?;
        Ok(TrustStore { roots, webpki })
    }

    /// How many trust anchors the store holds.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Whether the store holds no trust anchor (never true: Mozilla's roots are always there).
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The WebPKI verifier over these anchors with the NIST provider's algorithms.
    pub(crate) fn webpki(&self) -> Arc<WebPkiServerVerifier> {
        self.webpki.clone()
    }
}

fn add_pem_file(roots: &mut RootCertStore, path: &Path) -> Result<(), PolicyError> {
    let bytes = std::fs::read(path).map_err(|source| PolicyError::ReadAnchor {
        path: path.to_owned(),
        source,
    })?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|source| PolicyError::AnchorPem {
            path: path.to_owned(),
            source,
        })?;
        count += 1;
        roots.add(cert).map_err(|source| PolicyError::BadAnchor {
            path: path.to_owned(),
            index: count,
            source,
        })?;
    }
    if count == 0 {
        return Err(PolicyError::NoAnchorInFile {
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn mozilla_roots_plus_every_cert_of_each_file() {
        let base = TrustStore::new(&[]).unwrap().len();
        assert!(
            base > 100,
            "webpki-roots should hold Mozilla's roots, got {base}"
        );
        let dir = tempfile::tempdir().unwrap();
        let two = dir.path().join("two.pem");
        std::fs::write(&two, format!("{}{}", ca_pem(), ca_pem())).unwrap();
        let one = dir.path().join("one.pem");
        std::fs::write(&one, ca_pem()).unwrap();
        let store = TrustStore::new(&[two, one]).unwrap();
        assert_eq!(store.len(), base + 3);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = TrustStore::new(std::slice::from_ref(&missing)).unwrap_err();
        assert!(matches!(err, PolicyError::ReadAnchor { ref path, .. } if *path == missing));
        assert!(err.to_string().contains("missing.pem"));

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let err = TrustStore::new(std::slice::from_ref(&empty)).unwrap_err();
        assert!(matches!(err, PolicyError::NoAnchorInFile { ref path } if *path == empty));

        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let err = TrustStore::new(std::slice::from_ref(&broken)).unwrap_err();
        assert!(err.to_string().contains("broken.pem"), "{err}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = TrustStore::new(std::slice::from_ref(&garbage)).unwrap_err();
        assert!(
            matches!(err, PolicyError::BadAnchor { ref path, index: 1, .. } if *path == garbage),
            "{err:?}"
        );
    }
}
