//! Commits that fail part-way, with faults injected under redb (see `backend.rs`): an enqueue
//! is answered Ok only if its write is on disk, and a refused one leaves nothing behind.

use super::faults_support::{arm, faults, fired};
use super::*;

async fn ids(q: &Queue) -> Vec<QueueId> {
    let mut ids: Vec<_> = q.list().await.unwrap().iter().map(|m| m.id).collect();
    ids.sort();
    ids
}

/// Starts `n` enqueues while the committer is blocked, then lets them commit as one group (the
/// blocker's own commit passes one clean sync before any armed sync fault).
async fn grouped_enqueues(q: &Queue, n: usize) -> Vec<Result<QueueId, QueueError>> {
    arm(&faults(q).clean_syncs, 1);
    let blocked = block_committer(q);
    let before = q.commit_count();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let q = q.clone();
            tokio::spawn(async move {
                q.enqueue(envelope("a@x", &["b@y"]), vec![i as u8; 5000])
                    .await
            })
        })
        .collect();
    // sealing runs on the blocking pool; give every enqueue time to reach the committer
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocked.release().await;
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    // one group holding every enqueue (the blocker's was counted when it began, before
    // `before`; re-runs are not counted)
    assert_eq!(
        q.commit_count() - before,
        1,
        "the enqueues did not form one group"
    );
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_errs_after_a_successful_sync_is_answered_ok() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    arm(&faults(&q).errors_after_sync, 1);
    let id = q
        .enqueue(envelope("a@x", &["b@y"]), b"landed".to_vec())
        .await
        .expect("the write is on disk, so the enqueue succeeds");
    fired(&faults(&q).errors_after_sync);
    assert_eq!(q.inner.store.health().sync_failures(), 0);
    drop(q);
    let q = open(dir.path());
    assert_eq!(ids(&q).await, vec![id]);
    assert_eq!(q.body(id).await.unwrap(), b"landed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_refuses_the_enqueue_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let kept = q
        .enqueue(envelope("a@x", &["b@y"]), b"kept".to_vec())
        .await
        .unwrap();
    arm(&faults(&q).failed_syncs, 1);
    let err = q
        .enqueue(envelope("c@x", &["d@y"]), b"refused".to_vec())
        .await
        .expect_err("an fsync error must not be answered Ok");
    fired(&faults(&q).failed_syncs);
    assert!(matches!(err, QueueError::Storage { .. }), "{err:?}");
    assert_eq!(q.inner.store.health().sync_failures(), 1);
    // the write reached redb's pages (the sync ran), and was taken out again
    assert_eq!(ids(&q).await, vec![kept]);
    assert_eq!(q.stats().await.unwrap().messages, 1);
    assert_eq!(
        q.inner.hot.bytes(),
        b"kept".len(),
        "a refused body is not kept for delivery"
    );
    let next = q
        .enqueue(envelope("e@x", &["f@y"]), b"next".to_vec())
        .await
        .unwrap();
    drop(q);
    let q = open(dir.path());
    let mut want = vec![kept, next];
    want.sort();
    assert_eq!(ids(&q).await, want);
    let leases = q.lease_due(later(1), 10).await.unwrap();
    assert_eq!(leases.len(), 2, "the refused message is never leased");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_full_disk_refuses_the_enqueue_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    arm(&faults(&q).no_space_writes, 1);
    let err = q
        .enqueue(envelope("a@x", &["b@y"]), vec![1; 300_000])
        .await
        .unwrap_err();
    fired(&faults(&q).no_space_writes);
    assert!(matches!(err, QueueError::NoSpace), "{err:?}");
    assert!(ids(&q).await.is_empty());
    assert_eq!(
        q.inner.hot.bytes(),
        0,
        "a refused body is not kept for delivery"
    );
    let id = q
        .enqueue(envelope("a@x", &["b@y"]), vec![2; 300_000])
        .await
        .unwrap();
    drop(q);
    let q = open(dir.path());
    assert_eq!(ids(&q).await, vec![id]);
    assert_eq!(q.body(id).await.unwrap(), vec![2; 300_000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_commit_errs_after_its_sync_is_answered_ok_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    arm(&faults(&q).errors_after_sync, 1);
    let results = grouped_enqueues(&q, 5).await;
    fired(&faults(&q).errors_after_sync);
    let mut acked: Vec<QueueId> = results
        .into_iter()
        .map(|r| r.expect("every write of the group is on disk"))
        .collect();
    acked.sort();
    drop(q);
    let q = open(dir.path());
    assert_eq!(ids(&q).await, acked, "each message stored exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_fsync_failed_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    arm(&faults(&q).failed_syncs, 1);
    let results = grouped_enqueues(&q, 5).await;
    fired(&faults(&q).failed_syncs);
    for r in &results {
        assert!(r.is_err(), "an fsync error must not be answered Ok: {r:?}");
    }
    assert!(ids(&q).await.is_empty());
    drop(q);
    let q = open(dir.path());
    assert!(ids(&q).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_commit_erred_after_landing_comes_back_when_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path());
    let id = q
        .enqueue(envelope("a@x", &["b@y"]), b"m".to_vec())
        .await
        .unwrap();
    let now = SystemTime::now();
    arm(&faults(&q).errors_after_sync, 1);
    assert!(q.lease_due(now, 10).await.is_err());
    fired(&faults(&q).errors_after_sync);
    // the lease landed: the recipient is in flight, not due, until the lease runs out
    assert!(q.lease_due(now, 10).await.unwrap().is_empty());
    let after = now + opts(dir.path()).lease + Duration::from_secs(1);
    let leases = q.lease_due(after, 10).await.unwrap();
    assert_eq!(leases.iter().map(|l| l.id).collect::<Vec<_>>(), vec![id]);
}
