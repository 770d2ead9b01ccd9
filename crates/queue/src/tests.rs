//! Queue-level tests on real files: durability, encryption, faults, scheduling, admin.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use redb::{ReadableTable, ReadableTableMetadata};

use super::*;
use crate::commit::Change;
use crate::store::{BODY, BODY_CHUNKS, META};

mod faults;
mod faults_support;
mod handoff;
mod outbox;

const KEY_A: [u8; 32] = [0xA1; 32];
const KEY_B: [u8; 32] = [0xB2; 32];

fn opts(dir: &Path) -> QueueOptions {
    QueueOptions {
        dir: dir.to_path_buf(),
        retry: vec![Duration::from_secs(100), Duration::from_secs(200)],
        lifetime: Duration::from_secs(5 * 86400),
        lease: Duration::from_secs(60),
    }
}

fn ring() -> Keyring {
    Keyring::from_raw(KEY_A, &[])
}

fn envelope(sender: &str, rcpts: &[&str]) -> Envelope {
    Envelope {
        sender: sender.into(),
        recipients: rcpts
            .iter()
            .map(|a| RecipientSpec {
                address: (*a).into(),
                notify: Some("FAILURE".into()),
                orcpt: None,
            })
            .collect(),
        user: Some("billing-app".into()),
        policy: "phi".into(),
        tags: vec![("campaign".into(), "reminders".into())],
        client_ip: Some("127.0.0.1".parse().unwrap()),
        ret: None,
        envid: None,
        smtputf8: false,
        eight_bit: false,
        received_at: SystemTime::now(),
    }
}

fn open(dir: &Path) -> Queue {
    Queue::open(opts(dir), ring()).unwrap()
}

fn later(secs: u64) -> SystemTime {
    SystemTime::now() + Duration::from_secs(secs)
}

#[tokio::test]
async fn a_fresh_body_is_delivered_from_memory_until_its_outcome_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let body = b"Subject: x\r\n\r\nfresh\r\n".to_vec();
    let id = q
        .enqueue(envelope("a@x.example", &["r@y.example"]), body.clone())
        .await
        .unwrap();
    assert_eq!(q.inner.hot.bytes(), body.len());
    let first = q.delivery_body(id).await.unwrap();
    assert_eq!(*first, body);
    let again = q.delivery_body(id).await.unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "served from memory, not the store"
    );
    // the store holds the same body, sealed
    assert_eq!(q.body(id).await.unwrap(), body);

    let lease = q.lease_due(SystemTime::now(), 10).await.unwrap().remove(0);
    let deferred = Outcome::Deferred {
        reason: "4.4.1 no answer".into(),
    };
    q.complete(id, vec![(lease.recipients[0].index, deferred)])
        .await
        .unwrap();
    assert_eq!(
        q.inner.hot.bytes(),
        0,
        "dropped once an outcome is recorded"
    );
    let retry = q.delivery_body(id).await.unwrap();
    assert_eq!(*retry, body, "a retry reads the store");
    assert!(!Arc::ptr_eq(&first, &retry));
}

