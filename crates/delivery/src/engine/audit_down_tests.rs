//! The engine with an audit log that has failed, for real: nothing leaves without its record.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use sealpost_audit::{AuditLog, AuditOptions, Event, Record};
use sealpost_queue::{Queue, QueueId, StateCounts};
use sealpost_tests::dns::DnsServer;
use sealpost_tests::receiver::{default_tls, Receiver};
use sealpost_tests::{CertFiles, LeafSpec, TestCa};
use tokio::sync::watch;

use super::test_engine::{engine_with_audit, envelope, stop_engine};

/// An audit log in `dir` that fails at its next record: it rotates before every record after
/// its first, and the name its first rotation needs (`<stem>.<first seq, 20 digits>.jsonl`)
/// is taken. Until that record it has not failed.
async fn log_failing_at_next_record(dir: &Path) -> AuditLog {
    let path = dir.join("audit").join("audit.jsonl");
    let log = AuditLog::open(AuditOptions {
        path: path.clone(),
        rotate_bytes: 1,
    })
    .unwrap();
    log.record(Record::new(Event::Attempt).mx("mx.first.test"))
        .await
        .unwrap();
    std::fs::write(
        path.with_file_name(format!("audit.{:020}.jsonl", 1)),
        b"squatter\n",
    )
    .unwrap();
    assert!(!log.failed());
    log
}

/// Queues one small message to `pat@b.test`.
async fn enqueue_one(queue: &Queue) -> QueueId {
    queue
        .enqueue(
            envelope("app@clinic.test", "phi"),
            b"Subject: x\r\n\r\nbody\r\n".to_vec(),
        )
        .await
        .unwrap()
}

/// Once the audit log has failed, the engine leases no message (each stays pending, never in
/// flight), and it still stops when told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_audit_log_pauses_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let audit = log_failing_at_next_record(dir.path()).await;
    let rec = Record::new(Event::Attempt).mx("mx.b.test");
    assert!(audit.record(rec).await.is_err(), "the log did not fail");
    assert!(audit.failed());
    // a DNS server that never answers: a leased message would stay in flight for a second
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "[dns]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\n",
        silent.local_addr().unwrap()
    );
    let (engine, queue) = engine_with_audit(dir.path(), &extra, Duration::from_secs(600), audit);
    for _ in 0..3 {
        enqueue_one(&queue).await;
    }
    let (stop, stopped) = watch::channel(false);
    let run = tokio::spawn(engine.run(stopped));
    for _ in 0..75 {
        let c = queue.stats().await.unwrap().recipients;
        assert_eq!((c.in_flight, c.pending), (0, 3), "{c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_engine(stop, run).await;
    drop(silent);
}

/// Where the log fails during a delivery (after the message was leased).
#[derive(Clone, Copy)]
enum FailAt {
    /// As the MX's TCP connection opens, through another record.
    Connect,
    /// With the delivery's own attempt record, once the MX's certificate was judged.
    AttemptRecord,
}

/// What a delivery to an MX that presents `leaf` left when the log failed at `at`: the
/// receiver's commands, the queue's recipient counts and the recipient's last error.
async fn deliver_while_the_log_fails(
    ca: &TestCa,
    leaf: &CertFiles,
    dir: &Path,
    at: FailAt,
) -> (Vec<String>, StateCounts, String) {
    let dns = DnsServer::start().await;
    let ip = Ipv4Addr::new(127, 0, 0, 61);
    dns.mx_at("b.test", "mx.b.test", ip);
    let receiver = Receiver::start(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 62)),
        0,
        "mx.b.test",
        default_tls(leaf),
        &[],
    )
    .await;
    let audit = log_failing_at_next_record(dir).await;
    // The MX's address is a relay to the receiver (that fails the log before it connects on).
    let front = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = front.local_addr().unwrap().port();
    let (fail, backend) = (audit.clone(), receiver.addr);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = front.accept().await {
            if let FailAt::Connect = at {
                let rec = Record::new(Event::Attempt).mx("mx.other.test");
                assert!(fail.record(rec).await.is_err(), "the log did not fail");
            }
            let mut outbound = tokio::net::TcpStream::connect(backend).await.unwrap();
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    let extra = format!(
        "[dns]\nnameservers = {}\ntimeout = \"2s\"\n\n[delivery]\nport = {port}\ntrust_anchors = [\"{}\"]\n",
        dns.nameservers_toml(),
        ca.root_pem_path().display()
    );
    let watch_log = audit.clone();
    let (engine, queue) = engine_with_audit(dir, &extra, Duration::from_secs(600), audit);
    let id = enqueue_one(&queue).await;
    let (stop, stopped) = watch::channel(false);
    let run = tokio::spawn(engine.run(stopped));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let counts = loop {
        let c = queue.stats().await.unwrap().recipients;
        if receiver.connections() > 0 && c.in_flight == 0 {
            break c;
        }
        assert!(tokio::time::Instant::now() < deadline, "{c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop_engine(stop, run).await;
    assert!(watch_log.failed());
    let shown = queue.show(id).await.unwrap();
    let last = shown.recipients[0].last_error.clone().unwrap_or_default();
    (receiver.commands(), counts, last)
}

/// A verified MX and a log that fails at `at`: the receiver gets a TLS session and QUIT,
/// never MAIL FROM, and the recipient stays queued as deferred.
async fn a_verified_mx_gets_nothing(at: FailAt) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("mx-ca"));
    let leaf = ca.issue("mx", &LeafSpec::new(&["mx.b.test"]));
    let (commands, counts, last) = deliver_while_the_log_fails(&ca, &leaf, dir.path(), at).await;
    assert!(commands.iter().any(|c| c == "STARTTLS"), "{commands:?}");
    assert!(
        !commands
            .iter()
            .any(|c| c.to_ascii_uppercase().starts_with("MAIL")),
        "{commands:?}"
    );
    assert_eq!(counts.deferred, 1, "{counts:?}: {commands:?}");
    assert!(last.contains(super::AUDIT_DOWN), "{last}");
}

/// The log fails while the delivery is under way, through another record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_fails_mid_delivery_sends_nothing() {
    a_verified_mx_gets_nothing(FailAt::Connect).await;
}

/// The delivery's own attempt record is what fails the log: the record is in the file before
/// anything is sent, so the transaction sees the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_attempt_record_fails_the_log_sends_nothing() {
    a_verified_mx_gets_nothing(FailAt::AttemptRecord).await;
}

/// An MX that fails the policy (a certificate from no trusted CA), and the log fails while
/// the delivery is under way: no fallback step is taken (no hold, no bounce, no smarthost),
/// the recipient stays queued as deferred for the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_fails_mid_delivery_takes_no_fallback_step() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("mx-ca"));
    let leaf = ca.self_signed("mx", &LeafSpec::new(&["mx.b.test"]));
    let (commands, counts, last) =
        deliver_while_the_log_fails(&ca, &leaf, dir.path(), FailAt::Connect).await;
    assert!(commands.iter().any(|c| c == "STARTTLS"), "{commands:?}");
    assert_eq!((counts.deferred, counts.held), (1, 0), "{counts:?}");
    assert!(last.contains(super::AUDIT_DOWN), "{last}");
}
