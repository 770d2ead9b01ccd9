//! Group commit: one thread applies every waiting write (enqueues, leases, outcomes) in one
//! transaction and one fsync.
//!
//! An operation may run more than once: when a group transaction fails, it is aborted and each
//! operation is re-run in a transaction of its own, so one bad operation cannot fail the others.
//!
//! A commit that returned an error may still have landed (redb can fail after the new header is
//! written). Each enqueue is then looked up: found, and with no failed fsync since the commit
//! began and a clean sync after, it is answered Ok (it is on disk); found after a failed fsync,
//! it is removed again and refused, because what a failed fsync left on disk is unknown. Leases
//! and outcomes are re-run instead; a lease that landed anyway comes back when it expires.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use redb::ReadableTable;
use tokio::sync::oneshot;

use crate::error::QueueError;
use crate::id::QueueId;
use crate::outbox::{Outbox, Rows};
use crate::store::{op_err, table_err, Store, META};
use crate::tables::Tables;

/// Most bytes of sealed data written in one group transaction.
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// A write waiting for the committer.
pub(crate) type Job = Box<dyn Op>;

/// A write the committer applies inside a (possibly shared) transaction.
pub(crate) trait Op: Send {
    /// Applies the write to `txn`; an error aborts the whole transaction. May run again after an
    /// abort, always on a fresh transaction.
    fn apply(&mut self, t: &mut Tables<'_>) -> Result<(), QueueError>;
    /// Reports the outcome once the transaction holding the last `apply` committed or failed.
    fn finish(self: Box<Self>, result: Result<(), QueueError>);
    /// Bytes this write adds to the transaction (bounds a group's size).
    fn bytes(&self) -> usize {
        0
    }
    /// Whether this write is in the store after a commit that returned an error (redb can fail
    /// after the new header is durable, so a failed commit may still have landed).
    fn landed(&self, _store: &Store) -> bool {
        false
    }
    /// Takes this write out again, for a write that landed but is refused (see `Residue`).
    fn undo(&self, _t: &mut Tables<'_>) -> Result<(), QueueError> {
        Ok(())
    }
    /// The outbox rows this write committed, with their seqs (taken once, after the commit).
    fn take_outbox(&mut self) -> Vec<(u64, Vec<u8>)> {
        Vec::new()
    }
}

/// One enqueue waiting for its commit.
pub(crate) struct Insert {
    pub(crate) id: QueueId,
    pub(crate) meta: Vec<u8>,
    pub(crate) body: Vec<u8>,
    pub(crate) due_ms: u64,
    /// Audit records committed with the message.
    pub(crate) rows: Rows,
    pub(crate) reply: oneshot::Sender<Result<(), QueueError>>,
}

impl Op for Insert {
    fn apply(&mut self, t: &mut Tables<'_>) -> Result<(), QueueError> {
        insert(t, self)?;
        self.rows.put(t)
    }

    fn finish(self: Box<Self>, result: Result<(), QueueError>) {
        // a caller that went away still has its message queued
        let _ = self.reply.send(result);
    }

    fn bytes(&self) -> usize {
        self.meta.len() + self.body.len() + self.rows.bytes()
    }

    fn landed(&self, store: &Store) -> bool {
        let ctx = "checking an enqueue after a failed commit";
        store
            .read(ctx, |txn| {
                let meta = txn.open_table(META).map_err(table_err(ctx))?;
                Ok(meta.get(self.id.as_u128()).map_err(op_err(ctx))?.is_some())
            })
            .unwrap_or(false)
    }

    fn undo(&self, t: &mut Tables<'_>) -> Result<(), QueueError> {
        crate::engine::remove_message(t, self.id)?;
        self.rows.remove(t)
    }

    fn take_outbox(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.rows.take_committed()
    }
}

/// A read-modify-write whose value is sent back once its transaction has committed.
pub(crate) struct Change<T, F> {
    run: F,
    value: Option<Result<T, QueueError>>,
    reply: oneshot::Sender<Result<T, QueueError>>,
}

impl<T, F> Change<T, F>
where
    T: Send + 'static,
    F: FnMut(&mut Tables<'_>) -> Result<T, QueueError> + Send + 'static,
{
    /// A job running `run`, and the receiver of its committed result.
    pub(crate) fn job(run: F) -> (Job, oneshot::Receiver<Result<T, QueueError>>) {
        let (reply, rx) = oneshot::channel();
        let op = Change {
            run,
            value: None,
            reply,
        };
        (Box::new(op), rx)
    }
}

impl<T, F> Op for Change<T, F>
where
    T: Send,
    F: FnMut(&mut Tables<'_>) -> Result<T, QueueError> + Send,
{
    fn apply(&mut self, t: &mut Tables<'_>) -> Result<(), QueueError> {
        match (self.run)(t) {
            Ok(value) => {
                self.value = Some(Ok(value));
                Ok(())
            }
            Err(err @ QueueError::Integrity { .. }) => {
                // the record was moved to quarantine: keep that write, report the error
                self.value = Some(Err(err));
                Ok(())
            }
            Err(err) => {
                self.value = None;
                Err(err)
            }
        }
    }

    fn finish(self: Box<Self>, result: Result<(), QueueError>) {
        let this = *self;
        let value = match (result, this.value) {
            (Ok(()), Some(value)) => value,
            (Ok(()), None) => Err(QueueError::Closed),
            (Err(err), _) => Err(err),
        };
        let _ = this.reply.send(value);
    }
}

/// Handle to the committer thread; dropping it finishes pending jobs and joins the thread.
pub(crate) struct Committer {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
    commits: Arc<AtomicU64>,
}

impl Committer {
    /// Starts the committer thread; `max_batch` 1 disables grouping.
    pub(crate) fn start(
        store: Arc<Store>,
        outbox: Arc<Outbox>,
        max_batch: usize,
    ) -> Result<Committer, QueueError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let path = store.path().to_path_buf();
        let commits = Arc::new(AtomicU64::new(0));
        let counter = commits.clone();
        let thread = thread::Builder::new()
            .name("queue-commit".into())
            .spawn(move || run(&store, &outbox, &rx, max_batch.max(1), &counter))
            .map_err(|e| QueueError::io("starting the committer thread", path, e))?;
        Ok(Committer {
            tx: Some(tx),
            thread: Some(thread),
            commits,
        })
    }

    /// Hands a job to the committer.
    pub(crate) fn submit(&self, job: Job) -> Result<(), QueueError> {
        self.tx
            .as_ref()
            .ok_or(QueueError::Closed)?
            .send(job)
            .map_err(|_| QueueError::Closed)
    }

    /// Number of group transactions begun so far (counted before any of their jobs is answered).
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("queue committer thread panicked");
            }
        }
    }
}

