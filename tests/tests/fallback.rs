//! Black-box tests of fallback and accountability (issue 5): the real `sealpost serve` bounces
//! with RFC 3464 DSNs delivered to the sender's (test) mailbox over verified TLS, relays through
//! an AUTH smarthost on implicit TLS and on STARTTLS (sending nothing but EHLO to one that does
//! not offer STARTTLS), expires, drops null-sender failures, sends one delay notice,
//! keeps a marker from subject and body out of every log and audit file, and `audit verify`
//! catches tampering with a rotated audit file.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use base64::Engine as _;
use sealpost_tests::dns::DnsServer;
use sealpost_tests::receiver::{default_tls, server_config, Receiver, TlsMode};
use sealpost_tests::*;
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const FROM: &str = "billing@clinic.example";
const SENDER_MX: &str = "mx.clinic.example";
const SMART_HOST: &str = "smarthost.test";
const SMART_USER: &str = "relay-user";
const SMART_PASSWORD: &str = "smart-secret-1";

/// A DNS server, a test CA the relay trusts, the delivery port, and the sender's mailbox:
/// a verified STARTTLS receiver for clinic.example at 127.0.0.`sender_ip`.
struct World {
    dir: tempfile::TempDir,
    dns: DnsServer,
    ca: TestCa,
    port: u16,
    mailbox: Receiver,
}

impl World {
    async fn new(sender_ip: u8) -> World {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::with_intermediate(&dir.path().join("mx-ca"));
        let dns = DnsServer::start().await;
        let port = relay::free_port().port();
        dns.mx_at(
            "clinic.example",
            SENDER_MX,
            Ipv4Addr::new(127, 0, 0, sender_ip),
        );
        let files = ca.issue("clinic", &LeafSpec::new(&[SENDER_MX]));
        let mailbox =
            Receiver::start(ip(sender_ip), port, SENDER_MX, default_tls(&files), &[]).await;
        World {
            dir,
            dns,
            ca,
            port,
            mailbox,
        }
    }

    fn relay_with(&self, tweak: impl FnOnce(RelayConfig) -> RelayConfig) -> Relay {
        let cfg = RelayConfig {
            env: vec![
                (
                    "SEALPOST_DNS__NAMESERVERS".into(),
                    self.dns.nameservers_toml(),
                ),
                ("SEALPOST_DNS__TIMEOUT".into(), "\"2s\"".into()),
                ("SEALPOST_DELIVERY__PORT".into(), self.port.to_string()),
                ("SEALPOST_DELIVERY__CONNECT_TIMEOUT".into(), "\"3s\"".into()),
                (
                    "SEALPOST_DELIVERY__TRUST_ANCHORS".into(),
                    format!("[\"{}\"]", self.ca.root_pem_path().display()),
                ),
            ],
            rust_log: "debug".into(),
            ..RelayConfig::default()
        }
        .queue("retry", "[\"1s\"]");
        Relay::start(tweak(cfg))
    }

    /// `domain` has MX `mx.<domain>` at 127.0.0.`last`; a receiver there with `mode`.
    async fn receiver(&self, domain: &str, last: u8, mode: TlsMode, reject: &[&str]) -> Receiver {
        let host = format!("mx.{domain}");
        self.dns
            .mx_at(domain, &host, Ipv4Addr::new(127, 0, 0, last));
        Receiver::start(ip(last), self.port, &host, mode, reject).await
    }

    /// A receiver whose certificate expired.
    async fn expired(&self, domain: &str, last: u8) -> Receiver {
        let host = format!("mx.{domain}");
        let files = self.ca.issue(
            &format!("expired-{domain}"),
            &LeafSpec::new(&[host.as_str()]).validity(Validity::Expired),
        );
        self.receiver(domain, last, default_tls(&files), &[]).await
    }

    /// A good receiver for `domain`.
    async fn good(&self, domain: &str, last: u8, reject: &[&str]) -> Receiver {
        let host = format!("mx.{domain}");
        let files = self
            .ca
            .issue(&format!("good-{domain}"), &LeafSpec::new(&[host.as_str()]));
        self.receiver(domain, last, default_tls(&files), reject)
            .await
    }

    /// An AUTH smarthost on implicit TLS at 127.0.0.`last`, in DNS as `smarthost.test`, and the
    /// `[smarthosts.relay]` TOML for it.
    async fn smarthost(&self, last: u8) -> (Smarthost, String) {
        self.smarthost_in(last, SmartMode::Implicit).await
    }

