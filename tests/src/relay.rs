//! A running `sealpost serve` in a temporary state directory, on free loopback ports.

use crate::binary::{hash_password, run_sealpost, sealpost_bin};
use crate::certs::{CertFiles, LeafSpec, TestCa};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Host name the test relay announces and its certificate carries.
pub const RELAY_HOSTNAME: &str = "relay.test";

/// How long a relay may take to start accepting on every listener.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One SMTP credential of a test relay.
#[derive(Debug, Clone)]
pub struct TestUser {
    /// AUTH user name.
    pub name: String,
    /// Clear-text password (hashed with `sealpost user hash-password` for the config).
    pub password: String,
    /// `allowed_senders` patterns; empty allows any.
    pub allowed_senders: Vec<String>,
    /// Default policy name.
    pub policy: Option<String>,
    /// `max_send_rate` in recipients per second.
    pub max_send_rate: Option<f64>,
}

impl TestUser {
    /// A user allowed to send as `*@clinic.example`, with the `phi` policy.
    pub fn new(name: &str, password: &str) -> TestUser {
        TestUser {
            name: name.into(),
            password: password.into(),
            allowed_senders: vec!["*@clinic.example".into()],
            policy: Some("phi".into()),
            max_send_rate: None,
        }
    }
}

/// What relay to start. `Default` gives STARTTLS and implicit listeners, one user
/// ([`DEFAULT_USER`]/[`DEFAULT_PASSWORD`]) and two policies, `phi` and `bulk`.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Add a `plain` listener with this allow list (`None`: no plain listener).
    pub plain_allow: Option<Vec<String>>,
    /// The `[[users]]`.
    pub users: Vec<TestUser>,
    /// Extra `[submission]` keys as (key, TOML value) pairs, e.g. `("command_timeout", "\"1s\"")`.
    pub submission: Vec<(String, String)>,
    /// Extra `[queue]` keys as (key, TOML value) pairs.
    pub queue: Vec<(String, String)>,
    /// Extra TOML appended to the file.
    pub extra_toml: String,
    /// Extra environment variables for the server process.
    pub env: Vec<(String, String)>,
    /// `RUST_LOG` for the server.
    pub rust_log: String,
}

/// User name of the default test user.
pub const DEFAULT_USER: &str = "app";
/// Password of the default test user.
pub const DEFAULT_PASSWORD: &str = "app-secret-password-1";

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            plain_allow: None,
            users: vec![TestUser::new(DEFAULT_USER, DEFAULT_PASSWORD)],
            submission: Vec::new(),
            queue: Vec::new(),
            extra_toml: String::new(),
            env: Vec::new(),
            rust_log: "info".into(),
        }
    }
}

impl RelayConfig {
    /// Sets one `[submission]` key to a TOML value.
    pub fn submission(mut self, key: &str, toml_value: &str) -> Self {
        self.submission.push((key.into(), toml_value.into()));
        self
    }

    /// Sets one `[queue]` key to a TOML value.
    pub fn queue(mut self, key: &str, toml_value: &str) -> Self {
        self.queue.push((key.into(), toml_value.into()));
        self
    }
}

/// Ports handed out in this process, so parallel tests never pick the same one.
fn used_ports() -> &'static Mutex<HashSet<u16>> {
    static USED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    USED.get_or_init(Default::default)
}

/// A loopback address with a port that was free a moment ago and not handed out before.
pub fn free_port() -> SocketAddr {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("binding :0: {e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"));
        if used_ports()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.port())
        {
            return addr;
        }
    }
}

fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_list(items: &[String]) -> String {
    let v: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", v.join(", "))
}

/// A running relay; killed (SIGKILL) on drop.
pub struct Relay {
    dir: tempfile::TempDir,
    /// The test CA whose root the clients trust.
    pub ca: TestCa,
    /// The listener certificate.
    pub cert: CertFiles,
    /// The STARTTLS listener.
    pub starttls: SocketAddr,
    /// The implicit TLS listener.
    pub implicit: SocketAddr,
    /// The plain listener, if configured.
    pub plain: Option<SocketAddr>,
    cfg: RelayConfig,
    child: Option<Child>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("dir", &self.dir.path())
            .field("starttls", &self.starttls)
            .field("implicit", &self.implicit)
            .field("plain", &self.plain)
            .finish()
    }
}

