//! The configuration schema: one struct per TOML table, with the defaults a newcomer gets.

use crate::units::{ByteSize, HumanDuration};
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The whole configuration after loading (validated by [`crate::Config::load`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: identity and state directory.
    pub server: Server,
    /// `[[listeners]]`: inbound SMTP listeners.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// `[tls]`: the listeners' certificate; absent means a generated self-signed one.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// `[submission]`: session limits and timeouts.
    #[serde(default)]
    pub submission: Submission,
    /// `[[users]]`: SMTP credentials, one per application.
    #[serde(default)]
    pub users: Vec<User>,
    /// `[queue]`: the durable encrypted queue.
    #[serde(default)]
    pub queue: Queue,
    /// `[dns]`: resolver settings.
    #[serde(default)]
    pub dns: Dns,
    /// `[delivery]`: outbound SMTP settings.
    #[serde(default)]
    pub delivery: Delivery,
    /// `[policies.NAME]`: TLS policies and their fallback chains.
    #[serde(default)]
    pub policies: BTreeMap<String, Policy>,
    /// `[domains."example.org"]`: per-recipient-domain policy overrides.
    #[serde(default)]
    pub domains: BTreeMap<String, DomainOverride>,
    /// `[smarthosts.NAME]`: secure relays a fallback chain may divert to.
    #[serde(default)]
    pub smarthosts: BTreeMap<String, Smarthost>,
    /// `[audit]`: the hash-chained audit log.
    #[serde(default)]
    pub audit: Audit,
    /// `[admin]`: the HTTP endpoint for metrics and health checks.
    #[serde(default)]
    pub admin: Admin,
}

/// `[admin]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of the HTTP endpoint serving `/metrics` (Prometheus) and `/healthz`; absent: off.
    #[serde(default)]
    pub http: Option<SocketAddr>,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Name used in the greeting, EHLO, Received and Message-ID.
    pub hostname: String,
    /// Directory for the queue, the audit log and generated files.
    pub state_dir: PathBuf,
    /// Unix admin socket used by `sealpost queue` while `serve` runs (default `state_dir/admin.sock`).
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
}

/// How a listener speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Plaintext greeting; STARTTLS required before AUTH and mail.
    Starttls,
    /// TLS from the first byte (SMTPS, "TLS wrapper").
    Implicit,
    /// No TLS; only for loopback or allow-listed networks, no AUTH needed.
    Plain,
}

/// `[[listeners]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Socket address to bind, e.g. `127.0.0.1:2587`.
    pub address: SocketAddr,
    /// `starttls`, `implicit` or `plain`.
    pub mode: ListenerMode,
    /// Client networks allowed on a `plain` listener; empty means loopback only.
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// Policy for mail accepted without AUTH on a `plain` listener (default: `phi`).
    #[serde(default)]
    pub policy: Option<String>,
}

/// `[tls]`: PEM files for the listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
}

/// `[submission]`: limits for inbound sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Submission {
    /// Greeting text after the hostname (SES says `ESMTP SimpleEmailService-…`).
    pub banner: String,
    /// Most simultaneous sessions in total; more get `421 Too many concurrent SMTP connections`.
    pub max_connections: usize,
    /// Most simultaneous sessions from one client IP.
    pub max_connections_per_ip: usize,
    /// Time allowed to send one command (RFC 5321 says at least 5 minutes).
    pub command_timeout: HumanDuration,
    /// Time allowed between two data blocks while receiving DATA.
    pub data_timeout: HumanDuration,
    /// Time allowed for the TLS handshake.
    pub tls_handshake_timeout: HumanDuration,
    /// Failed AUTH attempts before the session is closed.
    pub max_auth_failures: u32,
    /// Delay before answering a failed AUTH, doubled for each further failure.
    pub auth_failure_delay: HumanDuration,
    /// Most commands answered with an error before the session is closed.
    pub max_errors: u32,
}

impl Default for Submission {
    fn default() -> Self {
        Submission {
            banner: "ESMTP Sealpost".into(),
            max_connections: 1000,
            max_connections_per_ip: 100,
            command_timeout: HumanDuration(Duration::from_secs(300)),
            data_timeout: HumanDuration(Duration::from_secs(180)),
            tls_handshake_timeout: HumanDuration(Duration::from_secs(30)),
            max_auth_failures: 3,
            auth_failure_delay: HumanDuration(Duration::from_secs(1)),
            max_errors: 20,
        }
    }
}

/// `[[users]]`: one SMTP credential.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The SMTP AUTH user name.
    pub name: String,
    /// argon2id PHC string from `sealpost user hash-password`.
    pub password_hash: String,
    /// Sender patterns (`*@clinic.example`, `billing@clinic.example`, `*`); empty allows any.
    #[serde(default)]
    pub allowed_senders: Vec<String>,
    /// Default policy for this user's mail (default `phi`).
    #[serde(default)]
    pub policy: Option<String>,
    /// Most recipients per second (SES "maximum send rate"); absent means unlimited.
    #[serde(default)]
    pub max_send_rate: Option<f64>,
}

/// `[queue]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Queue {
    /// 32-byte key for encryption at rest (default `state_dir/queue.key`, generated if missing).
    pub key_file: Option<PathBuf>,
    /// Older keys still accepted for reading, after a key rotation.
    pub previous_key_files: Vec<PathBuf>,
    /// Largest message accepted (default 40MB, like SES).
    pub max_message_size: ByteSize,
    /// Most recipients per message (default 50, like SES).
    pub max_recipients: usize,
    /// Retry intervals after temporary failures; the last repeats.
    pub retry: Vec<HumanDuration>,
    /// After this long undelivered recipients expire and bounce.
    pub lifetime: HumanDuration,
    /// After this long a still-undelivered recipient's sender gets one delay notice; absent: off.
    pub delay_notice: Option<HumanDuration>,
}

