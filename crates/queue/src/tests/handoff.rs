//! Messages handed straight to delivery at enqueue (see `handoff.rs`): stored leased, handed
//! over only once durable, and back in the queue like any lease if delivery never finishes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::faults_support::{arm, faults, fired};
use super::*;

/// A hand-off with `room` places that records the leases it receives.
#[derive(Default)]
struct Recorder {
    room: AtomicUsize,
    reserved: AtomicUsize,
    dropped_unused: AtomicUsize,
    got: Mutex<Vec<Lease>>,
}

struct RecorderSlot {
    owner: Arc<Recorder>,
    used: AtomicBool,
}

struct Shared(Arc<Recorder>);

impl Handoff for Shared {
    fn reserve(&self) -> Option<Box<dyn HandoffSlot>> {
        let left = self.0.room.load(Ordering::SeqCst);
        if left == 0 {
            return None;
        }
        self.0.room.store(left - 1, Ordering::SeqCst);
        self.0.reserved.fetch_add(1, Ordering::SeqCst);
        Some(Box::new(RecorderSlot {
            owner: self.0.clone(),
            used: AtomicBool::new(false),
        }))
    }
}

impl HandoffSlot for RecorderSlot {
    fn deliver(self: Box<Self>, lease: Lease) {
        self.used.store(true, Ordering::SeqCst);
        self.owner.got.lock().unwrap().push(lease);
    }
}

