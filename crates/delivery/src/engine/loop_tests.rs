//! The engine's loop run for real, on a real queue and audit log: how it stops.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sealpost_queue::{Enqueued, Envelope, Queue};
use tokio::sync::watch;

use super::test_engine::stop_engine;
use super::Engine;

/// An engine on a real queue and audit log in `dir`, whose DNS server does not answer (a
/// closed loopback port), so every delivery ends quickly as deferred.
fn engine(dir: &Path) -> (Engine, Queue, std::path::PathBuf) {
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .unwrap();
    let dns = format!("[dns]\nnameservers = [\"{closed}\"]\ntimeout = \"1s\"\n");
    super::test_engine::engine_in(dir, &dns, Duration::from_secs(600))
}

fn envelope() -> Envelope {
    super::test_engine::envelope("app@clinic.test", "phi")
}

/// Enqueues messages until one is handed over (the engine registers its hand-off when its
/// loop starts); the others are released to the due queue.
async fn handed_over(queue: &Queue) -> Enqueued {
    for _ in 0..500 {
        let held = queue
            .enqueue_held(envelope(), b"Subject: x\r\n\r\nbody\r\n".to_vec())
            .await
            .unwrap();
        if held.handed_over() {
            return held;
        }
        held.release();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the engine never took a message at enqueue");
}

/// The events the audit log holds for `id`.
fn events_of(path: &Path, id: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["queue_id"] == id)
        .map(|r| r["event"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A running engine told to stop while a message it took at enqueue is still held back.
struct Stopping {
    _dir: tempfile::TempDir,
    audit_path: PathBuf,
    run: tokio::task::JoinHandle<()>,
    held: Enqueued,
    id: String,
}

/// Starts an engine, has it take a message at enqueue, tells it to stop, and checks after
/// `wait` that it is still running (it must not stop with a hand-off reserved).
async fn stopping_with_a_hand_off(wait: Duration) -> Stopping {
    let dir = tempfile::tempdir().unwrap();
    let (engine, queue, audit_path) = engine(dir.path());
    let (stop, stopped) = watch::channel(false);
    let run = tokio::spawn(engine.run(stopped));
    let held = handed_over(&queue).await;
    let id = held.id().to_string();
    stop.send(true).unwrap();
    tokio::time::sleep(wait).await;
    assert!(
        !run.is_finished(),
        "the engine stopped with a hand-off still reserved"
    );
    Stopping {
        _dir: dir,
        audit_path,
        run,
        held,
        id,
    }
}

/// A message whose commit was under way when the engine was told to stop still has its slot:
/// the engine waits for it, starts its delivery and only then stops. Without the drain it would
/// sit leased, untouched, until its lease ran out (ten minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_handed_over_while_stopping_is_delivered_before_the_engine_stops() {
    let Stopping {
        _dir,
        audit_path,
        run,
        held,
        id,
    } = stopping_with_a_hand_off(Duration::from_millis(300)).await;
    assert!(
        events_of(&audit_path, &id).is_empty(),
        "nothing started yet"
    );

    held.release();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the engine stops once the hand-off arrived and its delivery ended")
        .unwrap();
    assert_eq!(
        events_of(&audit_path, &id),
        ["deferred"],
        "the handed-over message was tried (no DNS answer: deferred) before the engine stopped"
    );
}

/// A hand-off given back unused (the session withdrew its message) does not hold the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_hand_off_does_not_hold_up_stopping() {
    let Stopping {
        _dir,
        audit_path,
        run,
        held,
        id,
    } = stopping_with_a_hand_off(Duration::from_millis(100)).await;
    held.withdraw();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the engine stops once the reserved slot is given back")
        .unwrap();
    assert!(
        events_of(&audit_path, &id).is_empty(),
        "a withdrawn message is not delivered"
    );
}

/// The engine leases only as many messages as it has delivery slots for: it takes the slots
/// first, so no message sits leased waiting for one. Two slots (`max_connections = 1`), five
/// messages due before the engine starts (so none is handed over), and deliveries held up by a
/// DNS server that never answers: two in flight, three still pending, until those two end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_leases_no_more_messages_than_it_has_slots() {
    let dir = tempfile::tempdir().unwrap();
    // bound and never read: every lookup waits for the timeout
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let extra = format!(
        "[dns]\nnameservers = [\"{addr}\"]\ntimeout = \"4s\"\n\n[delivery]\nmax_connections = 1\n"
    );
    let (engine, queue, _audit) =
        super::test_engine::engine_in(dir.path(), &extra, Duration::from_secs(600));
    for _ in 0..5 {
        queue
            .enqueue(envelope(), b"Subject: x\r\n\r\nbody\r\n".to_vec())
            .await
            .unwrap();
    }
    let (stop, stopped) = watch::channel(false);
    let run = tokio::spawn(engine.run(stopped));
    let counts = || async { queue.stats().await.unwrap().recipients };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while counts().await.in_flight < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the engine did not lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // both slots busy for a while: nothing more is leased meanwhile
    for _ in 0..10 {
        let c = counts().await;
        assert_eq!((c.in_flight, c.pending), (2, 3), "{c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_engine(stop, run).await;
    drop(silent);
}

/// Messages whose delivery ended stay leased until their outcome is recorded (the audit log's
/// fsync, then the queue's commit), and the engine holds at most twice its delivery slots of
/// them: with `max_connections = 1` (two slots, four recording) and deliveries that end at
/// once (a recipient without a domain fails for good, and a null sender gets no DSN), at most
/// six messages are ever leased, though the slots alone would let all of them through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_awaiting_their_record_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[delivery]\nmax_connections = 1\n";
    let (engine, queue, _audit) =
        super::test_engine::engine_in(dir.path(), extra, Duration::from_secs(600));
    let mut no_domain = super::test_engine::envelope("", "phi");
    no_domain.recipients[0].address = "pat".into();
    for _ in 0..200 {
        queue
            .enqueue(no_domain.clone(), b"Subject: x\r\n\r\nbody\r\n".to_vec())
            .await
            .unwrap();
    }
    let (stop, stopped) = watch::channel(false);
    let run = tokio::spawn(engine.run(stopped));
    let started = tokio::time::Instant::now();
    let mut most = 0;
    loop {
        let c = queue.stats().await.unwrap().recipients;
        most = most.max(c.in_flight);
        assert!(c.in_flight <= 6, "{c:?}");
        // a message whose every recipient failed leaves the queue
        if c.pending == 0 && c.in_flight == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the deliveries did not end: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        most > 2,
        "no message ever waited for its record ({most} leased at most)"
    );
    stop_engine(stop, run).await;
}