#[tokio::test]
async fn hold_and_delete_drop_a_fresh_body_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let held = q
        .enqueue(envelope("a@x.example", &["r@y.example"]), b"held".to_vec())
        .await
        .unwrap();
    let deleted = q
        .enqueue(
            envelope("a@x.example", &["r@y.example"]),
            b"deleted".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(q.inner.hot.bytes(), 4 + 7);
    q.hold(held).await.unwrap();
    assert!(q.inner.hot.get(held).is_none());
    q.delete(deleted).await.unwrap();
    assert_eq!(q.inner.hot.bytes(), 0);
    assert!(matches!(
        q.delivery_body(deleted).await,
        Err(QueueError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_zero_budget_set_later_empties_memory_and_keeps_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let before = q
        .enqueue(
            envelope("a@x.example", &["r@y.example"]),
            b"before".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(q.inner.hot.bytes(), 6);
    q.set_fresh_body_budget(0);
    assert_eq!(q.inner.hot.bytes(), 0);
    let after = q
        .enqueue(envelope("a@x.example", &["r@y.example"]), b"after".to_vec())
        .await
        .unwrap();
    assert_eq!(q.inner.hot.bytes(), 0);
    assert_eq!(*q.delivery_body(before).await.unwrap(), b"before");
    assert_eq!(*q.delivery_body(after).await.unwrap(), b"after");
}

#[tokio::test]
async fn with_no_memory_budget_every_body_comes_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        hot_bytes: 0,
        ..Tuning::default()
    };
    let q = Queue::open_tuned(opts(dir.path()), ring(), tuning).unwrap();
    let id = q
        .enqueue(envelope("a@x.example", &["r@y.example"]), b"cold".to_vec())
        .await
        .unwrap();
    let a = q.delivery_body(id).await.unwrap();
    let b = q.delivery_body(id).await.unwrap();
    assert_eq!((a.as_slice(), b.as_slice()), (&b"cold"[..], &b"cold"[..]));
    assert!(!Arc::ptr_eq(&a, &b));
}

#[tokio::test]
async fn enqueue_lease_complete_and_removal_when_all_final() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let id = q
        .enqueue(
            envelope("a@x.example", &["r1@y.example", "r2@y.example"]),
            b"body".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(q.body(id).await.unwrap(), b"body");
    assert!(q.next_due().await.unwrap().unwrap() <= SystemTime::now());

    let leases = q.lease_due(SystemTime::now(), 10).await.unwrap();
    assert_eq!(leases.len(), 1);
    let lease = &leases[0];
    assert_eq!(lease.id, id);
    assert_eq!(lease.recipients.len(), 2);
    assert_eq!(lease.recipients[1].address, "r2@y.example");
    assert_eq!(lease.recipients[0].previous, RecipientState::Pending);
    assert!(!q.expired(lease, SystemTime::now()));
    assert!(q.expired(lease, lease.arrival + q.lifetime()));
    // leased recipients are not leased twice
    assert!(q.lease_due(SystemTime::now(), 10).await.unwrap().is_empty());

    q.complete(
        id,
        vec![
            (
                0,
                Outcome::Delivered {
                    remote: "mx.y.example".into(),
                },
            ),
            (
                1,
                Outcome::Deferred {
                    reason: "451 try later".into(),
                },
            ),
        ],
    )
    .await
    .unwrap();
    let detail = q.show(id).await.unwrap();
    assert_eq!(detail.recipients[0].state, RecipientState::Delivered);
    assert!(matches!(
        detail.recipients[1].state,
        RecipientState::Deferred { attempts: 1, .. }
    ));
    assert_eq!(
        detail.recipients[1].last_error.as_deref(),
        Some("451 try later")
    );
    assert!(q.lease_due(SystemTime::now(), 10).await.unwrap().is_empty());

    let again = q.lease_due(later(300), 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].recipients.len(), 1);
    assert_eq!(again[0].recipients[0].index, 1);
    assert_eq!(again[0].recipients[0].attempts, 1);
    assert!(matches!(
        again[0].recipients[0].previous,
        RecipientState::Deferred { .. }
    ));
    q.complete(
        id,
        vec![(
            1,
            Outcome::Delivered {
                remote: "mx".into(),
            },
        )],
    )
    .await
    .unwrap();

    assert!(q.list().await.unwrap().is_empty());
    assert!(matches!(q.body(id).await, Err(QueueError::NotFound(x)) if x == id));
    assert!(matches!(q.show(id).await, Err(QueueError::NotFound(_))));
    assert_eq!(q.next_due().await.unwrap(), None);
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.messages, 0);
    assert_eq!(stats.recipients, StateCounts::default());
}

#[tokio::test]
async fn invalid_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    assert!(matches!(
        q.enqueue(envelope("a@x", &[]), b"b".to_vec()).await,
        Err(QueueError::NoRecipients)
    ));
    let id = q
        .enqueue(envelope("a@x", &["b@y"]), b"b".to_vec())
        .await
        .unwrap();
    assert!(matches!(
        q.complete(id, vec![(5, Outcome::Delivered { remote: "m".into() })])
            .await,
        Err(QueueError::NoSuchRecipient { index: 5, .. })
    ));
    let unknown = QueueId::generate();
    assert!(matches!(
        q.retry(unknown).await,
        Err(QueueError::NotFound(_))
    ));
    assert!(matches!(
        q.delete(unknown).await,
        Err(QueueError::NotFound(_))
    ));
    let mut bad = opts(dir.path());
    bad.retry.clear();
    assert!(matches!(
        Queue::open(bad, ring()),
        Err(QueueError::Options(_))
    ));
}