    /// A smarthost in `mode` at 127.0.0.`last`, and the `[smarthosts.relay]` TOML for it.
    async fn smarthost_in(&self, last: u8, mode: SmartMode) -> (Smarthost, String) {
        self.dns.address(SMART_HOST, ip(last));
        let files = self.ca.issue("smarthost", &LeafSpec::new(&[SMART_HOST]));
        let host = Smarthost::start(SocketAddr::new(ip(last), 0), &files, mode).await;
        let mode = match mode {
            SmartMode::Implicit => "implicit",
            SmartMode::StartTls | SmartMode::NoStartTls => "starttls",
        };
        let password_file = self.dir.path().join("smarthost.password");
        std::fs::write(&password_file, format!("{SMART_PASSWORD}\n")).unwrap();
        let toml = format!(
            "[smarthosts.relay]\nhost = \"{SMART_HOST}\"\nport = {}\nmode = \"{mode}\"\nusername = \"{SMART_USER}\"\npassword_file = \"{}\"\n\n",
            host.addr.port(),
            password_file.display()
        );
        (host, toml)
    }
}

/// A relay that sends `badmx.test` through `[smarthosts.relay]` (`smart_toml`) once `hold` has
/// passed; without a bounce step, a failed smarthost leaves the recipient queued.
fn relay_via_smarthost(w: &World, smart_toml: &str, hold: &str) -> Relay {
    w.relay_with(|mut cfg| {
        cfg.extra_toml.push_str(smart_toml);
        cfg.extra_toml.push_str(&format!(
            "[policies.viasmart]\ntls = \"verified\"\non_failure = [\"hold:{hold}\", \"smarthost:relay\"]\n\n\
             [domains.\"badmx.test\"]\npolicy = \"viasmart\"\n"
        ));
        cfg
    })
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// One message the test smarthost accepted.
#[derive(Debug, Clone)]
struct Relayed {
    authenticated: bool,
    mail_from: String,
    rcpt_to: Vec<String>,
    data: Vec<u8>,
}

/// How the test smarthost speaks TLS.
#[derive(Debug, Clone, Copy)]
enum SmartMode {
    /// TLS from the first byte.
    Implicit,
    /// Plaintext greeting and EHLO (STARTTLS offered, AUTH not), then STARTTLS.
    StartTls,
    /// Plaintext only: STARTTLS never offered, AUTH offered in the clear (a downgrade trap).
    NoStartTls,
}

/// A smarthost that requires AUTH PLAIN or LOGIN before MAIL, and logs every command it got
/// with whether it came over TLS.
struct Smarthost {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Relayed>>>,
    commands: Arc<Mutex<Vec<(bool, String)>>>,
}

/// What a session logs: the command verb and whether TLS was on.
type CommandLog = Arc<Mutex<Vec<(bool, String)>>>;

fn log_command(log: &CommandLog, tls: bool, cmd: &str) {
    let verb = cmd
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    log.lock().unwrap().push((tls, verb));
}

/// The plaintext part of a STARTTLS session: greeting, EHLO, and STARTTLS if `offer`.
/// Returns the stream once STARTTLS was answered 220, or `None` if the client left.
async fn plaintext_phase(
    tcp: tokio::net::TcpStream,
    offer: bool,
    log: &CommandLog,
) -> std::io::Result<Option<tokio::net::TcpStream>> {
    let mut s = BufReader::new(tcp);
    s.get_mut()
        .write_all(b"220 smarthost.test ESMTP\r\n")
        .await?;
    loop {
        let mut l = String::new();
        if s.read_line(&mut l).await? == 0 {
            return Ok(None);
        }
        let cmd = l.trim_end().to_string();
        log_command(log, false, &cmd);
        let upper = cmd.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") && offer {
            b"250-smarthost.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
        } else if upper.starts_with("EHLO") {
            b"250-smarthost.test\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
        } else if upper == "STARTTLS" && offer {
            s.get_mut()
                .write_all(b"220 2.0.0 ready to start TLS\r\n")
                .await?;
            return Ok(Some(s.into_inner()));
        } else if upper == "QUIT" {
            s.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(None);
        } else if upper.starts_with("AUTH") || upper.starts_with("MAIL") {
            b"530 5.7.0 must issue STARTTLS first\r\n"
        } else {
            b"502 5.5.1 not implemented\r\n"
        };
        s.get_mut().write_all(reply).await?;
    }
}

