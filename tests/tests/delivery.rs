//! Black-box tests of delivery (issue 4): the real `sealpost serve` resolving MX records from an
//! in-process DNS server and delivering to test receivers on their own loopback addresses.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use rustls::CipherSuite;
use sealpost_tests::dns::DnsServer;
use sealpost_tests::receiver::{default_tls, server_config, Receiver, TlsMode};
use sealpost_tests::*;
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

const FROM: &str = "billing@clinic.example";

/// The relay's resolver, delivery port and trust anchors point at the test world.
struct World {
    dir: tempfile::TempDir,
    dns: DnsServer,
    ca: TestCa,
    port: u16,
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::with_intermediate(&dir.path().join("mx-ca"));
        World {
            dns: DnsServer::start().await,
            ca,
            port: relay::free_port().port(),
            dir,
        }
    }

    fn relay(&self) -> Relay {
        self.relay_with(|cfg| cfg)
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
            rust_log: "info,sealpost_delivery=debug".into(),
            ..RelayConfig::default()
        }
        .queue("retry", "[\"1s\"]");
        Relay::start(tweak(cfg))
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    /// `domain` has MX `mx.<domain>` at 127.0.0.`last`; a receiver there with `mode`.
    async fn receiver(&self, domain: &str, last: u8, mode: TlsMode, reject: &[&str]) -> Receiver {
        let host = format!("mx.{domain}");
        self.dns
            .mx_at(domain, &host, Ipv4Addr::new(127, 0, 0, last));
        Receiver::start(World::ip(last), self.port, &host, mode, reject).await
    }

    fn leaf(&self, stem: &str, host: &str) -> CertFiles {
        self.ca.issue(stem, &LeafSpec::new(&[host]))
    }
}

/// Submits one message through the relay's STARTTLS listener; returns its queue id and the bytes.
async fn submit(relay: &Relay, rcpts: &[&str], body: &str) -> (String, String) {
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
        "From: <{FROM}>\r\nTo: <{}>\r\nSubject: lab results\r\nMessage-ID: <t1@clinic.example>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n{body}",
        rcpts[0]
    );
    let reply = c.submit(FROM, rcpts, &msg).await.unwrap();
    let id = queue_id_of(&reply).unwrap_or_else(|| panic!("not 250 Ok <id>: {reply}"));
    (id, msg)
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
                relay.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn attempts_for<'a>(lines: &'a [Value], mx: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["event"] == "attempt" && l["mx"] == mx)
        .collect()
}

fn events_for<'a>(lines: &'a [Value], event: &str, rcpt: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["event"] == event && l["recipient"] == rcpt)
        .collect()
}

/// The message as the receiver must see it: what was submitted, after the relay's Received header.
fn assert_byte_exact(got: &[u8], submitted: &str) {
    let text = String::from_utf8(got.to_vec()).unwrap();
    assert!(
        text.starts_with("Received: "),
        "no Received header first:\n{text}"
    );
    // Skip the Received header (its folded continuation lines start with white space).
    let mut rest = &text[..];
    loop {
        let end = rest.find("\r\n").unwrap() + 2;
        rest = &rest[end..];
        if !rest.starts_with(' ') && !rest.starts_with('\t') {
            break;
        }
    }
    assert_eq!(rest, submitted, "body changed in transit");
}

/// A leaf for `host` issued by a root the relay does not trust, named unlike any trusted one.
fn untrusted_leaf(dir: &std::path::Path, host: &str) -> CertFiles {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "Untrusted Rogue Root");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec![host.to_string()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, host);
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let (chain_pem, key_pem) = (dir.join("chain.pem"), dir.join("key.pem"));
    std::fs::write(&chain_pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    let sha = certs::sha256_hex(cert.der());
    CertFiles {
        chain_pem,
        key_pem,
        leaf_der: cert.der().to_vec(),
        leaf_sha256: sha.clone(),
        chain_sha256: vec![sha],
    }
}