#[tokio::test]
async fn retry_schedule_uses_configured_delays_with_ten_percent_jitter() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let id = q
        .enqueue(envelope("a@x", &["b@y"]), b"b".to_vec())
        .await
        .unwrap();
    // retry = [100s, 200s]: attempts 1, 2, 3 wait ~100, ~200, ~200 (last repeats)
    let mut t = SystemTime::now();
    for expected in [100.0f64, 200.0, 200.0] {
        let leases = q.lease_due(t, 1).await.unwrap();
        assert_eq!(leases.len(), 1, "due at {expected}");
        let before = SystemTime::now();
        q.complete(
            id,
            vec![(
                0,
                Outcome::Deferred {
                    reason: "busy".into(),
                },
            )],
        )
        .await
        .unwrap();
        let after = SystemTime::now();
        let next = match &q.show(id).await.unwrap().recipients[0].state {
            RecipientState::Deferred { next_attempt, .. } => *next_attempt,
            other => panic!("{other:?}"),
        };
        let lo = before + Duration::from_secs_f64(expected * 0.9);
        let hi = after + Duration::from_secs_f64(expected * 1.1);
        assert!(
            next >= lo && next <= hi,
            "delay outside ±10% of {expected}s"
        );
        // not due before the lower bound, due after the upper bound
        assert!(q
            .lease_due(lo - Duration::from_secs(1), 1)
            .await
            .unwrap()
            .is_empty());
        t = hi + Duration::from_secs(1);
    }
}

#[tokio::test]
async fn held_outcome_and_expired_lease_make_recipients_due_again() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let id = q
        .enqueue(envelope("a@x", &["b@y"]), b"b".to_vec())
        .await
        .unwrap();
    q.lease_due(SystemTime::now(), 1).await.unwrap();
    // the worker never reports: the lease (60 s) expires and the recipient is due again
    assert!(q.lease_due(later(30), 1).await.unwrap().is_empty());
    let relet = q.lease_due(later(61), 1).await.unwrap();
    assert_eq!(relet.len(), 1);
    assert_eq!(relet[0].recipients[0].previous, RecipientState::Pending);
    let until = later(3600);
    q.complete(
        id,
        vec![(
            0,
            Outcome::Held {
                until,
                step: 1,
                reason: "no verified MX".into(),
            },
        )],
    )
    .await
    .unwrap();
    assert!(q.lease_due(later(3000), 1).await.unwrap().is_empty());
    let leases = q.lease_due(later(3601), 1).await.unwrap();
    assert!(matches!(
        &leases[0].recipients[0].previous,
        RecipientState::Held { step: 1, reason, .. } if reason == "no verified MX"
    ));
    q.complete(
        id,
        vec![(
            0,
            Outcome::Failed {
                reason: "bounced".into(),
            },
        )],
    )
    .await
    .unwrap();
    assert!(q.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn crashed_leases_are_due_again_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let q = open(dir.path());
        let id = q
            .enqueue(envelope("a@x", &["b@y", "c@y"]), b"b".to_vec())
            .await
            .unwrap();
        let leases = q.lease_due(SystemTime::now(), 10).await.unwrap();
        assert_eq!(leases[0].recipients.len(), 2);
        assert!(q.lease_due(SystemTime::now(), 10).await.unwrap().is_empty());
        id
        // dropped without complete: the "crash"
    };
    let q = open(dir.path());
    let detail = q.show(id).await.unwrap();
    assert!(detail
        .recipients
        .iter()
        .all(|r| r.state == RecipientState::Pending));
    let leases = q.lease_due(SystemTime::now(), 10).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].recipients.len(), 2);
    assert_eq!(q.body(id).await.unwrap(), b"b");
}

#[tokio::test]
async fn admin_operations() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let a = q
        .enqueue(envelope("a@x", &["b@y", "c@y"]), vec![1; 10])
        .await
        .unwrap();
    let b = q
        .enqueue(envelope("d@x", &["e@y"]), vec![2; 20])
        .await
        .unwrap();

    let list = q.list().await.unwrap();
    assert_eq!(list.len(), 2);
    // ids are ordered by the millisecond only: two enqueues within one may list either way
    let first = list.iter().find(|m| m.id == a).unwrap();
    assert_eq!(first.sender, "a@x");
    assert_eq!(first.policy, "phi");
    assert_eq!(first.size, 10);
    assert_eq!(first.recipients.pending, 2);
    assert!(list.iter().any(|m| m.id == b && m.sender == "d@x"));

    // hold: never due until released
    q.hold(a).await.unwrap();
    assert_eq!(q.show(a).await.unwrap().next_attempt, None);
    let leases = q.lease_due(later(10 * 86400), 10).await.unwrap();
    assert_eq!(leases.iter().map(|l| l.id).collect::<Vec<_>>(), vec![b]);
    q.complete(
        b,
        vec![(
            0,
            Outcome::Deferred {
                reason: "busy".into(),
            },
        )],
    )
    .await
    .unwrap();
    let stats = q.stats().await.unwrap();
    assert_eq!(stats.messages, 2);
    assert_eq!(stats.recipients.admin_hold, 2);
    assert_eq!(stats.recipients.deferred, 1);
    assert_eq!(stats.body_bytes, 30);
    assert!(stats.store_bytes > 0);

    // retry makes the deferred recipient due now; admin hold stays
    assert!(q.lease_due(SystemTime::now(), 10).await.unwrap().is_empty());
    q.retry(b).await.unwrap();
    let leases = q
        .lease_due(SystemTime::now() + Duration::from_millis(5), 10)
        .await
        .unwrap();
    assert_eq!(leases.iter().map(|l| l.id).collect::<Vec<_>>(), vec![b]);
    assert!(matches!(
        leases[0].recipients[0].previous,
        RecipientState::Deferred { attempts: 1, .. }
    ));

    // release: pending again and due
    q.release(a).await.unwrap();
    let leases = q.lease_due(SystemTime::now(), 10).await.unwrap();
    assert_eq!(leases.iter().map(|l| l.id).collect::<Vec<_>>(), vec![a]);

    // show never includes the body; delete removes record and body
    let detail = q.show(a).await.unwrap();
    assert_eq!(detail.envelope.sender, "a@x");
    assert_eq!(detail.recipients.len(), 2);
    q.delete(a).await.unwrap();
    assert!(matches!(q.body(a).await, Err(QueueError::NotFound(_))));
    assert_eq!(q.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_enqueues_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let before = q.commit_count();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.enqueue(envelope("a@x", &["b@y"]), vec![i as u8; 10_000])
                .await
                .unwrap()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50);
    assert_eq!(q.list().await.unwrap().len(), 50);
    let commits = q.commit_count() - before;
    assert!(
        commits < 50,
        "50 enqueues took {commits} commits: no grouping"
    );
}