impl Smarthost {
    async fn start(bind: SocketAddr, files: &CertFiles, mode: SmartMode) -> Smarthost {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(
            files,
            &[&rustls::version::TLS12, &rustls::version::TLS13],
            &[],
        ));
        let got: Arc<Mutex<Vec<Relayed>>> = Arc::default();
        let commands: CommandLog = Arc::default();
        let (g, log) = (got.clone(), commands.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, g, log) = (acceptor.clone(), g.clone(), log.clone());
                tokio::spawn(async move {
                    let (tcp, greet) = match mode {
                        SmartMode::Implicit => (tcp, true),
                        SmartMode::StartTls | SmartMode::NoStartTls => {
                            let offer = matches!(mode, SmartMode::StartTls);
                            match plaintext_phase(tcp, offer, &log).await {
                                Ok(Some(tcp)) => (tcp, false),
                                _ => return,
                            }
                        }
                    };
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = smarthost_session(BufReader::new(tls), g, log, greet).await;
                    }
                });
            }
        });
        Smarthost {
            addr,
            got,
            commands,
        }
    }

    /// Every command verb received, with whether TLS was on.
    fn commands(&self) -> Vec<(bool, String)> {
        self.commands.lock().unwrap().clone()
    }

    fn received(&self) -> Vec<Relayed> {
        self.got.lock().unwrap().clone()
    }
}

async fn smarthost_session<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: BufReader<S>,
    got: Arc<Mutex<Vec<Relayed>>>,
    log: CommandLog,
    greet: bool,
) -> std::io::Result<()> {
    let b64 = |t: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(t.trim())
            .unwrap_or_default()
    };
    async fn say<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        s: &mut BufReader<S>,
        t: &str,
    ) -> std::io::Result<()> {
        s.get_mut().write_all(t.as_bytes()).await?;
        s.get_mut().flush().await
    }
    async fn line<S: tokio::io::AsyncRead + Unpin>(
        s: &mut BufReader<S>,
    ) -> std::io::Result<Option<String>> {
        let mut l = String::new();
        if s.read_line(&mut l).await? == 0 {
            return Ok(None);
        }
        Ok(Some(l.trim_end().to_string()))
    }
    if greet {
        say(&mut s, "220 smarthost.test ESMTP\r\n").await?;
    }
    let mut authed = false;
    let mut current: Option<Relayed> = None;
    while let Some(cmd) = line(&mut s).await? {
        log_command(&log, true, &cmd);
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            say(
                &mut s,
                "250-smarthost.test\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n",
            )
            .await?;
        } else if let Some(token) = upper.strip_prefix("AUTH PLAIN ").map(|_| &cmd[11..]) {
            let want = format!("\0{SMART_USER}\0{SMART_PASSWORD}");
            authed = b64(token) == want.as_bytes();
            say(
                &mut s,
                if authed {
                    "235 2.7.0 ok\r\n"
                } else {
                    "535 5.7.8 bad\r\n"
                },
            )
            .await?;
        } else if upper == "AUTH LOGIN" {
            say(&mut s, "334 VXNlcm5hbWU6\r\n").await?;
            let user = line(&mut s).await?.unwrap_or_default();
            say(&mut s, "334 UGFzc3dvcmQ6\r\n").await?;
            let pass = line(&mut s).await?.unwrap_or_default();
            authed = b64(&user) == SMART_USER.as_bytes() && b64(&pass) == SMART_PASSWORD.as_bytes();
            say(
                &mut s,
                if authed {
                    "235 2.7.0 ok\r\n"
                } else {
                    "535 5.7.8 bad\r\n"
                },
            )
            .await?;
        } else if upper.starts_with("MAIL") {
            if !authed {
                say(&mut s, "530 5.7.0 authentication required\r\n").await?;
                continue;
            }
            let from = cmd
                .split('<')
                .nth(1)
                .and_then(|r| r.split('>').next())
                .unwrap_or_default();
            current = Some(Relayed {
                authenticated: authed,
                mail_from: from.to_string(),
                rcpt_to: Vec::new(),
                data: Vec::new(),
            });
            say(&mut s, "250 2.1.0 ok\r\n").await?;
        } else if upper.starts_with("RCPT") {
            let to = cmd
                .split('<')
                .nth(1)
                .and_then(|r| r.split('>').next())
                .unwrap_or_default();
            if let Some(c) = current.as_mut() {
                c.rcpt_to.push(to.to_string());
            }
            say(&mut s, "250 2.1.5 ok\r\n").await?;
        } else if upper == "DATA" {
            say(&mut s, "354 go ahead\r\n").await?;
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                if s.read_until(b'\n', &mut l).await? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                let unstuffed = if l.first() == Some(&b'.') {
                    &l[1..]
                } else {
                    &l[..]
                };
                data.extend_from_slice(unstuffed);
            }
            if let Some(mut c) = current.take() {
                c.data = data;
                got.lock().unwrap().push(c);
            }
            say(&mut s, "250 2.0.0 relayed\r\n").await?;
        } else if upper == "RSET" || upper == "NOOP" {
            current = None;
            say(&mut s, "250 2.0.0 ok\r\n").await?;
        } else if upper == "QUIT" {
            say(&mut s, "221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            say(&mut s, "502 5.5.1 not implemented\r\n").await?;
        }
    }
    Ok(())
}