/// Recipient states from `sealpost queue show --json`, by address.
fn queue_states(relay: &Relay, id: &str) -> Value {
    relay.queue_json(&["show", id])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unsafe_receiver_is_blocked_and_held() {
    let w = World::new().await;
    let dir = w.dir.path().to_owned();
    let v12 = &[&rustls::version::TLS12][..];
    let both = &[&rustls::version::TLS12, &rustls::version::TLS13][..];
    let spec = |h: &str| LeafSpec::new(&[h.to_string()]);
    // (domain, expected verdict, receiver)
    let mut cases: Vec<(&str, &str, Receiver)> = Vec::new();
    let d = "selfsigned.test";
    let files = w.ca.self_signed("selfsigned", &spec("mx.selfsigned.test"));
    cases.push((
        d,
        "unknown_issuer",
        w.receiver(
            d,
            10,
            TlsMode::Rustls(server_config(&files, both, &[])),
            &[],
        )
        .await,
    ));
    let d = "expired.test";
    let files = w.ca.issue(
        "expired",
        &spec("mx.expired.test").validity(Validity::Expired),
    );
    cases.push((
        d,
        "expired",
        w.receiver(
            d,
            11,
            TlsMode::Rustls(server_config(&files, both, &[])),
            &[],
        )
        .await,
    ));
    let d = "future.test";
    let files = w.ca.issue(
        "future",
        &spec("mx.future.test").validity(Validity::NotYetValid),
    );
    cases.push((
        d,
        "not_yet_valid",
        w.receiver(
            d,
            12,
            TlsMode::Rustls(server_config(&files, both, &[])),
            &[],
        )
        .await,
    ));
    let d = "mismatch.test";
    let files = w.leaf("mismatch", "mx.elsewhere.test");
    cases.push((
        d,
        "name_mismatch",
        w.receiver(
            d,
            13,
            TlsMode::Rustls(server_config(&files, both, &[])),
            &[],
        )
        .await,
    ));
    let d = "rogue.test";
    let files = untrusted_leaf(&dir.join("rogue"), "mx.rogue.test");
    cases.push((
        d,
        "unknown_issuer",
        w.receiver(
            d,
            14,
            TlsMode::Rustls(server_config(&files, both, &[])),
            &[],
        )
        .await,
    ));
    let d = "chacha.test";
    let files =
        w.ca.issue("chacha", &spec("mx.chacha.test").key(KeyKind::Rsa2048));
    let chacha = [
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    cases.push((
        d,
        "no_shared_cipher",
        w.receiver(
            d,
            15,
            TlsMode::Rustls(server_config(&files, v12, &chacha)),
            &[],
        )
        .await,
    ));
    let d = "nostarttls.test";
    cases.push((
        d,
        "starttls_not_offered",
        w.receiver(d, 16, TlsMode::NoStarttls, &[]).await,
    ));
    let d = "refuse.test";
    cases.push((
        d,
        "starttls_refused",
        w.receiver(d, 17, TlsMode::Refuse454, &[]).await,
    ));
    let d = "dropped.test";
    cases.push((
        d,
        "connection_lost",
        w.receiver(d, 18, TlsMode::DropMidHandshake, &[]).await,
    ));
    for (d, flag, last) in [("tls10.test", "-tls1", 19u8), ("tls11.test", "-tls1_1", 20)] {
        let host = format!("mx.{d}");
        let files = w.ca.issue(
            d,
            &LeafSpec::new(std::slice::from_ref(&host)).key(KeyKind::Rsa2048),
        );
        w.dns.mx_at(d, &host, Ipv4Addr::new(127, 0, 0, last));
        let r = Receiver::start_openssl(World::ip(last), w.port, &host, &files, flag).await;
        cases.push((d, "protocol_version", r));
    }
    let relay = w.relay();
    let rcpts: Vec<String> = cases
        .iter()
        .map(|(d, _, _)| format!("patient@{d}"))
        .collect();
    let rcpt_refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let (id, _) = submit(&relay, &rcpt_refs, "Results attached.\r\n").await;

    // Every MX is tried at least twice (held, then retried after the 1s retry interval).
    let lines = wait_audit(&relay, 40, "two attempts per MX", |lines| {
        cases
            .iter()
            .all(|(d, _, _)| attempts_for(lines, &format!("mx.{d}")).len() >= 2)
    })
    .await;
    let mut wrong = Vec::new();
    for (d, verdict, receiver) in &cases {
        let mx = format!("mx.{d}");
        for a in attempts_for(&lines, &mx) {
            assert_eq!(a["queue_id"], id.as_str());
            assert_eq!(a["tls"]["verified"], false, "{d}: {a}");
            if a["tls"]["reason"] != *verdict {
                wrong.push(format!("{d}: expected {verdict}, got {}", a["tls"]));
            }
        }
        assert!(!receiver.got_data(), "{d}: receiver got DATA");
        assert!(
            !receiver
                .commands()
                .iter()
                .any(|c| c == "MAIL" || c == "RCPT"),
            "{d}: envelope sent: {:?}",
            receiver.commands()
        );
        assert!(receiver.connections() >= 2, "{d}: not retried");
        let rcpt = format!("patient@{d}");
        let diverted = events_for(&lines, "diverted", &rcpt);
        assert!(!diverted.is_empty(), "{d}: no diverted (held) record");
        assert_eq!(diverted[0]["detail"]["step"], "hold:4h", "{}", diverted[0]);
        assert!(events_for(&lines, "delivered", &rcpt).is_empty());
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
    // The queue keeps every recipient held, none delivered or failed.
    let shown = queue_states(&relay, &id).to_string();
    assert!(
        !shown.contains("Delivered") && !shown.contains("\"delivered\""),
        "{shown}"
    );
    assert_eq!(relay.message_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_receivers_get_the_message_byte_exact() {
    let w = World::new().await;
    // TLS 1.2 ECDHE-RSA AES-GCM with root -> intermediate -> leaf.
    let rsa = w.ca.issue(
        "rsa12",
        &LeafSpec::new(&["mx.rsa12.test"]).key(KeyKind::Rsa2048),
    );
    let gcm = [
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    let r12 = w
        .receiver(
            "rsa12.test",
            30,
            TlsMode::Rustls(server_config(&rsa, &[&rustls::version::TLS12], &gcm)),
            &[],
        )
        .await;
    // TLS 1.3 with ECDSA P-256.
    let ec = w.leaf("ec13", "mx.ec13.test");
    let r13 = w
        .receiver(
            "ec13.test",
            31,
            TlsMode::Rustls(server_config(&ec, &[&rustls::version::TLS13], &[])),
            &[],
        )
        .await;
    // First MX self-signed, second MX valid.
    let d = "twomx.test";
    w.dns.mx(d, 10, "bad.twomx.test");
    w.dns.address("bad.twomx.test", World::ip(32));
    w.dns.mx(d, 20, "good.twomx.test");
    w.dns.address("good.twomx.test", World::ip(33));
    let bad_files =
        w.ca.self_signed("twomx-bad", &LeafSpec::new(&["bad.twomx.test"]));
    let bad = Receiver::start(
        World::ip(32),
        w.port,
        "bad.twomx.test",
        default_tls(&bad_files),
        &[],
    )
    .await;
    let good_files = w.leaf("twomx-good", "good.twomx.test");
    let good = Receiver::start(
        World::ip(33),
        w.port,
        "good.twomx.test",
        default_tls(&good_files),
        &[],
    )
    .await;

    let relay = w.relay();
    let rcpts = [
        "patient@rsa12.test",
        "patient@ec13.test",
        "patient@twomx.test",
    ];
    // A line starting with a dot checks dot-stuffing both ways.
    let (id, submitted) = submit(
        &relay,
        &rcpts,
        "Line one.\r\n.leading dot\r\n..two dots\r\n",
    )
    .await;
    let lines = wait_audit(&relay, 30, "three deliveries", |lines| {
        rcpts
            .iter()
            .all(|r| !events_for(lines, "delivered", r).is_empty())
    })
    .await;
    for (r, version) in [(&r12, "TLSv1.2"), (&r13, "TLSv1.3"), (&good, "")] {
        let got = r.received();
        assert_eq!(got.len(), 1, "{:?}", r.addr);
        assert!(got[0].tls);
        assert_eq!(got[0].mail_from, FROM);
        assert_byte_exact(&got[0].data, &submitted);
        if !version.is_empty() {
            let host = if r.addr.ip() == World::ip(30) {
                "mx.rsa12.test"
            } else {
                "mx.ec13.test"
            };
            let a = attempts_for(&lines, host);
            assert_eq!(a.len(), 1);
            assert_eq!(a[0]["tls"]["reason"], "verified", "{}", a[0]);
            assert_eq!(a[0]["tls"]["tls"]["version"], version, "{}", a[0]);
        }
    }
    let a = attempts_for(&lines, "mx.rsa12.test");
    let cipher = a[0]["tls"]["tls"]["cipher"].as_str().unwrap();
    assert!(
        cipher.contains("ECDHE_RSA") && cipher.contains("GCM"),
        "{cipher}"
    );
    assert_eq!(
        a[0]["tls"]["tls"]["chain_sha256"].as_array().unwrap().len(),
        2,
        "leaf + intermediate"
    );
    let a = attempts_for(&lines, "mx.ec13.test");
    assert_eq!(a[0]["tls"]["tls"]["leaf"]["key"], "ECDSA-P256", "{}", a[0]);
    // The self-signed first MX was tried, refused, and got nothing.
    let first = attempts_for(&lines, "bad.twomx.test");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["tls"]["reason"], "unknown_issuer");
    assert!(!bad.got_data() && bad.received().is_empty());
    assert!(!bad.commands().iter().any(|c| c == "MAIL"));
    let second = attempts_for(&lines, "good.twomx.test");
    assert_eq!(second[0]["tls"]["reason"], "verified");
    // Delivered everywhere: the message leaves the queue.
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.message_count() != 0 {
        assert!(Instant::now() < deadline, "message {id} still queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second message to the same MX reuses the verified connection (no new handshake).
    let (_, second_msg) = submit(&relay, &["other@ec13.test"], "Second message.\r\n").await;
    let lines = wait_audit(&relay, 20, "second delivery", |lines| {
        !events_for(lines, "delivered", "other@ec13.test").is_empty()
    })
    .await;
    assert_eq!(r13.connections(), 1, "connection not reused");
    let got = r13.received();
    assert_eq!(got.len(), 2);
    assert_byte_exact(&got[1].data, &second_msg);
    assert_eq!(
        r13.commands(),
        ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA"],
        "the second transaction follows the first on the same session"
    );
    let reused = attempts_for(&lines, "mx.ec13.test");
    assert_eq!(reused.len(), 2);
    assert_eq!(reused[1]["detail"]["reused"], true, "{}", reused[1]);
    assert_eq!(reused[1]["tls"]["reason"], "verified");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_connection_the_mx_closed_is_replaced_at_once_with_pipelining() {
    let w = World::new().await;
    let files = w.leaf("idle", "mx.idle.test");
    let mx = w.receiver("idle.test", 34, default_tls(&files), &[]).await;
    mx.offer_pipelining();
    mx.hang_up_after_each_message();
    let relay = w.relay();
    let (first_id, first) = submit(&relay, &["a@idle.test", "c@idle.test"], "One.\r\n").await;
    wait_audit(&relay, 20, "first delivery", |lines| {
        !events_for(lines, "delivered", "a@idle.test").is_empty()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.message_count() != 0 {
        assert!(Instant::now() < deadline, "message {first_id} still queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, second) = submit(&relay, &["b@idle.test"], "Two.\r\n").await;
    let lines = wait_audit(&relay, 20, "second delivery", |lines| {
        !events_for(lines, "delivered", "b@idle.test").is_empty()
    })
    .await;
    // delivered once each; the second on a new connection, without waiting for a retry
    let got = mx.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].rcpt_to, ["a@idle.test", "c@idle.test"]);
    assert_byte_exact(&got[0].data, &first);
    assert_eq!(got[1].rcpt_to, ["b@idle.test"]);
    assert_byte_exact(&got[1].data, &second);
    assert_eq!(mx.connections(), 2);
    // pipelined (the receiver holds its MAIL and RCPT replies until DATA), no RSET
    assert_eq!(
        mx.commands(),
        [
            "EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "RCPT", "DATA", "EHLO", "STARTTLS", "EHLO",
            "MAIL", "RCPT", "DATA"
        ]
    );
    // first message on a new session; the second tried the cached one (which failed before
    // its first reply) and went out on a new, verified session
    let attempts = attempts_for(&lines, "mx.idle.test");
    assert_eq!(attempts.len(), 4, "{attempts:?}");
    assert!(attempts[0]["detail"]["reused"].is_null(), "{}", attempts[0]);
    assert_eq!(attempts[1]["detail"]["reused"], true, "{}", attempts[1]);
    assert_eq!(attempts[2]["detail"]["reused"], true, "{}", attempts[2]);
    let why = attempts[2]["detail"]["error"].as_str().unwrap_or_default();
    assert!(why.contains("no longer usable"), "{}", attempts[2]);
    assert!(attempts[3]["detail"]["reused"].is_null(), "{}", attempts[3]);
    assert_eq!(attempts[3]["tls"]["reason"], "verified");
    assert!(events_for(&lines, "deferred", "b@idle.test").is_empty());
}

/// The relay remembers MX and address answers (see dns.rs), but only for their TTL: once it has
/// run out, a domain whose MX moved is delivered to the new MX.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_that_moved_is_followed_once_its_ttl_runs_out() {
    let w = World::new().await;
    w.dns.set_ttl(1);
    let old_files = w.leaf("ttl-old", "mx.ttl.test");
    let old = w
        .receiver("ttl.test", 35, default_tls(&old_files), &[])
        .await;
    let new_host = "mx2.ttl.test";
    let new_files = w.leaf("ttl-new", new_host);
    let new = Receiver::start(
        World::ip(36),
        w.port,
        new_host,
        default_tls(&new_files),
        &[],
    )
    .await;
    let relay = w.relay();
    let (_, first) = submit(&relay, &["a@ttl.test"], "One.\r\n").await;
    wait_audit(&relay, 20, "first delivery", |lines| {
        !events_for(lines, "delivered", "a@ttl.test").is_empty()
    })
    .await;
    // the MX moves; the old one keeps running (and the relay keeps its connection to it)
    w.dns
        .withdraw("ttl.test", hickory_proto::rr::RecordType::MX);
    w.dns.mx("ttl.test", 10, new_host);
    w.dns.address(new_host, World::ip(36));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, second) = submit(&relay, &["b@ttl.test"], "Two.\r\n").await;
    wait_audit(&relay, 20, "second delivery", |lines| {
        !events_for(lines, "delivered", "b@ttl.test").is_empty()
    })
    .await;
    let got_old = old.received();
    assert_eq!(got_old.len(), 1, "{got_old:?}");
    assert_byte_exact(&got_old[0].data, &first);
    let got_new = new.received();
    assert_eq!(got_new.len(), 1, "{got_new:?}");
    assert_eq!(got_new[0].rcpt_to, ["b@ttl.test"]);
    assert_byte_exact(&got_new[0].data, &second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_outcomes_and_per_recipient_results() {
    let w = World::new().await;
    w.dns.null_mx("nullmx.test");
    // No MX, only an A record: the implicit MX is the domain itself.
    w.dns.address("implicit.test", World::ip(40));
    let implicit_files = w.leaf("implicit", "implicit.test");
    let implicit = Receiver::start(
        World::ip(40),
        w.port,
        "implicit.test",
        default_tls(&implicit_files),
        &[],
    )
    .await;
    w.dns.servfail("servfail.test");
    // An MX whose host has no address: deferred (temporary), not held, nothing judged.
    w.dns.mx("noaddr.test", 10, "mx.noaddr.test");
    let mixed_files = w.leaf("mixed", "mx.mixed.test");
    let mixed = w
        .receiver(
            "mixed.test",
            41,
            default_tls(&mixed_files),
            &["unknown@mixed.test"],
        )
        .await;
    // An MX that is this relay itself is a loop: deferred, never connected.
    w.dns
        .mx_at("loop.test", RELAY_HOSTNAME, Ipv4Addr::new(127, 0, 0, 42));
    let looped = Receiver::start(
        World::ip(42),
        w.port,
        RELAY_HOSTNAME,
        TlsMode::NoStarttls,
        &[],
    )
    .await;
    let relay = w.relay();
    let rcpts = [
        "d@loop.test",
        "e@nxdomain.test",
        "f@noaddr.test",
        "a@nullmx.test",
        "b@implicit.test",
        "c@servfail.test",
        "unknown@mixed.test",
        "known@mixed.test",
    ];
    let (id, submitted) = submit(&relay, &rcpts, "Appointment reminder.\r\n").await;
    let lines = wait_audit(&relay, 30, "outcomes", |lines| {
        !events_for(lines, "bounced", "a@nullmx.test").is_empty()
            && !events_for(lines, "bounced", "e@nxdomain.test").is_empty()
            && !events_for(lines, "deferred", "f@noaddr.test").is_empty()
            && !events_for(lines, "delivered", "b@implicit.test").is_empty()
            && events_for(lines, "deferred", "c@servfail.test").len() >= 2
            && !events_for(lines, "bounced", "unknown@mixed.test").is_empty()
            && !events_for(lines, "delivered", "known@mixed.test").is_empty()
    })
    .await;
    // Null MX: failed with 5.1.10, never retried, never connected.
    let null = events_for(&lines, "bounced", "a@nullmx.test");
    assert_eq!(null.len(), 1, "null MX retried: {null:?}");
    assert!(
        null[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("5.1.10"),
        "{}",
        null[0]
    );
    assert!(attempts_for(&lines, "nullmx.test").is_empty());
    // NXDOMAIN: failed with 5.1.2, never retried.
    let nx = events_for(&lines, "bounced", "e@nxdomain.test");
    assert_eq!(nx.len(), 1, "{nx:?}");
    assert!(
        nx[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("5.1.2"),
        "{}",
        nx[0]
    );
    let na = events_for(&lines, "deferred", "f@noaddr.test");
    let reason = na[0]["detail"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("4.4.3 no address for any MX"),
        "{reason}"
    );
    assert!(events_for(&lines, "diverted", "f@noaddr.test").is_empty());
    // Implicit MX delivered.
    assert_eq!(implicit.received().len(), 1);
    assert_byte_exact(&implicit.received()[0].data, &submitted);
    // SERVFAIL: deferred (and retried), not failed.
    let sf = events_for(&lines, "deferred", "c@servfail.test");
    assert!(
        sf[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("4.4.3"),
        "{}",
        sf[0]
    );
    assert!(events_for(&lines, "bounced", "c@servfail.test").is_empty());
    // 550 for one recipient, 250 for the other, in one transaction.
    let got = mixed.received();
    assert_eq!(got.len(), 1, "one transaction");
    assert_eq!(got[0].rcpt_to, vec!["known@mixed.test".to_string()]);
    let bounced = events_for(&lines, "bounced", "unknown@mixed.test");
    assert!(
        bounced[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("550 5.1.1"),
        "{}",
        bounced[0]
    );
    // The loop: deferred with 4.4.6, audited, never connected.
    let lines = wait_audit(&relay, 10, "loop deferral", |lines| {
        !events_for(lines, "deferred", "d@loop.test").is_empty()
    })
    .await;
    let lp = events_for(&lines, "deferred", "d@loop.test");
    assert!(
        lp[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("4.4.6"),
        "{}",
        lp[0]
    );
    assert!(attempts_for(&lines, RELAY_HOSTNAME)[0]["detail"]["error"]
        .as_str()
        .unwrap()
        .contains("loop"));
    assert_eq!(looped.connections(), 0);
    relay.wait_logs("MAIL LOOP", Duration::from_secs(10));
    // The queue keeps only the SERVFAIL, loop and no-address recipients.
    let shown = queue_states(&relay, &id).to_string();
    assert!(
        shown.contains("servfail.test")
            && shown.contains("loop.test")
            && shown.contains("noaddr.test"),
        "{shown}"
    );
    // The DSNs for the failures go to clinic.example, which does not exist: they are
    // dropped (null sender, no bounce loop) and leave the queue.
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.message_count() != 1 {
        assert!(Instant::now() < deadline, "DSNs still queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_postfix_receives_the_message() {
    let w = World::new().await;
    let host = "mx.postfix.test";
    w.dns
        .mx_at("postfix.test", host, Ipv4Addr::new(127, 0, 0, 50));
    let files =
        w.ca.issue("postfix", &LeafSpec::new(&[host]).key(KeyKind::Rsa2048));
    let listen = std::net::SocketAddr::new(World::ip(50), w.port);
    let pf = tokio::task::spawn_blocking(move || {
        postfix::Postfix::start(postfix::PostfixOptions {
            listen,
            hostname: host.into(),
            cert_chain: files.chain_pem.clone(),
            key: files.key_pem.clone(),
            mailbox_domains: vec!["postfix.test".into()],
            extra_main_cf: Vec::new(),
        })
    })
    .await
    .unwrap();
    let relay = w.relay();
    let (_, submitted) = submit(
        &relay,
        &["patient@postfix.test"],
        "Hello from Sealpost.\r\n",
    )
    .await;
    let lines = wait_audit(&relay, 30, "delivery to postfix", |lines| {
        !events_for(lines, "delivered", "patient@postfix.test").is_empty()
    })
    .await;
    let a = attempts_for(&lines, host);
    assert_eq!(a[0]["tls"]["reason"], "verified", "{}", a[0]);
    let msgs = tokio::task::spawn_blocking(move || {
        let m = pf.wait_for_messages(1, Duration::from_secs(20));
        (m, pf)
    })
    .await
    .unwrap()
    .0;
    let stored = String::from_utf8_lossy(&msgs[0]).replace("\r\n", "\n");
    // Postfix stores LF line endings and adds its own trace headers on top.
    let expected_tail = submitted.replace("\r\n", "\n");
    assert!(stored.ends_with(&expected_tail), "stored:\n{stored}");
    assert!(stored.contains("Received: "), "{stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_ends_per_domain_policy_and_expiry() {
    let w = World::new().await;
    let short = w
        .receiver("shorthold.test", 60, TlsMode::NoStarttls, &[])
        .await;
    let _phi = w
        .receiver("phihold.test", 61, TlsMode::NoStarttls, &[])
        .await;
    let relay = w.relay_with(|mut cfg| {
        cfg.extra_toml.push_str(
            "[policies.short]\ntls = \"verified\"\non_failure = [\"hold:2s\", \"bounce\"]\n\n\
             [domains.\"shorthold.test\"]\npolicy = \"short\"\n",
        );
        cfg.queue("lifetime", "\"5s\"")
    });
    let (id, _) = submit(
        &relay,
        &["a@shorthold.test", "b@phihold.test"],
        "Reminder.\r\n",
    )
    .await;
    let lines = wait_audit(&relay, 20, "a bounced, b expired", |lines| {
        !events_for(lines, "bounced", "a@shorthold.test").is_empty()
            && !events_for(lines, "expired", "b@phihold.test").is_empty()
    })
    .await;
    // The domain override picked policy `short`; the message's own policy is `phi`.
    let a_held = events_for(&lines, "diverted", "a@shorthold.test");
    assert_eq!(a_held[0]["detail"]["policy"], "short");
    assert_eq!(a_held[0]["detail"]["step"], "hold:2s");
    let b_held = events_for(&lines, "diverted", "b@phihold.test");
    assert_eq!(b_held[0]["detail"]["policy"], "phi");
    assert_eq!(b_held[0]["detail"]["step"], "hold:4h");
    // After its 2s hold, `short` reaches `bounce`: diverted to the step, then bounced with a
    // DSN (queued as its own message) and not expired.
    let diverted = events_for(&lines, "diverted", "a@shorthold.test");
    assert!(
        diverted.iter().any(|d| d["detail"]["step"] == "bounce"),
        "{diverted:?}"
    );
    let bounced = events_for(&lines, "bounced", "a@shorthold.test");
    assert_eq!(bounced.len(), 1, "{bounced:?}");
    assert_eq!(bounced[0]["detail"]["status"], "5.7.10", "{}", bounced[0]);
    assert_eq!(bounced[0]["detail"]["dsn"].as_str().unwrap().len(), 32);
    assert!(events_for(&lines, "expired", "a@shorthold.test").is_empty());
    assert!(
        events_for(&lines, "deferred", "b@phihold.test").is_empty(),
        "phi hold is 4h"
    );
    assert!(
        short.connections() >= 2,
        "secure path not retried during the hold"
    );
    // Expired: failed with an `expired` record, and the message leaves the queue.
    let exp = events_for(&lines, "expired", "b@phihold.test");
    assert_eq!(exp[0]["queue_id"], id.as_str());
    assert!(exp[0]["detail"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("5.4.7"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.message_count() != 0 {
        assert!(Instant::now() < deadline, "expired message still queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