#[tokio::test]
async fn concurrent_leases_and_outcomes_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    for i in 0..50u8 {
        q.enqueue(envelope("a@x", &["b@y"]), vec![i; 100])
            .await
            .unwrap();
    }
    let before = q.commit_count();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            for lease in q.lease_due(later(1), 1).await.unwrap() {
                let done = vec![(
                    0,
                    Outcome::Delivered {
                        remote: "mx".into(),
                    },
                )];
                q.complete(lease.id, done).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        q.list().await.unwrap().is_empty(),
        "every message delivered"
    );
    let commits = q.commit_count() - before;
    assert!(
        commits < 100,
        "50 leases and 50 outcomes took {commits} commits: no grouping"
    );
}

#[tokio::test]
async fn a_failing_write_in_a_group_fails_alone_and_the_others_commit() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let a = q
        .enqueue(envelope("a@x", &["b@y"]), b"a".to_vec())
        .await
        .unwrap();
    let b = q
        .enqueue(envelope("a@x", &["b@y"]), b"b".to_vec())
        .await
        .unwrap();
    assert_eq!(q.lease_due(later(1), 10).await.unwrap().len(), 2);
    q.delete(b).await.unwrap();
    let c = q
        .enqueue(envelope("a@x", &["c@y"]), b"c".to_vec())
        .await
        .unwrap();

    // the first job blocks the committer until the group behind it has been submitted
    let blocked = block_committer(&q);
    // counted only now: a group is counted when it begins, so the blocker's is in `before`
    let before = q.commit_count();
    let core = q.inner.core.clone();
    let now = SystemTime::now();
    let delivered = || {
        vec![(
            0,
            Outcome::Delivered {
                remote: "mx".into(),
            },
        )]
    };
    let (ok, ok_rx) = {
        let core = core.clone();
        Change::job(move |t: &mut Tables<'_>| core.complete(t, a, delivered(), now))
    };
    let (bad, bad_rx) = {
        let core = core.clone();
        Change::job(move |t: &mut Tables<'_>| core.complete(t, b, delivered(), now))
    };
    let (lease, lease_rx) = {
        let core = core.clone();
        Change::job(move |t: &mut Tables<'_>| core.lease_due(t, later(1), 10))
    };
    for job in [ok, bad, lease] {
        q.inner.committer.submit(job).unwrap();
    }
    blocked.release().await;
    ok_rx.await.unwrap().unwrap();
    assert!(matches!(bad_rx.await.unwrap(), Err(QueueError::NotFound(id)) if id == b));
    let leases = lease_rx.await.unwrap().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].id, c);

    // the three jobs formed one group (its re-runs after the failure are not counted); it was
    // counted before any of them was answered
    assert_eq!(q.commit_count() - before, 1, "one group");
    // what the re-run returned is what was committed
    let list = q.list().await.unwrap();
    assert_eq!(list.len(), 1, "a delivered and gone, b deleted, c queued");
    let shown = q.show(c).await.unwrap();
    assert!(matches!(
        shown.recipients[0].state,
        RecipientState::InFlight { .. }
    ));
}

