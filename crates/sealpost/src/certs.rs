//! The listeners' certificate: the configured files, or a self-signed one generated for development.

use anyhow::{Context, Result};
use sealpost_config::Config;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Returns (certificate, private key) paths, generating a self-signed pair if `[tls]` is absent.
pub fn listener_certificate(config: &Config) -> Result<(PathBuf, PathBuf)> {
    if let Some(tls) = &config.tls {
        return Ok((tls.certificate.clone(), tls.private_key.clone()));
    }
    let dir = config.server.state_dir.join("tls");
    let cert = dir.join("selfsigned-cert.pem");
    let key = dir.join("selfsigned-key.pem");
    if cert.exists() && key.exists() {
        tracing::warn!(
            certificate = %cert.display(),
            "NO [tls] SECTION: using the generated SELF-SIGNED listener certificate; clients cannot verify this relay. Configure [tls] for production."
        );
        return Ok((cert, key));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let names = vec![config.server.hostname.clone(), "localhost".to_string()];
    let ck = rcgen::generate_simple_self_signed(names)
        .context("generating a self-signed certificate")?;
    write_private(&key, ck.signing_key.serialize_pem().as_bytes())?;
    write_private(&cert, ck.cert.pem().as_bytes())?;
    tracing::warn!(
        certificate = %cert.display(),
        "NO [tls] SECTION: GENERATED A SELF-SIGNED listener certificate for development. Configure [tls] with a real certificate for production."
    );
    Ok((cert, key))
}

/// Writes a new file readable by the owner only, fsync'd.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
