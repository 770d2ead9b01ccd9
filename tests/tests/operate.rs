//! Black-box tests of operating the daemon (issue 6): SIGHUP reload, SIGTERM drain, systemd
//! notifications, the metrics endpoint. The real `sealpost serve`, real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use sealpost_tests::dns::DnsServer;
use sealpost_tests::receiver::{default_tls, Receiver};
use sealpost_tests::relay::free_port;
use sealpost_tests::*;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const FROM: &str = "billing@clinic.example";
const TO: &str = "patient@example.net";

async fn authed(relay: &Relay, user: &str, password: &str) -> SmtpClient {
    let mut c = SmtpClient::connect(relay.starttls).await.unwrap();
    c.greeting().await.unwrap();
    c.ehlo("client.test").await.unwrap();
    c.starttls(relay.ca_pem(), RELAY_HOSTNAME).await.unwrap();
    c.ehlo("client.test").await.unwrap();
    c.auth_plain(user, password)
        .await
        .unwrap()
        .assert(235, "2.7.0");
    c
}

fn signal(relay: &Relay, sig: &str) {
    let pid = relay.pid().expect("relay runs");
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// Waits until an audit record satisfies `pred`; panics with the log tail after `timeout`.
fn wait_audit(
    relay: &Relay,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = relay.audit_lines().into_iter().find(|v| pred(v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no audit record {what}; log:\n{}",
            relay.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of an un-labelled (or exactly-labelled) sample in Prometheus text output.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok()).flatten()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_config_and_refuses_a_bad_one_keeping_sessions() {
    let relay = Relay::start(RelayConfig::default());
    // A session open across the reload keeps working.
    let mut old_session = authed(&relay, DEFAULT_USER, DEFAULT_PASSWORD).await;

    let original = std::fs::read_to_string(relay.config_path()).unwrap();
    let second = hash_password("second-app-password");
    let good = format!(
        "{original}\n[[users]]\nname = \"second-app\"\npassword_hash = \"{second}\"\nallowed_senders = [\"*\"]\n"
    );
    std::fs::write(relay.config_path(), &good).unwrap();
    signal(&relay, "HUP");
    wait_audit(&relay, Duration::from_secs(10), "config_reloaded ok", |v| {
        v["event"] == "config_reloaded" && v["detail"]["result"] == "ok"
    });
    let mut c = authed(&relay, "second-app", "second-app-password").await;
    let r = c
        .submit(FROM, &[TO], &message(FROM, TO, "after reload", "x"))
        .await
        .unwrap();
    assert!(queue_id_of(&r).is_some(), "new user after reload: {r}");
    let r = old_session
        .submit(FROM, &[TO], &message(FROM, TO, "old session", "x"))
        .await
        .unwrap();
    assert!(
        queue_id_of(&r).is_some(),
        "session opened before the reload: {r}"
    );

    // A bad config is refused; the previous one stays in force.
    std::fs::write(
        relay.config_path(),
        good.replace("[queue]\n", "[queue]\nlifetime = \"5 fortnights\"\n"),
    )
    .unwrap();
    signal(&relay, "HUP");
    let refused = wait_audit(
        &relay,
        Duration::from_secs(10),
        "config_reloaded refused",
        |v| v["event"] == "config_reloaded" && v["detail"]["result"] == "refused",
    );
    let err = refused["detail"]["error"].as_str().unwrap();
    assert!(
        err.contains("queue.lifetime"),
        "the refusal names the key: {err}"
    );
    relay.wait_logs("configuration reload refused", Duration::from_secs(10));
    let mut c = authed(&relay, "second-app", "second-app-password").await;
    let r = c
        .submit(FROM, &[TO], &message(FROM, TO, "still running", "x"))
        .await
        .unwrap();
    assert!(queue_id_of(&r).is_some(), "after a refused reload: {r}");
    // The CLI reads the file too: put the good one back to ask the running relay.
    std::fs::write(relay.config_path(), &good).unwrap();
    assert_eq!(relay.message_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_loses_nothing_acknowledged() {
    // A real destination: DNS says patient domain -> mx at 127.0.0.78, a verified receiver there.
    let dir = tempfile::tempdir().unwrap();
    let mx_ca = TestCa::new(&dir.path().join("mx-ca"));
    let dns = DnsServer::start().await;
    let port = free_port().port();
    let mx_ip = Ipv4Addr::new(127, 0, 0, 78);
    dns.mx_at("example.net", "mx.example.net", mx_ip);
    let leaf = mx_ca.issue("mx", &LeafSpec::new(&["mx.example.net"]));
    let rx = Receiver::start(
        IpAddr::V4(mx_ip),
        port,
        "mx.example.net",
        default_tls(&leaf),
        &[],
    )
    .await;
    let cfg = RelayConfig {
        env: vec![
            ("SEALPOST_DNS__NAMESERVERS".into(), dns.nameservers_toml()),
            ("SEALPOST_DELIVERY__PORT".into(), port.to_string()),
            (
                "SEALPOST_DELIVERY__TRUST_ANCHORS".into(),
                format!("[\"{}\"]", mx_ca.root_pem_path().display()),
            ),
        ],
        ..RelayConfig::default()
    }
    .queue("retry", "[\"1s\"]");
    let mut relay = Relay::start(cfg);

    let acked = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let mut clients = Vec::new();
    for i in 0..8 {
        let acked = Arc::clone(&acked);
        let (addr, ca) = (relay.starttls, relay.ca_pem().to_string());
        clients.push(tokio::spawn(async move {
            let mut c = SmtpClient::connect(addr).await.unwrap();
            c.greeting().await.unwrap();
            c.ehlo("load.test").await.unwrap();
            c.starttls(&ca, RELAY_HOSTNAME).await.unwrap();
            c.ehlo("load.test").await.unwrap();
            c.auth_plain(DEFAULT_USER, DEFAULT_PASSWORD)
                .await
                .unwrap()
                .assert(235, "2.7.0");
            let mut shut_down = false;
            for n in 0..10_000 {
                let marker = format!("load-{i}-{n}-end");
                let body =
                    format!("{marker}\r\n") + &"filler line of a load message\r\n".repeat(40);
                match c
                    .submit(FROM, &[TO], &message(FROM, TO, "load", &body))
                    .await
                {
                    Ok(r) => match queue_id_of(&r) {
                        Some(id) => acked.lock().unwrap().push((id, marker)),
                        None => {
                            // Only the shutdown reply may refuse a message here.
                            assert_eq!(r.code, 421, "unexpected reply under load: {r}");
                            assert_eq!(r.enhanced(), Some("4.3.2"), "{r}");
                            shut_down = true;
                            break;
                        }
                    },
                    Err(_) => {
                        shut_down = true;
                        break;
                    }
                }
            }
            assert!(shut_down, "client {i} never saw the shutdown");
        }));
    }
    // Let the load run, then stop the relay in the middle of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 40 {
        assert!(
            Instant::now() < deadline,
            "load did not start:\n{}",
            relay.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = tokio::task::block_in_place(|| relay.sigterm());
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}\n{}",
        relay.log_tail(20)
    );
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let stopped = relay
        .audit_lines()
        .iter()
        .filter(|v| v["event"] == "stopped")
        .count();
    assert_eq!(stopped, 1, "one `stopped` audit record");

    // After a restart everything acknowledged is delivered, nothing twice.
    tokio::task::block_in_place(|| relay.restart());
    let deadline = Instant::now() + Duration::from_secs(120);
    let delivered = loop {
        let texts: Vec<String> = rx
            .received()
            .iter()
            .map(|m| String::from_utf8_lossy(&m.data).into_owned())
            .collect();
        let delivered: Vec<&(String, String)> = acked
            .iter()
            .filter(|(_, marker)| texts.iter().any(|t| t.contains(marker.as_str())))
            .collect();
        if delivered.len() == acked.len() || Instant::now() > deadline {
            let dupes = acked
                .iter()
                .filter(|(_, marker)| {
                    texts.iter().filter(|t| t.contains(marker.as_str())).count() > 1
                })
                .count();
            break (delivered.len(), dupes);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "acknowledged {} / delivered {} / lost {} / duplicates {}",
        acked.len(),
        delivered.0,
        acked.len() - delivered.0,
        delivered.1
    );
    assert_eq!(
        delivered.0,
        acked.len(),
        "acknowledged but not delivered after SIGTERM and restart"
    );
    assert_eq!(delivered.1, 0, "a graceful stop must not cause duplicates");
}

/// Logs going to a file or journald (not a terminal) carry no colour codes, so `key=value`
/// fields can be matched as written.
#[test]
fn human_logs_off_a_terminal_are_plain_text() {
    let relay = Relay::start(RelayConfig::default());
    // the accept loop logs its address just after the port answers
    let wanted = format!("address={}", relay.starttls);
    let logs = relay.wait_logs(&wanted, Duration::from_secs(10));
    assert!(
        !logs.contains('\u{1b}'),
        "escape codes in a log file: {logs:?}"
    );
}

/// `--log-format json` writes one JSON object per line.
#[test]
fn json_log_format() {
    let relay = Relay::start(RelayConfig::default());
    let dir = tempfile::tempdir().unwrap();
    // A second config on other ports and another state dir, started by hand with the flag.
    let text = std::fs::read_to_string(relay.config_path()).unwrap();
    let (a, b) = (free_port(), free_port());
    let text = text
        .replace(&relay.starttls.to_string(), &a.to_string())
        .replace(&relay.implicit.to_string(), &b.to_string())
        .replace(
            &relay.state_dir().display().to_string(),
            &dir.path().join("state").display().to_string(),
        );
    let cfg = dir.path().join("json.toml");
    std::fs::write(&cfg, text).unwrap();
    let child = Command::new(sealpost_bin())
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(a).is_err() {
        assert!(Instant::now() < deadline, "json relay did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    assert!(text.contains("sealpost ready"));
}

#[test]
fn systemd_notify_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut cfg = RelayConfig::default();
    cfg.env
        .push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    cfg.env.push(("WATCHDOG_USEC".into(), "400000".into()));
    let mut relay = Relay::start(cfg);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().any(|m| m.contains("WATCHDOG=1")))
    {
        assert!(Instant::now() < deadline, "notifications so far: {seen:?}");
        let n = sock.recv(&mut buf).unwrap();
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    let ready = seen.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(seen[ready].contains("STATUS="), "{seen:?}");
    // READY comes only once the listeners accept (the harness waited for them) and the queue is open.
    assert!(relay.message_count() == 0);
    let status = relay.sigterm();
    assert!(status.success());
    let mut stopping = false;
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_messages_flow() {
    let http = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mx_ca = TestCa::new(&dir.path().join("mx-ca"));
    let dns = DnsServer::start().await;
    let port = free_port().port();
    let mx_ip = Ipv4Addr::new(127, 0, 0, 80);
    dns.mx_at("example.net", "mx.example.net", mx_ip);
    let leaf = mx_ca.issue("mx", &LeafSpec::new(&["mx.example.net"]));
    let _rx = Receiver::start(
        IpAddr::V4(mx_ip),
        port,
        "mx.example.net",
        default_tls(&leaf),
        &[],
    )
    .await;
    let cfg = RelayConfig {
        extra_toml: format!("[admin]\nhttp = \"{http}\"\n"),
        env: vec![
            ("SEALPOST_DNS__NAMESERVERS".into(), dns.nameservers_toml()),
            ("SEALPOST_DELIVERY__PORT".into(), port.to_string()),
            (
                "SEALPOST_DELIVERY__TRUST_ANCHORS".into(),
                format!("[\"{}\"]", mx_ca.root_pem_path().display()),
            ),
        ],
        ..RelayConfig::default()
    };
    let relay = Relay::start(cfg);
    let (status, body) = tokio::task::block_in_place(|| http_get(http, "/healthz"));
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, before) = tokio::task::block_in_place(|| http_get(http, "/metrics"));
    assert_eq!(status, 200);
    assert_eq!(
        sample(&before, "sealpost_messages_accepted_total").unwrap_or(0.0),
        0.0
    );

    let mut c = authed(&relay, DEFAULT_USER, DEFAULT_PASSWORD).await;
    for i in 0..3 {
        let r = c
            .submit(
                FROM,
                &[TO, "second@example.net"],
                &message(FROM, TO, "m", &format!("{i}")),
            )
            .await
            .unwrap();
        assert!(queue_id_of(&r).is_some(), "{r}");
    }
    let bad = c.auth_plain("nobody", "wrong").await.unwrap();
    assert_eq!(bad.code, 503, "already authenticated: {bad}");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, m) = tokio::task::block_in_place(|| http_get(http, "/metrics"));
        let accepted = sample(&m, "sealpost_messages_accepted_total");
        let rcpts = sample(&m, "sealpost_recipients_accepted_total");
        let open = sample(&m, "sealpost_sessions_open");
        let latency = sample(&m, "sealpost_acceptance_seconds_count");
        let delivered = sample(&m, "sealpost_recipients_total{outcome=\"delivered\"}");
        let verified = sample(&m, "sealpost_tls_verdicts_total{verdict=\"verified\"}");
        let delivery_latency = sample(&m, "sealpost_delivery_seconds_count");
        // with free slots, each new message goes straight from the queue to delivery
        let handed = sample(&m, "sealpost_deliveries_started_total{via=\"handoff\"}");
        // The queue gauge is refreshed every 5 s; once everything is delivered it reads 0.
        let queued = sample(&m, "sealpost_queue_messages");
        if accepted == Some(3.0)
            && rcpts == Some(6.0)
            && open == Some(1.0)
            && latency == Some(3.0)
            && delivered == Some(6.0)
            && verified.is_some_and(|v| v >= 1.0)
            && delivery_latency == Some(6.0)
            && handed == Some(3.0)
            && queued == Some(0.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics did not reach the expected values: accepted={accepted:?} rcpts={rcpts:?} open={open:?} latency_count={latency:?} delivered={delivered:?} verified={verified:?} delivery_latency={delivery_latency:?} handed={handed:?} queued={queued:?}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.cmd("QUIT").await.unwrap();
}

/// SIGHUP reaches delivery too: a destination held because its CA is not trusted is delivered
/// once the CA is added to `delivery.trust_anchors` and the relay reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_delivery_trust_anchors() {
    let dir = tempfile::tempdir().unwrap();
    let partner_ca = TestCa::new(&dir.path().join("partner-ca"));
    let dns = DnsServer::start().await;
    let port = free_port().port();
    let mx_ip = Ipv4Addr::new(127, 0, 0, 79);
    dns.mx_at("example.net", "mx.example.net", mx_ip);
    let leaf = partner_ca.issue("mx", &LeafSpec::new(&["mx.example.net"]));
    let rx = Receiver::start(
        IpAddr::V4(mx_ip),
        port,
        "mx.example.net",
        default_tls(&leaf),
        &[],
    )
    .await;
    let cfg = RelayConfig {
        env: vec![
            ("SEALPOST_DNS__NAMESERVERS".into(), dns.nameservers_toml()),
            ("SEALPOST_DELIVERY__PORT".into(), port.to_string()),
        ],
        ..RelayConfig::default()
    }
    .queue("retry", "[\"1s\"]");
    let relay = Relay::start(cfg);
    let mut c = authed(&relay, DEFAULT_USER, DEFAULT_PASSWORD).await;
    let r = c
        .submit(FROM, &[TO], &message(FROM, TO, "partner", "reload me"))
        .await
        .unwrap();
    let id = queue_id_of(&r).unwrap();
    wait_audit(
        &relay,
        Duration::from_secs(20),
        "unknown_issuer attempt",
        |v| {
            v["event"] == "attempt"
                && v["queue_id"] == id.as_str()
                && v["tls"]["reason"] == "unknown_issuer"
        },
    );
    assert!(!rx.got_data(), "nothing delivered to an untrusted MX");

    let text = std::fs::read_to_string(relay.config_path()).unwrap();
    let text = text.replacen(
        "[delivery]\n",
        &format!(
            "[delivery]\ntrust_anchors = [\"{}\"]\n",
            partner_ca.root_pem_path().display()
        ),
        1,
    );
    std::fs::write(relay.config_path(), text).unwrap();
    signal(&relay, "HUP");
    wait_audit(&relay, Duration::from_secs(10), "config_reloaded ok", |v| {
        v["event"] == "config_reloaded" && v["detail"]["result"] == "ok"
    });
    wait_audit(
        &relay,
        Duration::from_secs(30),
        "delivered after reload",
        |v| v["event"] == "delivered" && v["queue_id"] == id.as_str(),
    );
    assert!(rx.got_data());
}

/// The queue-depth gauges follow the queue (delivery paused, so the messages stay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_gauges_follow_the_queue() {
    let http = free_port();
    let relay = Relay::start(RelayConfig {
        extra_toml: format!("[admin]\nhttp = \"{http}\"\n"),
        env: vec![("SEALPOST_DELIVERY__PAUSED".into(), "true".into())],
        ..RelayConfig::default()
    });
    let mut c = authed(&relay, DEFAULT_USER, DEFAULT_PASSWORD).await;
    for i in 0..2 {
        let r = c
            .submit(FROM, &[TO], &message(FROM, TO, "gauge", &format!("{i}")))
            .await
            .unwrap();
        assert!(queue_id_of(&r).is_some(), "{r}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, m) = tokio::task::block_in_place(|| http_get(http, "/metrics"));
        let messages = sample(&m, "sealpost_queue_messages");
        let pending = sample(&m, "sealpost_queue_recipients{state=\"pending\"}");
        if messages == Some(2.0) && pending == Some(2.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queue gauges: messages={messages:?} pending={pending:?}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