/// A job of the test's own that holds the committer until released.
struct Blocked {
    gate: std::sync::mpsc::Sender<()>,
    done: tokio::sync::oneshot::Receiver<Result<(), QueueError>>,
}

impl Blocked {
    /// Lets the blocker finish and waits for its commit.
    async fn release(self) {
        self.gate.send(()).unwrap();
        self.done.await.unwrap().unwrap();
    }
}

/// Blocks the committer; returns once the blocker runs, so its group is closed and everything
/// submitted before `release` forms the next one.
fn block_committer(q: &Queue) -> Blocked {
    let (gate, opened) = std::sync::mpsc::channel::<()>();
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    let opened = std::sync::Mutex::new(opened);
    let (blocker, done) = Change::job(move |_t: &mut Tables<'_>| {
        let _ = started_tx.send(());
        let _ = opened.lock().unwrap().recv();
        Ok(())
    });
    q.inner.committer.submit(blocker).unwrap();
    started.recv_timeout(Duration::from_secs(5)).unwrap();
    Blocked { gate, done }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn no_plaintext_reaches_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("PHIMARK{}", QueueId::generate());
    let q = open(dir.path());
    let mut env = envelope(
        &format!("{marker}@sender.example"),
        &[&format!("{marker}@rcpt.example")],
    );
    env.tags = vec![("t".into(), marker.clone())];
    env.user = Some(marker.clone());
    let body = format!("Subject: {marker}\r\n\r\nLab results {marker}\r\n").into_bytes();
    let id = q.enqueue(env, body.clone()).await.unwrap();
    let leases = q.lease_due(SystemTime::now(), 1).await.unwrap();
    q.complete(
        id,
        vec![(
            0,
            Outcome::Deferred {
                reason: format!("550 {marker} unknown"),
            },
        )],
    )
    .await
    .unwrap();
    assert_eq!(q.body(id).await.unwrap(), body);
    assert_eq!(
        leases[0].envelope.sender,
        format!("{marker}@sender.example")
    );
    drop(q);
    let all = files(dir.path());
    assert!(!all.is_empty());
    let mut scanned = 0;
    for path in all {
        let bytes = fs::read(&path).unwrap();
        scanned += bytes.len();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
            "plaintext marker found in {}",
            path.display()
        );
    }
    assert!(scanned > 0);
}

