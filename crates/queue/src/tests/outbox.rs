//! The transactional outbox: audit records committed with their message, handed to the sink in
//! commit order, kept until trimmed, sealed on disk, and taken out with a refused write.

use std::sync::{Arc, Mutex};

use super::faults_support::{arm, faults, fired};
use super::*;

/// Everything the sink received, in order.
type Received = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

fn recording_sink(q: &Queue) -> Received {
    let received: Received = Arc::default();
    let sink = received.clone();
    q.set_outbox_sink(Some(Arc::new(move |rows| {
        sink.lock().unwrap().extend(rows);
    })));
    received
}

/// The record the tests commit: "accepted <id> <n>".
fn accepted(n: usize) -> impl FnOnce(QueueId) -> Result<Vec<Vec<u8>>, String> + Send + 'static {
    move |id| Ok(vec![format!("accepted {id} {n}").into_bytes()])
}

async fn enqueue(q: &Queue, n: usize) -> QueueId {
    let queued = q
        .enqueue_recorded(envelope("a@x", &["b@y"]), vec![n as u8; 100], accepted(n))
        .await
        .unwrap();
    let id = queued.id();
    queued.release();
    id
}

fn text(rows: &[(u64, Vec<u8>)]) -> Vec<(u64, String)> {
    rows.iter()
        .map(|(seq, row)| (*seq, String::from_utf8(row.clone()).unwrap()))
        .collect()
}

#[tokio::test]
async fn records_reach_the_sink_before_the_enqueue_returns_and_wait_until_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let received = recording_sink(&q);
    let a = enqueue(&q, 1).await;
    // the sink has the record by the time the caller hears of the commit
    assert_eq!(
        text(&received.lock().unwrap()),
        vec![(1, format!("accepted {a} 1"))]
    );
    let b = enqueue(&q, 2).await;
    // a message with no records adds no row
    q.enqueue(envelope("a@x", &["b@y"]), b"plain".to_vec())
        .await
        .unwrap();
    let want = vec![
        (1, format!("accepted {a} 1")),
        (2, format!("accepted {b} 2")),
    ];
    assert_eq!(text(&received.lock().unwrap()), want);
    assert_eq!(q.outbox_waiting(), 2);
    // a restart before the log confirmed them: both are still there
    drop(q);
    let q = open(dir.path());
    assert_eq!(q.outbox_waiting(), 2);
    assert_eq!(text(&q.outbox_pending().await.unwrap()), want);
    assert_eq!(q.outbox_trim(1).await.unwrap(), 1);
    assert_eq!(q.outbox_waiting(), 1);
    assert_eq!(text(&q.outbox_pending().await.unwrap()), want[1..].to_vec());
    assert_eq!(q.outbox_trim(5).await.unwrap(), 1);
    assert!(q.outbox_pending().await.unwrap().is_empty());
    drop(q);
    // seqs are never reused, even once the outbox was emptied
    let q = open(dir.path());
    assert_eq!(q.outbox_waiting(), 0);
    let received = recording_sink(&q);
    let c = enqueue(&q, 3).await;
    assert_eq!(
        text(&received.lock().unwrap()),
        vec![(3, format!("accepted {c} 3"))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_hand_over_gapless_seqs_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let received = recording_sink(&q);
    let tasks: Vec<_> = (0..40)
        .map(|n| {
            let q = q.clone();
            tokio::spawn(async move { enqueue(&q, n).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let seqs: Vec<u64> = received.lock().unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    assert!(q.commit_count() < 40, "the enqueues shared commits");
}

#[tokio::test]
async fn records_are_sealed_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("OUTBOXMARK{}", QueueId::generate());
    let q = open(dir.path());
    let row = marker.clone();
    q.enqueue_recorded(envelope("a@x", &["b@y"]), b"m".to_vec(), move |_| {
        Ok(vec![row.into_bytes()])
    })
    .await
    .unwrap()
    .release();
    drop(q);
    for path in files(dir.path()) {
        let bytes = fs::read(&path).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
            "plaintext record in {}",
            path.display()
        );
    }
    let q = open(dir.path());
    assert_eq!(q.outbox_pending().await.unwrap()[0].1, marker.as_bytes());
}

#[tokio::test]
async fn a_record_that_cannot_be_made_refuses_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let err = q
        .enqueue_recorded(envelope("a@x", &["b@y"]), b"m".to_vec(), |_| {
            Err("no record".to_string())
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QueueError::OutboxRow(why) if why == "no record"),
        "{err:?}"
    );
    assert!(q.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_full_outbox_refuses_new_records_until_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        outbox_limit: 2,
        ..Tuning::default()
    };
    let q = Queue::open_tuned(opts(dir.path()), ring(), tuning).unwrap();
    enqueue(&q, 1).await;
    enqueue(&q, 2).await;
    let err = q
        .enqueue_recorded(envelope("a@x", &["b@y"]), b"m".to_vec(), accepted(3))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::OutboxFull { rows: 2 }), "{err:?}");
    assert_eq!(
        q.list().await.unwrap().len(),
        2,
        "the refused message is not queued"
    );
    q.outbox_trim(1).await.unwrap();
    enqueue(&q, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_takes_the_records_out_with_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let received = recording_sink(&q);
    arm(&faults(&q).failed_syncs, 1);
    assert!(q
        .enqueue_recorded(envelope("a@x", &["b@y"]), b"m".to_vec(), accepted(1))
        .await
        .is_err());
    fired(&faults(&q).failed_syncs);
    assert!(
        received.lock().unwrap().is_empty(),
        "a refused message's record went out"
    );
    assert!(q.outbox_pending().await.unwrap().is_empty());
    let id = enqueue(&q, 2).await;
    let got = text(&received.lock().unwrap());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, format!("accepted {id} 2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_errs_after_landing_still_hands_its_records_over_once() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let received = recording_sink(&q);
    arm(&faults(&q).errors_after_sync, 1);
    let id = enqueue(&q, 1).await;
    fired(&faults(&q).errors_after_sync);
    assert_eq!(
        text(&received.lock().unwrap()),
        vec![(1, format!("accepted {id} 1"))]
    );
}

#[tokio::test]
async fn rekey_moves_waiting_records_to_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = Queue::open(opts(dir.path()), Keyring::from_raw(KEY_A, &[])).unwrap();
        enqueue(&q, 1).await;
    }
    {
        let q = Queue::open(opts(dir.path()), Keyring::from_raw(KEY_B, &[KEY_A])).unwrap();
        q.rekey(&mut |_, _| {}).unwrap();
    }
    let q = Queue::open(opts(dir.path()), Keyring::from_raw(KEY_B, &[])).unwrap();
    let rows = text(&q.outbox_pending().await.unwrap());
    assert!(rows[0].1.starts_with("accepted "), "{rows:?}");
    assert!(rows[0].1.ends_with(" 1"), "{rows:?}");
}