impl Drop for RecorderSlot {
    fn drop(&mut self) {
        if !self.used.load(Ordering::SeqCst) {
            self.owner.dropped_unused.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn recorder(q: &Queue, room: usize) -> Arc<Recorder> {
    let r = Arc::new(Recorder::default());
    r.room.store(room, Ordering::SeqCst);
    q.set_handoff(Some(Arc::new(Shared(r.clone()))));
    r
}

#[tokio::test]
async fn a_handed_over_message_is_stored_leased_and_not_leased_twice() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let rec = recorder(&q, 1);
    let env = envelope("a@x.example", &["r1@y.example", "r2@z.example"]);
    let id = q.enqueue(env.clone(), b"hello\r\n".to_vec()).await.unwrap();
    let got = rec.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "handed over once the commit returned");
    let lease = &got[0];
    assert_eq!(lease.id, id);
    assert_eq!(lease.envelope, env);
    assert_eq!(lease.recipients.len(), 2);
    for (i, r) in lease.recipients.iter().enumerate() {
        assert_eq!(r.index, i);
        assert_eq!(r.address, env.recipients[i].address);
        assert_eq!(r.notify.as_deref(), Some("FAILURE"));
        assert_eq!((r.attempts, r.delay_notified), (0, false));
        assert_eq!(r.last_error, None);
        assert_eq!(r.previous, RecipientState::Pending);
    }
    // the store says in flight, so nothing else leases it until the lease runs out
    let detail = q.show(id).await.unwrap();
    assert!(detail
        .recipients
        .iter()
        .all(|r| matches!(r.state, RecipientState::InFlight { .. })));
    assert!(q.lease_due(SystemTime::now(), 10).await.unwrap().is_empty());
    // and the due index points at the end of the lease, as `lease_due` would have set it
    let due = q
        .next_due()
        .await
        .unwrap()
        .expect("due once the lease ends");
    assert!(due > later(59) && due <= later(60), "{due:?}");
    let after_lease = q.lease_due(later(61), 10).await.unwrap();
    assert_eq!(
        after_lease.len(),
        1,
        "an unfinished hand-off comes back when its lease ends"
    );
    // the outcome is recorded as for any lease
    q.complete(
        id,
        vec![
            (
                0,
                Outcome::Delivered {
                    remote: "mx".into(),
                },
            ),
            (
                1,
                Outcome::Delivered {
                    remote: "mx".into(),
                },
            ),
        ],
    )
    .await
    .unwrap();
    assert!(q.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn with_no_room_the_message_waits_for_lease_due() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let rec = recorder(&q, 1);
    let first = q
        .enqueue(envelope("a@x", &["b@y"]), b"1".to_vec())
        .await
        .unwrap();
    let second = q
        .enqueue(envelope("a@x", &["c@y"]), b"2".to_vec())
        .await
        .unwrap();
    let got: Vec<QueueId> = rec.got.lock().unwrap().iter().map(|l| l.id).collect();
    assert_eq!(got, vec![first]);
    let leased: Vec<QueueId> = q
        .lease_due(SystemTime::now(), 10)
        .await
        .unwrap()
        .iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(
        leased,
        vec![second],
        "only the message not handed over is due"
    );
    q.set_handoff(None);
    let third = q
        .enqueue(envelope("a@x", &["d@y"]), b"3".to_vec())
        .await
        .unwrap();
    assert_eq!(
        rec.reserved.load(Ordering::SeqCst),
        1,
        "no hand-off once removed"
    );
    let leased = q.lease_due(SystemTime::now(), 10).await.unwrap();
    assert_eq!(leased.iter().map(|l| l.id).collect::<Vec<_>>(), vec![third]);
}

#[tokio::test]
async fn a_hand_off_never_finished_is_due_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let rec = recorder(&q, 1);
    let id = q
        .enqueue(envelope("a@x", &["b@y"]), b"x".to_vec())
        .await
        .unwrap();
    assert_eq!(rec.got.lock().unwrap().len(), 1);
    drop(q); // as if the relay died during the delivery
    let q = open(dir.path());
    let leased = q.lease_due(SystemTime::now(), 10).await.unwrap();
    assert_eq!(leased.iter().map(|l| l.id).collect::<Vec<_>>(), vec![id]);
    assert_eq!(leased[0].recipients[0].previous, RecipientState::Pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_enqueue_hands_nothing_over_and_gives_its_place_back() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let rec = recorder(&q, 5);
    arm(&faults(&q).failed_syncs, 1);
    q.enqueue(envelope("c@x", &["d@y"]), b"refused".to_vec())
        .await
        .expect_err("an fsync error must not be answered Ok");
    fired(&faults(&q).failed_syncs);
    assert!(rec.got.lock().unwrap().is_empty(), "nothing handed over");
    assert_eq!(
        rec.dropped_unused.load(Ordering::SeqCst),
        1,
        "the place was given back"
    );
    assert!(q.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_held_enqueue_is_handed_over_only_when_released() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let rec = recorder(&q, 3);
    let held = q
        .enqueue_held(envelope("a@x", &["b@y"]), b"1".to_vec())
        .await
        .unwrap();
    let id = held.id();
    assert!(
        rec.got.lock().unwrap().is_empty(),
        "nothing before the go-ahead"
    );
    held.release();
    let got: Vec<QueueId> = rec.got.lock().unwrap().iter().map(|l| l.id).collect();
    assert_eq!(got, vec![id]);

    // withdrawn: the place is given back and nothing is handed over
    let withdrawn = q
        .enqueue_held(envelope("a@x", &["c@y"]), b"2".to_vec())
        .await
        .unwrap();
    let gone = withdrawn.id();
    withdrawn.withdraw();
    assert_eq!(rec.got.lock().unwrap().len(), 1);
    assert_eq!(rec.dropped_unused.load(Ordering::SeqCst), 1);
    q.delete(gone).await.unwrap();

    // dropped without a word (a caller that went away): delivered all the same
    let dropped = q
        .enqueue_held(envelope("a@x", &["d@y"]), b"3".to_vec())
        .await
        .unwrap();
    let kept = dropped.id();
    drop(dropped);
    let got: Vec<QueueId> = rec.got.lock().unwrap().iter().map(|l| l.id).collect();
    assert_eq!(got, vec![id, kept]);
}

#[tokio::test]
async fn due_now_counts_due_messages_up_to_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    for i in 0..3 {
        q.enqueue(envelope("a@x", &[&format!("r{i}@y")]), b"x".to_vec())
            .await
            .unwrap();
    }
    let now = SystemTime::now();
    let before = q.due_now(now, 10).await.unwrap();
    assert_eq!(before.count, 3);
    assert!(before.next.is_some_and(|t| t <= now));
    assert_eq!(q.due_now(now, 2).await.unwrap().count, 2);
    assert_eq!(q.lease_due(now, 10).await.unwrap().len(), 3);
    let after = q.due_now(now, 10).await.unwrap();
    assert_eq!(after.count, 0, "leased ones are not due");
    let next = after.next.expect("due again once the leases end");
    assert!(next > later(59) && next <= later(60), "{next:?}");
    assert_eq!(
        q.due_now(later(61), 10).await.unwrap().count,
        3,
        "due again after the lease"
    );
}

/// `Enqueued` is held across an await by every submission task, and a task is as large as the
/// largest state it can be in: kept small, it does not grow every idle session.
#[test]
fn enqueued_stays_small() {
    assert!(
        std::mem::size_of::<Enqueued>() <= 64,
        "{} bytes",
        std::mem::size_of::<Enqueued>()
    );
}