/// Overwrites one byte in the middle of the first chunk of a stored body via redb.
fn tamper_body(dir: &Path, id: QueueId) {
    let db = redb::Database::create(dir.join(crate::store::STORE_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(BODY_CHUNKS).unwrap();
        let key = (id.as_u128(), 0u32);
        let mut value = t.get(key).unwrap().unwrap().value().to_vec();
        let i = value.len() / 2 + 5;
        value[i] ^= 0x40;
        t.insert(key, value.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

/// Chunk counts per message in the store, and whether the legacy body table holds anything.
fn stored_bodies(dir: &Path) -> (std::collections::BTreeMap<u128, u32>, usize) {
    let db = redb::Database::create(dir.join(crate::store::STORE_FILE)).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let mut chunks = std::collections::BTreeMap::new();
    for entry in txn.open_table(BODY_CHUNKS).unwrap().iter().unwrap() {
        let (k, v) = entry.unwrap();
        assert!(v.value().len() <= crate::body::CHUNK);
        *chunks.entry(k.value().0).or_insert(0) += 1;
    }
    let legacy = txn.open_table(BODY).unwrap().len().unwrap() as usize;
    (chunks, legacy)
}

/// Rewrites a message's body the way stores written before chunking held it: whole, in `BODY`.
fn make_legacy_body(dir: &Path, id: QueueId) {
    let db = redb::Database::create(dir.join(crate::store::STORE_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut chunks = txn.open_table(BODY_CHUNKS).unwrap();
        let key = id.as_u128();
        let mut whole = Vec::new();
        for entry in chunks.range((key, 0)..=(key, u32::MAX)).unwrap() {
            whole.extend_from_slice(entry.unwrap().1.value());
        }
        chunks
            .retain_in((key, 0)..=(key, u32::MAX), |_, _| false)
            .unwrap();
        txn.open_table(BODY)
            .unwrap()
            .insert(key, whole.as_slice())
            .unwrap();
    }
    txn.commit().unwrap();
}

#[tokio::test]
async fn bodies_are_stored_in_small_chunks_and_removed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = crate::body::CHUNK;
    let seal = crate::crypto::OVERHEAD;
    let sizes = [0usize, 10, chunk - seal, chunk - seal + 1, 1024 * 1024 + 7];
    let mut ids = Vec::new();
    {
        let q = open(dir.path());
        for (i, size) in sizes.iter().enumerate() {
            let body: Vec<u8> = (0..*size).map(|n| (n % 251) as u8 ^ i as u8).collect();
            let id = q.enqueue(envelope("a@x", &["b@y"]), body).await.unwrap();
            ids.push(id);
        }
    }
    let (chunks, legacy) = stored_bodies(dir.path());
    assert_eq!(legacy, 0);
    // sealing adds a header and a tag; one byte past a full chunk needs a second one
    let counts: Vec<u32> = ids.iter().map(|id| chunks[&id.as_u128()]).collect();
    let big = u32::try_from((1024 * 1024 + 7 + seal).div_ceil(chunk)).unwrap();
    assert!(big > 1);
    assert_eq!(counts, vec![1, 1, 1, 2, big]);
    let q = open(dir.path());
    for (i, (id, size)) in ids.iter().zip(sizes).enumerate() {
        let body: Vec<u8> = (0..size).map(|n| (n % 251) as u8 ^ i as u8).collect();
        assert_eq!(q.body(*id).await.unwrap(), body, "body {i} round trip");
    }
    for lease in q.lease_due(later(1), 10).await.unwrap() {
        let done = vec![(
            0,
            Outcome::Delivered {
                remote: "mx".into(),
            },
        )];
        q.complete(lease.id, done).await.unwrap();
    }
    drop(q);
    assert_eq!(
        stored_bodies(dir.path()),
        (Default::default(), 0),
        "all removed"
    );
}

#[tokio::test]
async fn bodies_stored_whole_before_chunking_are_read_rekeyed_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let body = vec![b'L'; 600_000];
    let (a, b) = {
        let q = open(dir.path());
        let a = q
            .enqueue(envelope("a@x", &["b@y"]), body.clone())
            .await
            .unwrap();
        let b = q
            .enqueue(envelope("a@x", &["c@y"]), body.clone())
            .await
            .unwrap();
        (a, b)
    };
    make_legacy_body(dir.path(), a);
    make_legacy_body(dir.path(), b);
    assert_eq!(stored_bodies(dir.path()).1, 2);
    let q = open(dir.path());
    assert_eq!(q.body(a).await.unwrap(), body);
    q.delete(b).await.unwrap();
    drop(q);
    assert_eq!(
        stored_bodies(dir.path()).1,
        1,
        "deleting removes the legacy body"
    );
    // rekeying moves the legacy body into chunks under the new key
    let q = Queue::open(opts(dir.path()), Keyring::from_raw(KEY_B, &[KEY_A])).unwrap();
    assert_eq!(q.rekey(&mut |_, _| {}).unwrap(), 1);
    assert_eq!(q.body(a).await.unwrap(), body);
    drop(q);
    let (chunks, legacy) = stored_bodies(dir.path());
    assert_eq!(legacy, 0);
    let expected =
        u32::try_from((body.len() + crate::crypto::OVERHEAD).div_ceil(crate::body::CHUNK));
    assert_eq!(chunks.get(&a.as_u128()), expected.ok().as_ref());
}

/// Overwrites one byte inside a stored sealed value via redb (so the file stays a valid store).
fn tamper(dir: &Path, table: redb::TableDefinition<u128, &[u8]>, id: QueueId) {
    let db = redb::Database::create(dir.join(crate::store::STORE_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(table).unwrap();
        let mut value = t.get(id.as_u128()).unwrap().unwrap().value().to_vec();
        let i = value.len() / 2 + 5;
        value[i] ^= 0x40;
        t.insert(id.as_u128(), value.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

#[tokio::test]
async fn tampered_records_are_quarantined_and_never_leased() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = {
        let q = open(dir.path());
        let a = q
            .enqueue(envelope("a@x", &["b@y"]), b"first".to_vec())
            .await
            .unwrap();
        let b = q
            .enqueue(envelope("c@x", &["d@y"]), b"second".to_vec())
            .await
            .unwrap();
        (a, b)
    };
    tamper(dir.path(), META, a);
    let q = open(dir.path());
    let leases = q.lease_due(SystemTime::now(), 10).await.unwrap();
    assert_eq!(leases.iter().map(|l| l.id).collect::<Vec<_>>(), vec![b]);
    assert!(matches!(q.show(a).await, Err(QueueError::NotFound(_))));
    assert_eq!(q.stats().await.unwrap().quarantined, 1);
    assert_eq!(
        q.take_quarantined(),
        vec![a],
        "reported once for the audit log"
    );
    assert!(q.take_quarantined().is_empty());
    drop(q);

    // a tampered body: reading it reports Integrity and quarantines the message
    tamper_body(dir.path(), b);
    let q = open(dir.path());
    assert!(matches!(q.body(b).await, Err(QueueError::Integrity { id }) if id == b));
    assert!(q.lease_due(later(3600), 10).await.unwrap().is_empty());
    assert!(q.list().await.unwrap().is_empty());
    assert_eq!(q.stats().await.unwrap().quarantined, 2);
    assert_eq!(q.take_quarantined(), vec![b]);
}

#[test]
fn corrupt_store_is_detected_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(crate::store::STORE_FILE);
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&file, &garbage).unwrap();
    match Queue::open(opts(dir.path()), ring()) {
        Err(err @ QueueError::Corrupt { .. }) => {
            let text = err.to_string();
            assert!(text.contains(file.to_str().unwrap()), "{text}");
        }
        Err(other) => panic!("expected Corrupt, got {other:?}"),
        Ok(_) => panic!("garbage store opened"),
    }
}

#[tokio::test]
async fn rekey_moves_records_to_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let q = Queue::open(opts(dir.path()), Keyring::from_raw(KEY_A, &[])).unwrap();
        q.enqueue(envelope("a@x", &["b@y"]), b"secret body".to_vec())
            .await
            .unwrap()
    };
    // B alone cannot read A's records
    assert!(matches!(
        Queue::open(opts(dir.path()), Keyring::from_raw(KEY_B, &[])),
        Err(QueueError::UnknownKey { .. })
    ));
    {
        let q = Queue::open(opts(dir.path()), Keyring::from_raw(KEY_B, &[KEY_A])).unwrap();
        assert_eq!(q.body(id).await.unwrap(), b"secret body");
        // a record written now uses B
        q.enqueue(envelope("c@x", &["d@y"]), b"new".to_vec())
            .await
            .unwrap();
        let mut calls = Vec::new();
        let n = q
            .rekey(&mut |done, total| calls.push((done, total)))
            .unwrap();
        assert_eq!(n, 1, "only the record under A needs re-encryption");
        assert_eq!(calls.first(), Some(&(0, 2)));
        assert_eq!(calls.last(), Some(&(2, 2)));
        assert_eq!(q.rekey(&mut |_, _| {}).unwrap(), 0);
    }
    let q = Queue::open(opts(dir.path()), Keyring::from_raw(KEY_B, &[])).unwrap();
    assert_eq!(q.body(id).await.unwrap(), b"secret body");
    assert_eq!(q.show(id).await.unwrap().envelope.sender, "a@x");
    assert_eq!(q.list().await.unwrap().len(), 2);
}

/// A tmpfs mounted for the test, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs failed ({status}); this test needs root and must not be skipped"
        );
        SmallFs { dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn full_disk_fails_cleanly_with_no_partial_record() {
    let fs = SmallFs::mount("512k");
    let qdir = fs.dir.path().join("queue");
    let q = open(&qdir);
    let kept = q
        .enqueue(envelope("a@x", &["b@y"]), vec![7; 1000])
        .await
        .unwrap();
    // ballast the "operator" deletes later to free space
    let ballast = fs.dir.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 128 * 1024]).unwrap();
    let err = q
        .enqueue(envelope("c@x", &["d@y"]), vec![8; 1024 * 1024])
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::NoSpace),
        "expected NoSpace, got {err:?}"
    );

    // nothing partial is visible, even while the disk is still full
    let list = q.list().await.unwrap();
    assert_eq!(list.iter().map(|m| m.id).collect::<Vec<_>>(), vec![kept]);
    assert_eq!(q.stats().await.unwrap().messages, 1);
    assert_eq!(q.body(kept).await.unwrap(), vec![7; 1000]);

    // once space is freed, writes work again and still see only the committed message
    std::fs::remove_file(&ballast).unwrap();
    let leases = q.lease_due(SystemTime::now(), 10).await.unwrap();
    assert_eq!(leases.iter().map(|l| l.id).collect::<Vec<_>>(), vec![kept]);
    assert_eq!(q.body(kept).await.unwrap(), vec![7; 1000]);
    drop(q);

    // after reopening, the store is consistent and still accepts small messages
    let q = open(&qdir);
    assert_eq!(q.list().await.unwrap().len(), 1);
    let small = q
        .enqueue(envelope("e@x", &["f@y"]), vec![9; 100])
        .await
        .unwrap();
    assert_eq!(q.body(small).await.unwrap(), vec![9; 100]);
}

