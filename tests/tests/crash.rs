//! Issue 3's crash test: concurrent clients submit 2,000 messages while the real relay is killed
//! with SIGKILL at three random points; after each restart the relay goes on. In the end every
//! message that got a `250` must have reached the test receiver exactly once (a duplicate is only
//! possible for a message that was being delivered at a kill; those are counted and bounded),
//! and the audit log must hold exactly one `accepted` record for each, ahead of its delivery.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use sealpost_tests::dns::DnsServer;
use sealpost_tests::receiver::{default_tls, Receiver};
use sealpost_tests::*;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOTAL: usize = 2_000;
const CLIENTS: usize = 8;
const KILLS: usize = 3;
/// `delivery.max_connections`.
const MAX_DELIVERY_CONNECTIONS: usize = 4;
/// Messages the engine may hold between lease and recorded outcome (docs/architecture.md): twice
/// its connections being delivered plus twice that many delivered and awaiting their record.
/// Each one delivered but not yet recorded when the relay is killed is delivered again after the
/// restart, so this bounds the duplicates per kill.
const MAX_IN_FLIGHT: usize = 2 * MAX_DELIVERY_CONNECTIONS + 4 * MAX_DELIVERY_CONNECTIONS;
const FROM: &str = "billing@clinic.example";
const TO: &str = "patient@crash.test";

fn random_kill_points() -> Vec<usize> {
    let mut points = BTreeSet::new();
    let state = std::collections::hash_map::RandomState::new();
    let mut i = 0u64;
    while points.len() < KILLS {
        let mut h = state.build_hasher();
        h.write_u64(i);
        i += 1;
        // Somewhere between 10% and 90% of the run, at least 100 apart.
        let p = TOTAL / 10 + (h.finish() as usize) % (TOTAL * 8 / 10);
        if points.iter().all(|q: &usize| q.abs_diff(p) >= 100) {
            points.insert(p);
        }
    }
    points.into_iter().collect()
}

/// One client: submits numbered messages until `TOTAL` are acknowledged, reconnecting after kills.
async fn client(
    relay_addr: std::net::SocketAddr,
    ca: String,
    next: Arc<AtomicUsize>,
    acked: Arc<Mutex<Vec<(usize, String)>>>,
    done: Arc<AtomicBool>,
) {
    let deadline = Instant::now() + Duration::from_secs(600);
    'connect: while !done.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "client gave up: relay never came back"
        );
        let session = async {
            let mut c = SmtpClient::connect(relay_addr).await.ok()?;
            c.greeting().await.ok()?;
            c.ehlo("crash.client").await.ok()?;
            c.starttls(&ca, RELAY_HOSTNAME).await.ok()?;
            c.ehlo("crash.client").await.ok()?;
            let r = c.auth_plain(DEFAULT_USER, DEFAULT_PASSWORD).await.ok()?;
            (r.code == 235).then_some(c)
        }
        .await;
        let Some(mut c) = session else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !done.load(Ordering::SeqCst) {
            let n = next.fetch_add(1, Ordering::SeqCst);
            let msg = message(
                FROM,
                TO,
                "crash test",
                &format!("crash-msg-{n}-end\r\nline two"),
            );
            match c.submit(FROM, &[TO], &msg).await {
                Ok(r) if queue_id_of(&r).is_some() => {
                    let id = queue_id_of(&r).unwrap_or_default();
                    let mut a = acked.lock().unwrap();
                    a.push((n, id));
                    if a.len() >= TOTAL {
                        done.store(true, Ordering::SeqCst);
                    }
                }
                // No 250: not acknowledged (the relay was killed or is going down); reconnect.
                _ => continue 'connect,
            }
        }
    }
}