impl Relay {
    /// Writes the config, starts `sealpost serve` and waits until every listener accepts.
    pub fn start(cfg: RelayConfig) -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("sealpost-relay-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temp dir: {e}"));
        let ca = TestCa::new(&dir.path().join("tls"));
        let cert = ca.issue(
            "listener",
            &LeafSpec::new(&[RELAY_HOSTNAME, "localhost", "127.0.0.1"]),
        );
        let mut relay = Relay {
            dir,
            ca,
            cert,
            starttls: free_port(),
            implicit: free_port(),
            plain: None,
            cfg,
            child: None,
        };
        relay.plain = relay.cfg.plain_allow.as_ref().map(|_| free_port());
        // Ports were free when picked; another process may take one before the server binds it.
        for attempt in 0..5 {
            relay.write_config();
            match relay.spawn_and_wait() {
                Ok(()) => return relay,
                Err(log) if attempt < 4 && log.contains("Address already in use") => {
                    relay.starttls = free_port();
                    relay.implicit = free_port();
                    relay.plain = relay.cfg.plain_allow.as_ref().map(|_| free_port());
                }
                Err(log) => panic!("sealpost serve did not start:\n{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// The temporary directory holding config, state and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file path.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sealpost.toml")
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The root CA PEM text clients should trust.
    pub fn ca_pem(&self) -> &str {
        self.ca.root_pem()
    }

    /// The configuration this relay was started with.
    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    fn write_config(&self) {
        let mut t = String::new();
        let state = self.state_dir();
        let _ = writeln!(
            t,
            "[server]\nhostname = {}\nstate_dir = {}\n",
            toml_str(RELAY_HOSTNAME),
            toml_str(&state.to_string_lossy())
        );
        let _ = writeln!(
            t,
            "[[listeners]]\naddress = \"{}\"\nmode = \"starttls\"\n\n[[listeners]]\naddress = \"{}\"\nmode = \"implicit\"\n",
            self.starttls, self.implicit
        );
        if let (Some(addr), Some(allow)) = (self.plain, &self.cfg.plain_allow) {
            let _ = writeln!(
                t,
                "[[listeners]]\naddress = \"{addr}\"\nmode = \"plain\"\nallow = {}\n",
                toml_list(allow)
            );
        }
        let _ = writeln!(
            t,
            "[tls]\ncertificate = {}\nprivate_key = {}\n",
            toml_str(&self.cert.chain_pem.to_string_lossy()),
            toml_str(&self.cert.key_pem.to_string_lossy())
        );
        if !self.cfg.submission.is_empty() {
            t.push_str("[submission]\n");
            for (k, v) in &self.cfg.submission {
                let _ = writeln!(t, "{k} = {v}");
            }
            t.push('\n');
        }
        for u in &self.cfg.users {
            let _ = writeln!(
                t,
                "[[users]]\nname = {}\npassword_hash = {}\nallowed_senders = {}",
                toml_str(&u.name),
                toml_str(&hash_password(&u.password)),
                toml_list(&u.allowed_senders)
            );
            if let Some(p) = &u.policy {
                let _ = writeln!(t, "policy = {}", toml_str(p));
            }
            if let Some(r) = u.max_send_rate {
                let _ = writeln!(t, "max_send_rate = {r:?}");
            }
            t.push('\n');
        }
        t.push_str("[queue]\n");
        for (k, v) in &self.cfg.queue {
            let _ = writeln!(t, "{k} = {v}");
        }
        // Keep accepted mail in the queue: no resolver answers and no MX listens.
        t.push_str("\n[dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout = \"1s\"\n\n[delivery]\nport = 9\n\n");
        t.push_str(
            "[policies.phi]\ntls = \"verified\"\non_failure = [\"hold:4h\", \"bounce\"]\n\n\
             [policies.bulk]\ntls = \"encrypted\"\non_failure = [\"hold:1h\", \"bounce\"]\n\n",
        );
        t.push_str(&self.cfg.extra_toml);
        let path = self.config_path();
        std::fs::write(&path, t).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    fn log_file(&self, name: &str) -> File {
        let path = self.dir.path().join(name);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    }

    fn listeners(&self) -> Vec<SocketAddr> {
        let mut v = vec![self.starttls, self.implicit];
        v.extend(self.plain);
        v
    }

    /// Spawns the server; waits for the admin socket and every listener. Err holds the log tail.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(sealpost_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", &self.cfg.rust_log)
            .stdin(Stdio::null())
            .stdout(self.log_file("stdout.log"))
            .stderr(self.log_file("stderr.log"));
        for (k, v) in &self.cfg.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", sealpost_bin().display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        let admin = self.state_dir().join("admin.sock");
        let mut pending = self.listeners();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("exited with {status}:\n{}", self.log_tail(40)));
                }
            }
            pending.retain(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_err());
            if pending.is_empty() && admin.exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill_now();
                return Err(format!(
                    "not accepting on {pending:?} (admin socket present: {}) after {START_TIMEOUT:?}:\n{}",
                    admin.exists(),
                    self.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Everything the server wrote to stdout and stderr (all runs).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for name in ["stdout.log", "stderr.log"] {
            if let Ok(t) = std::fs::read_to_string(self.dir.path().join(name)) {
                s.push_str(&t);
            }
        }
        s
    }

    /// The logs once they contain `needle`, waiting up to `within` for the logging thread
    /// (lines reach the files a little after the event); panics with the tail if they never do.
    pub fn wait_logs(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            if Instant::now() > deadline {
                panic!(
                    "`{needle}` not logged within {within:?}:\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `n` lines of the logs.
    pub fn log_tail(&self, n: usize) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The audit log file (default location inside the state directory).
    pub fn audit_path(&self) -> PathBuf {
        self.state_dir().join("audit").join("audit.jsonl")
    }

    /// The audit records, one parsed JSON object per line.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.audit_path()).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit line {l:?} is not JSON: {e}"))
            })
            .collect()
    }

    /// Raw text of the audit log and every other file in its directory.
    pub fn audit_text(&self) -> String {
        let mut s = String::new();
        if let Some(dir) = self.audit_path().parent() {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if let Ok(t) = std::fs::read(e.path()) {
                        s.push_str(&String::from_utf8_lossy(&t));
                    }
                }
            }
        }
        s
    }

    /// Runs `sealpost ARGS… --config <file>` and returns its output.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let config = self.config_path();
        let config = config.to_string_lossy();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", &config]);
        run_sealpost(&all, &[], b"")
    }

    /// Runs `sealpost queue ARGS… --json` and parses its output.
    pub fn queue_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["queue"];
        all.extend_from_slice(args);
        all.push("--json");
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "sealpost {all:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(20)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "sealpost {all:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Queue ids currently listed.
    pub fn queue_ids(&self) -> Vec<String> {
        let list = self.queue_json(&["list"]);
        list.as_array()
            .unwrap_or_else(|| panic!("queue list is not an array: {list}"))
            .iter()
            .map(|m| match &m["id"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect()
    }

    /// Number of queued messages.
    pub fn message_count(&self) -> usize {
        self.queue_ids().len()
    }

    /// The server's process id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn sigterm(&mut self) -> ExitStatus {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("the relay is not running"));
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("running kill: {e}"));
        assert!(status.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let child = self
                .child
                .as_mut()
                .unwrap_or_else(|| panic!("the relay is not running"));
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                self.kill_now();
                panic!(
                    "sealpost did not exit within 40s of SIGTERM:\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn sigkill(&mut self) {
        assert!(self.child.is_some(), "the relay is not running");
        self.kill_now();
    }

    /// Stops the server (SIGTERM) if it runs and starts it again on the same ports and state.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.sigterm();
        }
        if let Err(log) = self.spawn_and_wait() {
            panic!("sealpost serve did not restart:\n{log}");
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill_now();
    }
}
