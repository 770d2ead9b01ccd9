//! Group commit: one thread writes all waiting enqueues in one transaction and one fsync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use redb::ReadableTable;
use tokio::sync::oneshot;

use crate::error::QueueError;
use crate::id::QueueId;
use crate::store::{op_err, table_err, Store, BODY, DUE, DUE_BY_ID, META};

/// Most bytes of sealed data written in one group transaction.
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// One enqueue waiting for its commit.
pub(crate) struct Job {
    pub(crate) id: QueueId,
    pub(crate) meta: Vec<u8>,
    pub(crate) body: Vec<u8>,
    pub(crate) due_ms: u64,
    pub(crate) reply: oneshot::Sender<Result<(), QueueError>>,
}

impl Job {
    fn bytes(&self) -> usize {
        self.meta.len() + self.body.len()
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
    pub(crate) fn start(store: Arc<Store>, max_batch: usize) -> Result<Committer, QueueError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let path = store.path().to_path_buf();
        let commits = Arc::new(AtomicU64::new(0));
        let counter = commits.clone();
        let thread = thread::Builder::new()
            .name("queue-commit".into())
            .spawn(move || run(&store, &rx, max_batch.max(1), &counter))
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

    /// Number of group transactions committed so far.
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
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

fn run(store: &Store, rx: &mpsc::Receiver<Job>, max_batch: usize, commits: &AtomicU64) {
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
        commit_batch(store, batch);
        commits.fetch_add(1, Ordering::Relaxed);
    }
}

fn commit_batch(store: &Store, batch: Vec<Job>) {
    let result = store.write("committing enqueued messages", |txn| {
        for job in &batch {
            insert(txn, job)?;
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            for job in batch {
                // a caller that went away still has its message queued
                let _ = job.reply.send(Ok(()));
            }
        }
        Err(QueueError::NoSpace) => {
            for job in batch {
                let _ = job.reply.send(Err(QueueError::NoSpace));
            }
        }
        Err(err) if batch.len() == 1 => {
            if let Some(job) = batch.into_iter().next() {
                let _ = job.reply.send(Err(err));
            }
        }
        Err(err) => {
            // one bad job must not fail the others: retry each on its own
            tracing::warn!(error = %err, jobs = batch.len(), "group commit failed; committing one by one");
            for job in batch {
                let result = store.write("committing an enqueued message", |txn| insert(txn, &job));
                let _ = job.reply.send(result);
            }
        }
    }
}

fn insert(txn: &redb::WriteTransaction, job: &Job) -> Result<(), QueueError> {
    let ctx = "committing enqueued messages";
    let id = job.id.as_u128();
    let mut meta = txn.open_table(META).map_err(table_err(ctx))?;
    if meta.get(id).map_err(op_err(ctx))?.is_some() {
        return Err(QueueError::storage(
            ctx,
            redb::StorageError::Corrupted(format!("duplicate queue id {}", job.id)),
        ));
    }
    meta.insert(id, job.meta.as_slice()).map_err(op_err(ctx))?;
    let mut bodies = txn.open_table(BODY).map_err(table_err(ctx))?;
    bodies
        .insert(id, job.body.as_slice())
        .map_err(op_err(ctx))?;
    let mut due = txn.open_table(DUE).map_err(table_err(ctx))?;
    due.insert((job.due_ms, id), ()).map_err(op_err(ctx))?;
    let mut due_by_id = txn.open_table(DUE_BY_ID).map_err(table_err(ctx))?;
    due_by_id.insert(id, job.due_ms).map_err(op_err(ctx))?;
    Ok(())
}