fn delivered_numbers(rx: &Receiver) -> HashMap<usize, usize> {
    let mut counts = HashMap::new();
    for m in rx.received() {
        let text = String::from_utf8_lossy(&m.data);
        if let Some(rest) = text.split("crash-msg-").nth(1) {
            if let Some(n) = rest
                .split("-end")
                .next()
                .and_then(|s| s.parse::<usize>().ok())
            {
                *counts.entry(n).or_insert(0) += 1;
            }
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_message_survives_three_sigkills_and_is_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("mx-ca"));
    let dns = DnsServer::start().await;
    let port = relay::free_port().port();
    let mx_ip = Ipv4Addr::new(127, 0, 0, 77);
    dns.mx_at("crash.test", "mx.crash.test", mx_ip);
    let leaf = ca.issue("mx", &LeafSpec::new(&["mx.crash.test"]));
    let rx = Receiver::start(
        IpAddr::V4(mx_ip),
        port,
        "mx.crash.test",
        default_tls(&leaf),
        &[],
    )
    .await;

    let cfg = RelayConfig {
        env: vec![
            ("SEALPOST_DNS__NAMESERVERS".into(), dns.nameservers_toml()),
            ("SEALPOST_DELIVERY__PORT".into(), port.to_string()),
            (
                "SEALPOST_DELIVERY__MAX_CONNECTIONS".into(),
                MAX_DELIVERY_CONNECTIONS.to_string(),
            ),
            (
                "SEALPOST_DELIVERY__TRUST_ANCHORS".into(),
                format!("[\"{}\"]", ca.root_pem_path().display()),
            ),
        ],
        ..RelayConfig::default()
    }
    .queue("retry", "[\"1s\"]");
    let mut relay = Relay::start(cfg);

    let kill_points = random_kill_points();
    println!("kill points (acknowledged count): {kill_points:?}");
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(client(
            relay.starttls,
            relay.ca_pem().to_string(),
            next.clone(),
            acked.clone(),
            done.clone(),
        )));
    }
    for point in &kill_points {
        let deadline = Instant::now() + Duration::from_secs(300);
        while acked.lock().unwrap().len() < *point {
            assert!(
                Instant::now() < deadline,
                "stuck before kill point {point}:\n{}",
                relay.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::task::block_in_place(|| {
            relay.sigkill();
            relay.restart();
        });
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked_ids: Vec<(usize, String)> = acked.lock().unwrap().clone();
    let acked: Vec<usize> = acked_ids.iter().map(|(n, _)| *n).collect();
    assert!(acked.len() >= TOTAL);

    // Wait until every acknowledged message has arrived (bounded).
    let deadline = Instant::now() + Duration::from_secs(300);
    let counts = loop {
        let counts = delivered_numbers(&rx);
        if acked.iter().all(|n| counts.contains_key(n)) {
            break counts;
        }
        if Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let lost: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|n| !counts.contains_key(n))
        .collect();
    let duplicates: usize = counts.values().filter(|c| **c > 1).map(|c| c - 1).sum();
    let unacked_delivered = counts.keys().filter(|n| !acked.contains(n)).count();
    println!(
        "acknowledged {} / delivered {} / lost {} / duplicates {} / delivered without 250 {}",
        acked.len(),
        acked.iter().filter(|n| counts.contains_key(n)).count(),
        lost.len(),
        duplicates,
        unacked_delivered
    );
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {lost:?}\n{}",
        relay.log_tail(40)
    );
    assert!(
        duplicates <= KILLS * MAX_IN_FLIGHT,
        "{duplicates} duplicates: more than could have been mid-delivery at {KILLS} kills"
    );
    // The queue drains: nothing acknowledged is left behind.
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.message_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "queue did not drain: {}",
            relay.message_count()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        relay.cli(&["audit", "verify"]).status.code(),
        Some(0),
        "audit chain intact after kills"
    );
    // Every acknowledged message has exactly one `accepted` record (committed with it, so no
    // kill can lose it; replayed once at most after one), and no message has two; each comes
    // before the first record of the message's delivery.
    let lines = relay.audit_lines();
    let mut accepted: HashMap<String, usize> = HashMap::new();
    let mut first_event: HashMap<String, String> = HashMap::new();
    for line in &lines {
        let (Some(event), Some(id)) = (line["event"].as_str(), line["queue_id"].as_str()) else {
            continue;
        };
        first_event
            .entry(id.to_string())
            .or_insert_with(|| event.to_string());
        if event == "accepted" {
            *accepted.entry(id.to_string()).or_default() += 1;
        }
    }
    let replayed = lines
        .iter()
        .filter(|l| l["outbox"].is_u64() && l["at"].is_string())
        .count();
    println!("{} audit lines; {replayed} through the outbox", lines.len());
    for line in relay
        .logs()
        .lines()
        .filter(|l| l.contains("before an unclean stop"))
    {
        println!("replay at a restart: {line}");
    }
    for (n, id) in &acked_ids {
        assert_eq!(
            accepted.get(id).copied(),
            Some(1),
            "message {n} ({id}) has not exactly one `accepted` record"
        );
        assert_eq!(
            first_event.get(id).map(String::as_str),
            Some("accepted"),
            "message {n} ({id}): a record came before `accepted`"
        );
    }
    let doubled: Vec<_> = accepted.iter().filter(|(_, c)| **c > 1).collect();
    assert!(doubled.is_empty(), "`accepted` recorded twice: {doubled:?}");
}