/// Submits one message from `from` with `subject` and `body`; returns its queue id.
async fn submit_from(
    relay: &Relay,
    from: &str,
    rcpts: &[&str],
    subject: &str,
    body: &str,
) -> String {
    let mut c = SmtpClient::connect(relay.starttls).await.unwrap();
    c.greeting().await.unwrap();
    c.ehlo("client.test").await.unwrap();
    c.starttls(relay.ca_pem(), RELAY_HOSTNAME).await.unwrap();
    c.ehlo("client.test").await.unwrap();
    c.auth_plain(DEFAULT_USER, DEFAULT_PASSWORD)
        .await
        .unwrap()
        .assert(235, "2.7.0");
    let msg = format!(
        "From: <{FROM}>\r\nTo: <{}>\r\nSubject: {subject}\r\nMessage-ID: <{}@clinic.example>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n{body}",
        rcpts[0],
        rand_token()
    );
    let reply = c.submit(from, rcpts, &msg).await.unwrap();
    queue_id_of(&reply).unwrap_or_else(|| panic!("not 250 Ok <id>: {reply}"))
}

async fn submit(relay: &Relay, rcpts: &[&str], subject: &str, body: &str) -> String {
    submit_from(relay, FROM, rcpts, subject, body).await
}

fn rand_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Waits until `pred` holds for the audit records; panics with the logs after `secs`.
async fn wait_audit(
    relay: &Relay,
    secs: u64,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let lines = relay.audit_lines();
        if pred(&lines) {
            return lines;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; audit:\n{}\nlog:\n{}",
                lines
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                relay.log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the receiver has `n` messages.
async fn wait_received(
    r: &Receiver,
    n: usize,
    secs: u64,
    relay: &Relay,
) -> Vec<receiver::Received> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = r.received();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "receiver {} got {} of {n} messages; log:\n{}",
            r.addr,
            got.len(),
            relay.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn events<'a>(lines: &'a [Value], event: &str, rcpt: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["event"] == event && l["recipient"] == rcpt)
        .collect()
}

/// The plain-words part with its wrapped lines joined again.
/// The audited attempt of message `id` at the smarthost.
fn smarthost_attempt<'a>(lines: &'a [Value], id: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["event"] == "attempt" && l["mx"] == SMART_HOST && l["queue_id"] == id)
        .unwrap_or_else(|| panic!("no audited smarthost attempt for {id}"))
}

fn unwrapped(text: &str) -> String {
    text.replace("\r\n    ", " ")
}

