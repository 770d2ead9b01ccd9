//! Locating (and building once per test process) the real `sealpost` binary.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

/// Path of the `sealpost` binary: `$SEALPOST_BIN` if set, else `<target>/debug/sealpost`, built
/// once per test process with `cargo build -p sealpost --bin sealpost` (a no-op when fresh).
pub fn sealpost_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("SEALPOST_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(|ws| ws.join("Cargo.toml"))
            .unwrap_or_else(|| PathBuf::from("Cargo.toml"));
        let out = Command::new(&cargo)
            .args([
                "build",
                "-p",
                "sealpost",
                "--bin",
                "sealpost",
                "--manifest-path",
            ])
            .arg(&manifest)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running `{cargo} build -p sealpost`: {e}"));
        assert!(
            out.status.success(),
            "`cargo build -p sealpost --bin sealpost` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = target_profile_dir().join("sealpost");
        assert!(
            bin.exists(),
            "built sealpost but {} does not exist",
            bin.display()
        );
        bin
    })
}

/// `target/debug/` derived from the running test executable (`target/debug/deps/<exe>`).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let deps = exe
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent", exe.display()));
    let dir = if deps.ends_with("deps") {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    dir.to_path_buf()
}

/// Runs `sealpost ARGS…` to completion, with `stdin` fed to it, and returns its output.
pub fn run_sealpost(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut cmd = Command::new(sealpost_bin());
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning sealpost {args:?}: {e}"));
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin)
            .unwrap_or_else(|e| panic!("writing stdin of sealpost {args:?}: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for sealpost {args:?}: {e}"))
}

/// The argon2id PHC string `sealpost user hash-password` prints for `password` (cached).
pub fn hash_password(password: &str) -> String {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(h) = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(password)
    {
        return h.clone();
    }
    let out = run_sealpost(&["user", "hash-password"], &[], password.as_bytes());
    assert!(
        out.status.success(),
        "sealpost user hash-password failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        hash.starts_with("$argon2id$"),
        "hash-password printed {hash:?}, not an argon2id PHC string"
    );
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(password.to_string(), hash.clone());
    hash
}
