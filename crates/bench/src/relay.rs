//! Running `sealpost serve` for the benchmark: its config file, the process, its start time.

use crate::error::BenchError;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Host name of the relay under test (its listener certificate carries it).
pub const RELAY_HOSTNAME: &str = "relay.bench.test";
/// The bench AUTH user.
pub const BENCH_USER: &str = "bench";

/// What the relay's config says.
#[derive(Debug, Clone)]
pub struct RelaySetup {
    /// The `sealpost` binary.
    pub bin: PathBuf,
    /// Directory for the config, state and log of this instance.
    pub dir: PathBuf,
    /// Listener certificate and key.
    pub cert: PathBuf,
    /// Listener key.
    pub key: PathBuf,
    /// The bench CA (delivery trust anchor).
    pub ca: PathBuf,
    /// The bench DNS server.
    pub dns: SocketAddr,
    /// The sink's port (`delivery.port`).
    pub sink_port: u16,
    /// argon2id hash of the bench password.
    pub password_hash: String,
    /// `delivery.paused`.
    pub paused: bool,
    /// `delivery.max_connections_per_domain` (Postfix's default destination concurrency is 20).
    pub per_domain: usize,
}

/// A running relay; killed on drop if not stopped.
#[derive(Debug)]
pub struct Relay {
    child: Option<Child>,
    /// The plain listener (loopback only).
    pub plain: SocketAddr,
    /// The STARTTLS listener.
    pub starttls: SocketAddr,
    /// Time from spawning the process to the first 220 greeting on the plain listener.
    pub start_time: Duration,
    log: PathBuf,
}

/// A loopback address whose port was free a moment ago.
pub fn free_addr() -> Result<SocketAddr, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| BenchError::net("binding :0", e))?;
    l.local_addr().map_err(|e| BenchError::net("local_addr", e))
}

/// Hashes a password with `sealpost user hash-password`.
pub fn hash_password(bin: &Path, password: &str) -> Result<String, BenchError> {
    let mut child = Command::new(bin)
        .args(["user", "hash-password"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::io("running", bin, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{password}\n").as_bytes())
            .map_err(|e| BenchError::io("writing to", bin, e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| BenchError::io("running", bin, e))?;
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !hash.starts_with("$argon2id$") {
        return Err(BenchError::Program {
            program: format!("{} user hash-password", bin.display()),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(hash)
}

/// The TOML config for an instance.
pub fn config_toml(s: &RelaySetup, plain: SocketAddr, starttls: SocketAddr) -> String {
    let d = s.dir.display();
    format!(
        r#"[server]
hostname = "{RELAY_HOSTNAME}"
state_dir = "{d}/state"

[[listeners]]
address = "{plain}"
mode = "plain"

[[listeners]]
address = "{starttls}"
mode = "starttls"

[tls]
certificate = "{cert}"
private_key = "{key}"

[submission]
max_connections = 5000
max_connections_per_ip = 5000

[[users]]
name = "{BENCH_USER}"
password_hash = "{hash}"
allowed_senders = ["*"]
policy = "phi"

[queue]
key_file = "{d}/queue.key"
max_message_size = "40MB"

[dns]
nameservers = ["{dns}"]

[delivery]
port = {port}
trust_anchors = ["{ca}"]
max_connections = 50
max_connections_per_domain = {per_domain}
paused = {paused}

[policies.phi]
tls = "verified"
on_failure = ["hold:4h", "bounce"]
"#,
        cert = s.cert.display(),
        key = s.key.display(),
        hash = s.password_hash,
        dns = s.dns,
        port = s.sink_port,
        ca = s.ca.display(),
        per_domain = s.per_domain,
        paused = s.paused,
    )
}

/// Creates the queue key of an instance (before a prefill or the first start).
pub fn ensure_key(dir: &Path) -> Result<PathBuf, BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io("creating", dir, e))?;
    let key = dir.join("queue.key");
    if !key.exists() {
        sealpost_queue::Keyring::generate(&key)?;
    }
    Ok(key)
}

fn greeted(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 3];
    let ok = s.read_exact(&mut buf).is_ok() && &buf == b"220";
    let _ = s.write_all(b"QUIT\r\n");
    ok
}

impl Relay {
    /// Writes the config, starts `sealpost serve` and waits (up to `timeout`) for a greeting.
    pub fn start(s: &RelaySetup, timeout: Duration) -> Result<Relay, BenchError> {
        ensure_key(&s.dir)?;
        let (plain, starttls) = (free_addr()?, free_addr()?);
        let cfg = s.dir.join("sealpost.toml");
        std::fs::write(&cfg, config_toml(s, plain, starttls))
            .map_err(|e| BenchError::io("writing", &cfg, e))?;
        let log = s.dir.join("sealpost.log");
        let logf = std::fs::File::create(&log).map_err(|e| BenchError::io("creating", &log, e))?;
        let t0 = Instant::now();
        let child = Command::new(&s.bin)
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(|e| BenchError::io("starting", &s.bin, e))?;
        let mut relay = Relay {
            child: Some(child),
            plain,
            starttls,
            start_time: Duration::ZERO,
            log,
        };
        loop {
            if greeted(plain) {
                relay.start_time = t0.elapsed();
                return Ok(relay);
            }
            if let Some(c) = relay.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(BenchError::Program {
                        program: "sealpost serve".into(),
                        detail: format!("exited with {status}:\n{}", relay.log()),
                    });
                }
            }
            if t0.elapsed() > timeout {
                return Err(BenchError::Timeout {
                    what: format!("sealpost to greet on {plain}:\n{}", relay.log()),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The server's stderr log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits up to 40 s (SIGKILL after that).
    pub fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(40) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