/// The `message/delivery-status` part of a DSN (its text up to the next boundary).
fn delivery_status(dsn: &str) -> &str {
    let start = dsn
        .find("Content-Type: message/delivery-status")
        .unwrap_or_else(|| panic!("no delivery-status part:\n{dsn}"));
    let rest = &dsn[start..];
    let end = rest[1..].find("\r\n--").map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

async fn wait_queue_empty(relay: &Relay, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while relay.message_count() != 0 {
        assert!(
            Instant::now() < deadline,
            "queue not empty: {}",
            relay.queue_json(&["list"])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_bounces_with_a_dsn_to_the_sender_without_the_body() {
    let w = World::new(10).await;
    let bad = w.expired("expired.test", 11).await;
    let relay = w.relay_with(|mut cfg| {
        cfg.extra_toml.push_str(
            "[policies.fast]\ntls = \"verified\"\non_failure = [\"hold:2s\", \"bounce\"]\n\n\
             [domains.\"expired.test\"]\npolicy = \"fast\"\n",
        );
        cfg
    });
    let body = "BODYMARK-7f3a glucose 5.4 mmol/L\r\n";
    let id = submit(&relay, &["pat@expired.test"], "lab results", body).await;
    let got = wait_received(&w.mailbox, 1, 30, &relay).await;
    assert_eq!(got.len(), 1, "exactly one DSN");
    let dsn_msg = &got[0];
    assert_eq!(dsn_msg.mail_from, "", "DSN from the null sender");
    assert_eq!(dsn_msg.rcpt_to, vec![FROM.to_string()]);
    assert!(dsn_msg.tls, "DSN delivered over TLS");
    let text = String::from_utf8(dsn_msg.data.clone()).unwrap();
    assert!(text.contains("multipart/report"), "{text}");
    assert!(text.contains("report-type=delivery-status"), "{text}");
    let status = delivery_status(&text);
    for want in [
        "Final-Recipient: rfc822; pat@expired.test",
        "Action: failed",
        "Status: 5.7.5",
        "Remote-MTA: dns; mx.expired.test",
        "Diagnostic-Code: x-sealpost; tls-verdict=expired",
        "Last-Attempt-Date: ",
        "Arrival-Date: ",
        "Reporting-MTA: dns; relay.test",
    ] {
        assert!(status.contains(want), "missing {want:?} in\n{status}");
    }
    assert!(text.contains("text/rfc822-headers"), "{text}");
    assert!(
        text.contains("expired"),
        "plain words name the expiry:\n{text}"
    );
    assert!(
        unwrapped(&text).contains("policy `fast` requires a verified TLS connection"),
        "{text}"
    );
    // No byte of the body: neither the marker nor the value, in any encoding we send.
    for needle in ["BODYMARK-7f3a", "glucose", "5.4 mmol"] {
        assert!(!text.contains(needle), "body leaked ({needle}):\n{text}");
    }
    assert!(!bad.got_data(), "nothing to the bad MX");
    // Audit: diverted to bounce, bounced with the DSN's queue id, which was then delivered.
    let lines = wait_audit(&relay, 10, "DSN delivered", |lines| {
        events(lines, "bounced", "pat@expired.test")
            .first()
            .and_then(|b| b["detail"]["dsn"].as_str())
            .is_some_and(|dsn| {
                lines
                    .iter()
                    .any(|l| l["event"] == "delivered" && l["queue_id"] == dsn)
            })
    })
    .await;
    let bounced = events(&lines, "bounced", "pat@expired.test");
    assert_eq!(bounced.len(), 1);
    assert_eq!(bounced[0]["queue_id"], id.as_str());
    assert_eq!(bounced[0]["detail"]["status"], "5.7.5");
    let diverted = events(&lines, "diverted", "pat@expired.test");
    assert_eq!(diverted[0]["detail"]["step"], "hold:2s");
    assert!(
        diverted.iter().any(|d| d["detail"]["step"] == "bounce"),
        "{diverted:?}"
    );
    assert_eq!(relay.cli(&["audit", "verify"]).status.code(), Some(0));
    wait_queue_empty(&relay, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smarthost_over_starttls_sends_auth_and_mail_only_after_tls() {
    let w = World::new(24).await;
    let bad = w.expired("badmx.test", 25).await;
    let (smart, smart_toml) = w.smarthost_in(26, SmartMode::StartTls).await;
    let relay = relay_via_smarthost(&w, &smart_toml, "1s");
    let id = submit(
        &relay,
        &["doc@badmx.test"],
        "lab results",
        "Results attached.\r\n",
    )
    .await;
    let lines = wait_audit(
        &relay,
        30,
        "delivered via the STARTTLS smarthost",
        |lines| !events(lines, "delivered", "doc@badmx.test").is_empty(),
    )
    .await;
    let got = smart.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].authenticated);
    assert_eq!(got[0].rcpt_to, vec!["doc@badmx.test".to_string()]);
    assert!(String::from_utf8_lossy(&got[0].data).contains("Results attached."));
    assert!(!bad.got_data(), "the bad MX must not get the message");
    // In the clear only EHLO and STARTTLS; AUTH and the envelope only under TLS.
    let commands = smart.commands();
    let plain: Vec<&str> = commands
        .iter()
        .filter(|(tls, _)| !tls)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(plain, ["EHLO", "STARTTLS"], "{commands:?}");
    for verb in ["EHLO", "AUTH", "MAIL", "RCPT", "DATA"] {
        assert!(
            commands.contains(&(true, verb.to_string())),
            "{verb} not sent under TLS: {commands:?}"
        );
    }
    let attempt = smarthost_attempt(&lines, &id);
    assert_eq!(attempt["tls"]["verified"], true, "{attempt}");
    assert_eq!(attempt["detail"]["via"], "smarthost:relay");
    assert!(!relay.logs().contains(SMART_PASSWORD));
    assert!(!relay.audit_text().contains(SMART_PASSWORD));
    wait_queue_empty(&relay, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smarthost_that_does_not_offer_starttls_gets_no_password_and_no_mail() {
    let w = World::new(27).await;
    let bad = w.expired("badmx.test", 28).await;
    let (smart, smart_toml) = w.smarthost_in(29, SmartMode::NoStartTls).await;
    // No bounce step: once the smarthost fails, the recipient stays queued for retry.
    let relay = relay_via_smarthost(&w, &smart_toml, "1s");
    let id = submit(
        &relay,
        &["doc@badmx.test"],
        "lab results",
        "Results attached.\r\n",
    )
    .await;
    let lines = wait_audit(&relay, 30, "a refused smarthost attempt", |lines| {
        lines
            .iter()
            .any(|l| l["event"] == "attempt" && l["mx"] == SMART_HOST)
    })
    .await;
    let attempt = smarthost_attempt(&lines, &id);
    assert_eq!(
        attempt["tls"]["reason"], "starttls_not_offered",
        "{attempt}"
    );
    assert_ne!(attempt["tls"]["verified"], true, "{attempt}");
    // The smarthost offered AUTH in the clear; Sealpost sent neither it nor an envelope.
    let commands = smart.commands();
    assert!(
        !commands.is_empty(),
        "Sealpost never talked to the smarthost"
    );
    for (tls, verb) in &commands {
        assert!(!tls, "{commands:?}");
        assert!(
            verb == "EHLO" || verb == "QUIT",
            "sent {verb} without TLS: {commands:?}"
        );
    }
    assert!(smart.received().is_empty());
    assert!(!bad.got_data(), "the bad MX must not get the message");
    assert!(events(&lines, "delivered", "doc@badmx.test").is_empty());
    assert!(events(&lines, "bounced", "doc@badmx.test").is_empty());
    assert_eq!(
        relay.queue_ids(),
        vec![id.clone()],
        "the message stays queued"
    );
    assert_eq!(
        w.mailbox.received().len(),
        0,
        "no DSN: nothing failed for good"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smarthost_relays_over_verified_implicit_tls_with_auth_and_nothing_reaches_the_bad_mx() {
    let w = World::new(20).await;
    let bad = w.expired("badmx.test", 21).await;
    let (smart, smart_toml) = w.smarthost(22).await;
    let relay = relay_via_smarthost(&w, &smart_toml, "2s");
    let id = submit(
        &relay,
        &["doc@badmx.test"],
        "referral",
        "Referral letter attached.\r\n",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while smart.received().is_empty() {
        assert!(
            Instant::now() < deadline,
            "nothing at the smarthost; log:\n{}",
            relay.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = smart.received();
    assert_eq!(got.len(), 1);
    assert!(got[0].authenticated);
    assert_eq!(got[0].mail_from, FROM);
    assert_eq!(got[0].rcpt_to, vec!["doc@badmx.test".to_string()]);
    assert!(String::from_utf8_lossy(&got[0].data).contains("Referral letter attached."));
    assert!(!bad.got_data(), "the bad MX must not get the message");
    let lines = wait_audit(&relay, 10, "delivered via smarthost", |lines| {
        !events(lines, "delivered", "doc@badmx.test").is_empty()
    })
    .await;
    let delivered = events(&lines, "delivered", "doc@badmx.test");
    assert_eq!(delivered[0]["detail"]["via"], "smarthost:relay");
    assert_eq!(delivered[0]["mx"], SMART_HOST);
    assert!(events(&lines, "diverted", "doc@badmx.test")
        .iter()
        .any(|d| d["detail"]["step"] == "smarthost:relay"));
    let attempt = smarthost_attempt(&lines, &id);
    assert_eq!(attempt["tls"]["verified"], true, "{attempt}");
    assert_eq!(attempt["detail"]["via"], "smarthost:relay");
    // Never a plaintext password in the logs or the audit trail.
    assert!(!relay.logs().contains(SMART_PASSWORD));
    assert!(!relay.audit_text().contains(SMART_PASSWORD));
    assert_eq!(w.mailbox.received().len(), 0, "no DSN on success");
    wait_queue_empty(&relay, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_expiry_bounces_with_5_4_7() {
    let w = World::new(30).await;
    let _plain = w.receiver("notls.test", 31, TlsMode::NoStarttls, &[]).await;
    let relay = w.relay_with(|cfg| cfg.queue("lifetime", "\"4s\""));
    let id = submit(&relay, &["x@notls.test"], "reminder", "Reminder body.\r\n").await;
    let got = wait_received(&w.mailbox, 1, 30, &relay).await;
    let text = String::from_utf8(got[0].data.clone()).unwrap();
    let status = delivery_status(&text);
    assert!(status.contains("Action: failed"), "{status}");
    assert!(status.contains("Status: 5.4.7"), "{status}");
    assert!(
        status.contains("Final-Recipient: rfc822; x@notls.test"),
        "{status}"
    );
    assert!(unwrapped(&text).contains("queue lifetime of 4s"), "{text}");
    assert!(!text.contains("Reminder body."));
    let lines = wait_audit(&relay, 10, "expired then bounced", |lines| {
        !events(lines, "bounced", "x@notls.test").is_empty()
    })
    .await;
    let expired = events(&lines, "expired", "x@notls.test");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["queue_id"], id.as_str());
    let seq = |v: &Value| v["seq"].as_u64().unwrap();
    let bounced = events(&lines, "bounced", "x@notls.test");
    assert!(
        seq(expired[0]) < seq(bounced[0]),
        "expired is recorded before the bounce"
    );
    assert_eq!(bounced[0]["detail"]["status"], "5.4.7");
    wait_queue_empty(&relay, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_sender_failure_is_dropped_with_an_audit_record_and_no_dsn() {
    let w = World::new(40).await;
    let mx = w.good("reject.test", 41, &["gone@reject.test"]).await;
    let relay = w.relay_with(|cfg| cfg);
    let id = submit_from(
        &relay,
        "",
        &["gone@reject.test"],
        "notice",
        "Auto notice.\r\n",
    )
    .await;
    let lines = wait_audit(&relay, 20, "dropped", |lines| {
        !events(lines, "dropped", "gone@reject.test").is_empty()
    })
    .await;
    let dropped = events(&lines, "dropped", "gone@reject.test");
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0]["queue_id"], id.as_str());
    assert!(dropped[0]["detail"]["reason"]
        .as_str()
        .unwrap()
        .contains("550 5.1.1"));
    assert!(dropped[0]["detail"]["why"]
        .as_str()
        .unwrap()
        .contains("null sender"));
    assert!(events(&lines, "bounced", "gone@reject.test").is_empty());
    assert!(mx.received().is_empty());
    wait_queue_empty(&relay, 10).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(w.mailbox.received().is_empty(), "no DSN for a null sender");
    assert!(w.mailbox.connections() == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_delay_notice_while_held() {
    let w = World::new(50).await;
    let _plain = w.receiver("slow.test", 51, TlsMode::NoStarttls, &[]).await;
    let relay = w.relay_with(|cfg| cfg.queue("delay_notice", "\"2s\""));
    let id = submit(
        &relay,
        &["y@slow.test"],
        "appointment",
        "Appointment body.\r\n",
    )
    .await;
    let got = wait_received(&w.mailbox, 1, 30, &relay).await;
    let text = String::from_utf8(got[0].data.clone()).unwrap();
    let status = delivery_status(&text);
    assert!(status.contains("Action: delayed"), "{status}");
    assert!(status.contains("Status: 4.7.10"), "{status}");
    assert!(status.contains("Will-Retry-Until: "), "{status}");
    assert!(
        status.contains("Diagnostic-Code: x-sealpost; tls-verdict=starttls_not_offered"),
        "{status}"
    );
    assert!(text.contains("still"), "{text}");
    assert!(!text.contains("Appointment body."));
    // Several more retries (1s apart): still exactly one notice, and the message still queued.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lines = relay.audit_lines();
    let attempts = lines
        .iter()
        .filter(|l| l["event"] == "attempt" && l["queue_id"] == id.as_str())
        .count();
    assert!(attempts >= 3, "not retried: {attempts}");
    assert_eq!(
        w.mailbox.received().len(),
        1,
        "delay notice sent more than once"
    );
    let notices: Vec<_> = events(&lines, "deferred", "y@slow.test")
        .into_iter()
        .filter(|l| l["detail"]["delay_notice"].is_string())
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(relay.queue_ids().contains(&id));
    // `queue show` tells the operator the notice went out
    let shown = relay.queue_json(&["show", &id]);
    assert_eq!(shown["recipients"][0]["delay_notified"], true, "{shown}");
    let text = relay.cli(&["queue", "show", &id]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("delay-notice-sent"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_in_subject_and_body_reaches_no_log_and_no_audit_file() {
    let w = World::new(60).await;
    let good = w.good("good.test", 61, &[]).await;
    let _held = w.receiver("held.test", 62, TlsMode::NoStarttls, &[]).await;
    let _bad = w.expired("bounce.test", 63).await;
    let _bad2 = w.expired("smart.test", 64).await;
    let (smart, smart_toml) = w.smarthost(65).await;
    let mut relay = w.relay_with(|mut cfg| {
        cfg.extra_toml.push_str(&smart_toml);
        cfg.extra_toml.push_str(
            "[policies.fast]\ntls = \"verified\"\non_failure = [\"hold:1s\", \"bounce\"]\n\n\
             [policies.viasmart]\ntls = \"verified\"\non_failure = [\"hold:1s\", \"smarthost:relay\"]\n\n\
             [domains.\"bounce.test\"]\npolicy = \"fast\"\n\n\
             [domains.\"smart.test\"]\npolicy = \"viasmart\"\n",
        );
        cfg.queue("delay_notice", "\"2s\"")
    });
    let marker = format!("PHIMARK{}", rand_token());
    for rcpt in [
        "a@good.test",
        "b@held.test",
        "c@bounce.test",
        "d@smart.test",
    ] {
        submit(
            &relay,
            &[rcpt],
            &format!("Results {marker} for patient"),
            &format!("Dear patient, {marker} your results.\r\n"),
        )
        .await;
    }
    // delivered, smarthost, bounce DSN and the held message's delay notice
    wait_received(&good, 1, 30, &relay).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while smart.received().is_empty() {
        assert!(Instant::now() < deadline, "smarthost got nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_received(&w.mailbox, 2, 30, &relay).await;
    let lines = wait_audit(&relay, 10, "every path", |lines| {
        !events(lines, "delivered", "a@good.test").is_empty()
            && !events(lines, "diverted", "b@held.test").is_empty()
            && !events(lines, "bounced", "c@bounce.test").is_empty()
            && !events(lines, "delivered", "d@smart.test").is_empty()
    })
    .await;
    assert!(!lines.is_empty());
    // The marker went out where it must (the recipient, the smarthost) ...
    assert!(String::from_utf8_lossy(&good.received()[0].data).contains(&marker));
    // ... and is in no log file and no audit file (searched once the relay stopped, so every
    // log line has reached its file).
    assert!(relay.sigterm().success());
    let mut checked = 0;
    let mut files = Vec::new();
    collect_files(relay.dir(), &mut files);
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let is_log = name.ends_with(".log");
        let in_audit = f.starts_with(relay.audit_path().parent().unwrap());
        if !(is_log || in_audit) {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&marker),
            "marker found in {}",
            f.display()
        );
        checked += 1;
    }
    assert!(checked >= 3, "checked only {checked} files");
    assert!(relay.logs().len() > 1000, "logs are suspiciously empty");
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// A change made to the lines of a copied audit file.
type Tamper = fn(&mut Vec<String>);

/// Runs `sealpost audit verify` against a copy of the audit directory.
fn verify_copy(relay: &Relay, dir: &Path) -> (bool, String) {
    let cfg = relay.config_path();
    let cfg = cfg.to_string_lossy();
    let path = dir.join("audit.jsonl");
    let path = format!("\"{}\"", path.display());
    let out = run_sealpost(
        &["audit", "verify", "--config", &cfg],
        &[("SEALPOST_AUDIT__PATH", &path)],
        b"",
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".jsonl") {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_a_rotated_audit_file_is_caught_naming_file_and_line() {
    let w = World::new(70).await;
    let _good = w.good("many.test", 71, &[]).await;
    let relay = w.relay_with(|mut cfg| {
        cfg.env
            .push(("SEALPOST_AUDIT__ROTATE_SIZE".into(), "\"64KiB\"".into()));
        cfg
    });
    let audit_dir = relay.audit_path().parent().unwrap().to_path_buf();
    let rotated = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(&audit_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().to_string();
                n.starts_with("audit.") && n.ends_with(".jsonl") && n != "audit.jsonl"
            })
            .collect();
        v.sort();
        v
    };
    let rcpts: Vec<String> = (0..50).map(|i| format!("r{i}@many.test")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let mut sent = 0;
    while rotated().is_empty() {
        assert!(sent < 15, "no rotation after {sent} messages");
        submit(&relay, &rcpts, "batch", "Batch body.\r\n").await;
        sent += 1;
        wait_audit(&relay, 30, "batch delivered", |lines| {
            lines.iter().filter(|l| l["event"] == "delivered").count() >= 50 * sent
                || !rotated().is_empty()
        })
        .await;
    }
    wait_queue_empty(&relay, 30).await;
    let file = rotated()[0].clone();
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    let base = w.dir.path().join("audit-copies");
    // The untouched copy verifies.
    let clean = base.join("clean");
    copy_dir(&audit_dir, &clean);
    let (ok, text) = verify_copy(&relay, &clean);
    assert!(ok, "clean copy fails: {text}");
    let lines_of = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join(&name))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let write = |dir: &Path, lines: &[String]| {
        std::fs::write(dir.join(&name), lines.join("\n") + "\n").unwrap();
    };
    let cases: [(&str, Tamper); 3] = [
        ("edit", |l| {
            // one byte: the year of the timestamp on line 3
            let i = l[2].find("\"ts\":\"").unwrap() + 6;
            let mut b = l[2].clone().into_bytes();
            b[i] = if b[i] == b'2' { b'3' } else { b'2' };
            l[2] = String::from_utf8(b).unwrap();
        }),
        ("delete", |l| {
            l.remove(2);
        }),
        ("swap", |l| l.swap(2, 3)),
    ];
    for (what, tamper) in cases {
        let dir = base.join(what);
        copy_dir(&audit_dir, &dir);
        let mut lines = lines_of(&dir);
        assert!(lines.len() > 10);
        tamper(&mut lines);
        write(&dir, &lines);
        let (ok, text) = verify_copy(&relay, &dir);
        assert!(!ok, "{what}: verify passed:\n{text}");
        assert!(text.contains(&name), "{what}: file not named:\n{text}");
        assert!(text.contains("line 3"), "{what}: line not named:\n{text}");
    }
}