fn run(
    store: &Store,
    outbox: &Outbox,
    rx: &mpsc::Receiver<Job>,
    max_batch: usize,
    commits: &AtomicU64,
) {
    while let Ok(first) = rx.recv() {
        let mut bytes = first.bytes();
        let mut batch = vec![first];
        while batch.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(job) => {
                    bytes += job.bytes();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        // Counted before any job of the batch is answered, so a caller that got its answer
        // sees its group in the count.
        commits.fetch_add(1, Ordering::SeqCst);
        commit_batch(store, outbox, batch);
    }
}

fn commit_batch(store: &Store, outbox: &Outbox, mut batch: Vec<Job>) {
    let failed_syncs = store.health().sync_failures();
    // one set of open tables for the whole group
    let result = store.write("committing queue writes", |t| {
        for job in &mut batch {
            job.apply(t)?;
        }
        Ok(())
    });
    let err = match result {
        Ok(()) => {
            // The audit log gets the committed records before anyone hears of the commit, so
            // they come ahead of any record made because of it.
            outbox.committed(batch.iter_mut().flat_map(|job| job.take_outbox()).collect());
            for job in batch {
                job.finish(Ok(()));
            }
            return;
        }
        Err(err) => err,
    };
    // An fsync that failed leaves unknown what reached the disk: nothing found in the store
    // afterwards counts as durable.
    let synced = store.health().sync_failures() == failed_syncs;
    // A full disk fails every re-run too, and a lone job has nothing to be isolated from.
    let rerun = !matches!(err, QueueError::NoSpace) && batch.len() > 1;
    if rerun {
        tracing::debug!(error = %err, jobs = batch.len(), "group commit failed; committing one by one");
    }
    let mut durable = None;
    let mut err = Some(err);
    for mut job in batch {
        match residue(store, &*job, synced, &mut durable) {
            Residue::Durable => {
                outbox.committed(job.take_outbox());
                job.finish(Ok(()));
            }
            Residue::Absent if rerun => {
                let result = store.write("committing a queue write", |t| job.apply(t));
                if result.is_ok() {
                    outbox.committed(job.take_outbox());
                }
                job.finish(result);
            }
            Residue::Absent | Residue::Removed => job.finish(Err(take_or_copy(&mut err))),
        }
    }
}

/// What a failed commit left of one job's write.
enum Residue {
    /// Not in the store.
    Absent,
    /// In the store, and a later fsync succeeded: the commit took effect.
    Durable,
    /// In the store but not known to be on disk; removed again (or, if that failed too, left
    /// for delivery: a duplicate if the client retries, never a loss).
    Removed,
}

/// Finds out what a failed commit left of `job`; `durable` caches the one sync all jobs share.
fn residue(store: &Store, job: &dyn Op, synced: bool, durable: &mut Option<bool>) -> Residue {
    if !job.landed(store) {
        return Residue::Absent;
    }
    let durable = *durable.get_or_insert_with(|| synced && store.sync().is_ok());
    if durable {
        return Residue::Durable;
    }
    if let Err(e) = store.write("removing a write whose commit failed", |t| job.undo(t)) {
        tracing::error!(
            error = %e,
            "a refused queue write could not be removed; it may still be delivered"
        );
    }
    Residue::Removed
}

/// The commit's error for the first job answered with it, a copy of its text for the rest.
fn take_or_copy(err: &mut Option<QueueError>) -> QueueError {
    match err.take() {
        Some(e) => {
            *err = Some(copy(&e));
            e
        }
        None => QueueError::Closed,
    }
}

/// An owned error saying the same as `err` (`QueueError` holds I/O errors and is not `Clone`).
fn copy(err: &QueueError) -> QueueError {
    match err {
        QueueError::NoSpace => QueueError::NoSpace,
        other => QueueError::Storage {
            context: "committing queue writes",
            source: Box::new(redb::Error::Io(std::io::Error::other(other.to_string()))),
        },
    }
}

fn insert(t: &mut Tables<'_>, job: &Insert) -> Result<(), QueueError> {
    let ctx = "committing enqueued messages";
    let id = job.id.as_u128();
    let meta = t.meta(ctx)?;
    if meta.get(id).map_err(op_err(ctx))?.is_some() {
        return Err(QueueError::storage(
            ctx,
            redb::StorageError::Corrupted(format!("duplicate queue id {}", job.id)),
        ));
    }
    meta.insert(id, job.meta.as_slice()).map_err(op_err(ctx))?;
    crate::body::put(t, job.id, &job.body)?;
    let (due, due_by_id) = t.due_index(ctx)?;
    due.insert((job.due_ms, id), ()).map_err(op_err(ctx))?;
    due_by_id.insert(id, job.due_ms).map_err(op_err(ctx))?;
    Ok(())
}