#[tokio::test]
async fn due_index_is_rebuilt_from_records_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let q = open(dir.path());
        q.enqueue(envelope("a@x", &["b@y"]), b"b".to_vec())
            .await
            .unwrap()
    };
    {
        let db = redb::Database::create(dir.path().join(crate::store::STORE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(crate::store::DUE).unwrap();
        txn.delete_table(crate::store::DUE_BY_ID).unwrap();
        txn.commit().unwrap();
    }
    let q = open(dir.path());
    let leases = q.lease_due(SystemTime::now(), 10).await.unwrap();
    assert_eq!(leases.iter().map(|l| l.id).collect::<Vec<_>>(), vec![id]);
}

#[tokio::test]
async fn delay_notified_flag_survives_outcomes_and_reopen_and_old_records_decode() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let q = open(dir.path());
        let id = q
            .enqueue(envelope("a@x", &["b@y", "c@y"]), b"b".to_vec())
            .await
            .unwrap();
        let leases = q.lease_due(SystemTime::now(), 1).await.unwrap();
        assert!(leases[0].recipients.iter().all(|r| !r.delay_notified));
        q.mark_delay_notified(id, vec![1]).await.unwrap();
        let deferred = |r: &str| Outcome::Deferred { reason: r.into() };
        q.complete(id, vec![(0, deferred("x")), (1, deferred("y"))])
            .await
            .unwrap();
        assert!(matches!(
            q.mark_delay_notified(id, vec![7]).await,
            Err(QueueError::NoSuchRecipient { index: 7, .. })
        ));
        id
    };
    let q = open(dir.path());
    q.retry(id).await.unwrap();
    let leases = q.lease_due(later(1), 1).await.unwrap();
    let flags: Vec<bool> = leases[0]
        .recipients
        .iter()
        .map(|r| r.delay_notified)
        .collect();
    assert_eq!(flags, vec![false, true]);
    let shown: Vec<bool> = q
        .show(id)
        .await
        .unwrap()
        .recipients
        .iter()
        .map(|r| r.delay_notified)
        .collect();
    assert_eq!(shown, vec![false, true]);
    // A record written before the field existed still decodes, as "not notified".
    let old = r#"{"state":"Pending","attempts":0,"last_error":null,"resume":null}"#;
    let rec: crate::record::RecipientRecord = serde_json::from_str(old).unwrap();
    assert!(!rec.delay_notified);
}