impl Default for Queue {
    fn default() -> Self {
        let retry = ["5m", "15m", "30m", "1h", "2h", "4h"]
            .iter()
            .filter_map(|s| crate::units::parse_duration(s).ok())
            .map(HumanDuration)
            .collect();
        Queue {
            key_file: None,
            previous_key_files: Vec::new(),
            max_message_size: ByteSize(40_000_000),
            max_recipients: 50,
            retry,
            lifetime: HumanDuration(Duration::from_secs(5 * 86_400)),
            delay_notice: None,
        }
    }
}

/// `[dns]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dns {
    /// Nameservers as `ip:port`; empty means `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// Time allowed for one query.
    pub timeout: HumanDuration,
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            nameservers: Vec::new(),
            timeout: HumanDuration(Duration::from_secs(5)),
        }
    }
}

/// `[delivery]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    /// TCP port of recipient MX hosts (25; tests override).
    pub port: u16,
    /// Extra CA PEM files trusted besides the Mozilla roots.
    pub trust_anchors: Vec<PathBuf>,
    /// Most concurrent outbound connections.
    pub max_connections: usize,
    /// Most concurrent outbound connections to one destination domain.
    pub max_connections_per_domain: usize,
    /// Time allowed to connect to one MX address.
    pub connect_timeout: HumanDuration,
    /// Accept and queue mail but deliver nothing (maintenance, benchmarks).
    pub paused: bool,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            port: 25,
            trust_anchors: Vec::new(),
            max_connections: 50,
            max_connections_per_domain: 5,
            connect_timeout: HumanDuration(Duration::from_secs(30)),
            paused: false,
        }
    }
}

/// What a policy requires of the recipient's TLS connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsRequirement {
    /// TLS 1.2+, NIST suites, PKIX chain, valid dates, name match.
    Verified,
    /// TLS 1.2+ and NIST suites, certificate not authenticated (operator's explicit choice).
    Encrypted,
}

/// One step of a policy's fallback chain, parsed from strings like `hold:4h`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FallbackStep {
    /// Keep retrying the secure path for this long.
    Hold(Duration),
    /// Send a DSN to the envelope sender and finish the recipient.
    Bounce,
    /// Relay through the named `[smarthosts.NAME]`.
    Smarthost(String),
    /// Deliver through the secure pickup portal (not yet available).
    Portal,
}

impl FallbackStep {
    /// Parses `hold:DURATION`, `bounce`, `smarthost:NAME` or `portal`.
    pub fn parse(text: &str) -> Result<FallbackStep, String> {
        let (kind, arg) = match text.split_once(':') {
            Some((k, a)) => (k.trim(), Some(a.trim())),
            None => (text.trim(), None),
        };
        match (kind, arg) {
            ("hold", Some(d)) => crate::units::parse_duration(d).map(FallbackStep::Hold),
            ("hold", None) => Err("`hold` needs a duration, e.g. \"hold:4h\"".into()),
            ("bounce", None) => Ok(FallbackStep::Bounce),
            ("smarthost", Some(n)) if !n.is_empty() => Ok(FallbackStep::Smarthost(n.to_string())),
            ("smarthost", _) => Err("`smarthost` needs a name, e.g. \"smarthost:secure-relay\"".into()),
            ("portal", None) => Ok(FallbackStep::Portal),
            _ => Err(format!(
                "`{text}` is not a fallback step; expected \"hold:DURATION\", \"bounce\", \"smarthost:NAME\" or \"portal\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for FallbackStep {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        FallbackStep::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `[policies.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// `verified` (default for PHI) or `encrypted`.
    pub tls: TlsRequirement,
    /// Fallback chain when no MX passes the policy.
    #[serde(default = "default_on_failure")]
    pub on_failure: Vec<FallbackStep>,
    /// SHA-256 fingerprints (hex) of accepted leaf certificates; empty means any valid one.
    #[serde(default)]
    pub pins: Vec<String>,
}

fn default_on_failure() -> Vec<FallbackStep> {
    vec![
        FallbackStep::Hold(Duration::from_secs(4 * 3600)),
        FallbackStep::Bounce,
    ]
}

impl Policy {
    /// The built-in `phi` policy used when the config defines none.
    pub fn phi_default() -> Policy {
        Policy {
            tls: TlsRequirement::Verified,
            on_failure: default_on_failure(),
            pins: Vec::new(),
        }
    }
}

/// `[domains."example.org"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainOverride {
    /// Policy used for recipients in this domain, whatever the message's policy.
    pub policy: String,
}

/// `[smarthosts.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smarthost {
    /// Host name (also the name the certificate must carry).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `starttls` or `implicit`.
    pub mode: ListenerMode,
    /// AUTH user name, if the relay needs one.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the AUTH password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Policy applied to the smarthost connection; must be `verified`.
    #[serde(default)]
    pub policy: Option<String>,
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// Path of the current audit file (default `state_dir/audit/audit.jsonl`).
    pub path: Option<PathBuf>,
    /// Rotate the file when it grows past this size.
    pub rotate_size: ByteSize,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            path: None,
            rotate_size: ByteSize(64 << 20),
        }
    }
}