/// While the queue is open its file does not shrink (a shrinking `ftruncate` stalled every
/// enqueue waiting for that commit); a crash image taken then still opens, with what was
/// queued; a clean close cuts the file back, and redb then opens it without a repair.
#[tokio::test]
async fn the_store_file_shrinks_when_the_queue_closes_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(crate::store::STORE_FILE);
    let body = |i: usize| vec![b'a' + (i % 26) as u8; 200 * 1024];
    let (keep, peak) = {
        let q = open(dir.path());
        let mut ids = Vec::new();
        for i in 0..120 {
            ids.push(q.enqueue(envelope("a@x", &["b@y"]), body(i)).await.unwrap());
        }
        let peak = fs::metadata(&file).unwrap().len();
        for id in &ids[1..] {
            q.delete(*id).await.unwrap();
        }
        // later commits, as a running relay makes: redb frees the deleted pages and shrinks
        for _ in 0..5 {
            let id = q.enqueue(envelope("a@x", &["b@y"]), vec![b'z'; 10]).await;
            q.delete(id.unwrap()).await.unwrap();
        }
        assert_eq!(
            fs::metadata(&file).unwrap().len(),
            peak,
            "the file shrank while the queue was open"
        );
        let lengths = q.inner.store.health().lengths.lock().unwrap().unwrap();
        assert!(
            lengths.logical < lengths.physical,
            "redb did not shrink, so the crash image below tests nothing: {lengths:?}"
        );
        // the file as a power cut would leave it: longer than redb's last layout
        let crash = tempfile::tempdir().unwrap();
        fs::copy(&file, crash.path().join(crate::store::STORE_FILE)).unwrap();
        let image = open(crash.path());
        assert_eq!(image.list().await.unwrap().len(), 1);
        assert_eq!(image.body(ids[0]).await.unwrap(), body(0));
        let more = image
            .enqueue(envelope("a@x", &["b@y"]), body(7))
            .await
            .unwrap();
        assert_eq!(image.body(more).await.unwrap(), body(7));
        (ids[0], peak)
    };
    let closed = fs::metadata(&file).unwrap().len();
    assert!(
        closed < peak / 2,
        "closing did not cut the file: {closed} of {peak} bytes"
    );
    let repaired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = repaired.clone();
    let db = redb::Builder::new()
        .set_repair_callback(move |_| flag.store(true, std::sync::atomic::Ordering::SeqCst))
        .open(&file)
        .unwrap();
    drop(db);
    assert!(
        !repaired.load(std::sync::atomic::Ordering::SeqCst),
        "the closed file needed a repair"
    );
    let q = open(dir.path());
    assert_eq!(q.body(keep).await.unwrap(), body(0));
}
