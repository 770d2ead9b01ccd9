//! Sealpost's durable, encrypted message queue.
//!
//! Messages are sealed with AES-256-GCM (aws-lc-rs) and stored in redb; `enqueue` returns only
//! after the record is committed (fsync'd). Concurrent enqueues, leases and delivery outcomes
//! share one commit.

mod admin;
mod backend;
mod body;
mod commit;
mod crypto;
mod engine;
mod error;
mod handoff;
mod hot;
mod id;
mod keys;
mod outbox;
mod record;
mod schedule;
mod store;
mod tables;
#[cfg(test)]
mod tests;

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, Notify};

pub use admin::{MessageDetail, MessageSummary, RecipientDetail, StateCounts, Stats};
pub use error::QueueError;
pub use handoff::{Enqueued, Handoff, HandoffSlot};
pub use id::{ParseQueueIdError, QueueId};
pub use keys::{KeyError, Keyring};
pub use outbox::OutboxSink;
pub use record::{Envelope, RecipientSpec, RecipientState};

use crate::commit::{Change, Committer, Insert};
use crate::crypto::Kind;
use crate::engine::{Core, Inner};
use crate::hot::HotBodies;
use crate::outbox::{Outbox, Rows};
use crate::record::MessageRecord;
use crate::schedule::to_ms;
use crate::store::{Store, STORE_FILE};
use crate::tables::Tables;

/// Bodies up to this size are sealed on the calling task instead of a blocking thread.
const INLINE_SEAL_BYTES: usize = 64 * 1024;

/// What is due: see [`Queue::due_now`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DueNow {
    /// Messages due now, up to the `max` asked for.
    pub count: usize,
    /// When the earliest message is due (perhaps in the past), if any is ever due.
    pub next: Option<SystemTime>,
}

/// Where the queue lives and how it schedules retries.
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// Queue directory (created 0700 if missing); holds `queue.redb`.
    pub dir: PathBuf,
    /// Retry delays: after attempt n the next is `retry[n-1]` (the last entry repeats), ±10%.
    pub retry: Vec<Duration>,
    /// How long a message may stay queued (enforced by the scheduler via [`Queue::expired`]).
    pub lifetime: Duration,
    /// How long a lease lasts before its recipients are due again.
    pub lease: Duration,
}

/// Benchmark knobs (not for production use).
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Most enqueues per group commit (1 = no group commit).
    pub max_batch: usize,
    /// Bytes of just-enqueued bodies kept in memory for their first delivery (0 = none).
    pub hot_bytes: usize,
    /// Audit records waiting in the outbox before new ones are refused.
    pub outbox_limit: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            max_batch: 256,
            hot_bytes: hot::DEFAULT_BUDGET,
            outbox_limit: outbox::DEFAULT_LIMIT,
        }
    }
}

/// A recipient handed to a delivery worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeasedRecipient {
    /// Index in the envelope (used in [`Queue::complete`]).
    pub index: usize,
    /// Address.
    pub address: String,
    /// DSN `NOTIFY=`.
    pub notify: Option<String>,
    /// DSN `ORCPT=`.
    pub orcpt: Option<String>,
    /// Attempts made so far.
    pub attempts: u32,
    /// The last error.
    pub last_error: Option<String>,
    /// A delay notice was already sent for this recipient.
    pub delay_notified: bool,
    /// The state before this lease (Pending, Deferred or Held tells the worker where it stands).
    pub previous: RecipientState,
}

/// Due recipients of one message, leased to a delivery worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Queue id.
    pub id: QueueId,
    /// The envelope.
    pub envelope: Envelope,
    /// When the message was queued.
    pub arrival: SystemTime,
    /// The leased recipients.
    pub recipients: Vec<LeasedRecipient>,
}

/// What happened to one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered (final).
    Delivered {
        /// The receiving MX.
        remote: String,
    },
    /// Failed (final): bounced or dropped by the caller.
    Failed {
        /// Why.
        reason: String,
    },
    /// Temporary failure: due again after the retry schedule's delay.
    Deferred {
        /// Why.
        reason: String,
    },
    /// Diverted: waiting for fallback step `step`, due again at `until`.
    Held {
        /// When it is due again.
        until: SystemTime,
        /// The fallback step to run then.
        step: u32,
        /// Why.
        reason: String,
    },
}

/// Handle to the queue; cheap to clone, shareable across tasks.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

impl Queue {
    /// Opens (creating if needed) the queue; detects a corrupt store; returns crashed leases to due.
    pub fn open(opts: QueueOptions, keys: Keyring) -> Result<Queue, QueueError> {
        Self::open_tuned(opts, keys, Tuning::default())
    }

    /// Like [`Queue::open`] with benchmark knobs.
    #[doc(hidden)]
    pub fn open_tuned(
        opts: QueueOptions,
        keys: Keyring,
        tuning: Tuning,
    ) -> Result<Queue, QueueError> {
        if opts.retry.is_empty() {
            return Err(QueueError::Options("retry schedule is empty"));
        }
        if opts.lease.is_zero() {
            return Err(QueueError::Options("lease duration is zero"));
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&opts.dir)
            .map_err(|e| QueueError::io("creating the queue directory", opts.dir.clone(), e))?;
        crypto::warm_up().map_err(|_| QueueError::Encrypt)?;
        let store = Arc::new(Store::open(&opts.dir.join(STORE_FILE))?);
        let outbox = Arc::new(Outbox::load(&store, tuning.outbox_limit)?);
        let committer = Committer::start(store.clone(), outbox.clone(), tuning.max_batch)?;
        let inner = Inner {
            store,
            core: Arc::new(Core {
                keys,
                opts,
                quarantined: Default::default(),
            }),
            notify: Arc::new(Notify::new()),
            committer,
            hot: HotBodies::new(tuning.hot_bytes),
            handoff: Default::default(),
            outbox,
        };
        let recovered = inner.recover_leases()?;
        if recovered > 0 {
            tracing::info!(
                recipients = recovered,
                "returned in-flight recipients from a crash to the queue"
            );
        }
        Ok(Queue {
            inner: Arc::new(inner),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|_| QueueError::Closed)?
    }

    /// Stores a message; returns its id only once it is durable (committed and fsync'd).
    pub async fn enqueue(&self, env: Envelope, body: Vec<u8>) -> Result<QueueId, QueueError> {
        let queued = self.enqueue_held(env, body).await?;
        let id = queued.id();
        queued.release();
        Ok(id)
    }

    /// [`enqueue`](Self::enqueue), but delivery does not start before [`Enqueued::release`]
    /// (or the drop of the returned value): the caller can first record the acceptance, or
    /// [`Enqueued::withdraw`] the message if it cannot.
    pub async fn enqueue_held(&self, env: Envelope, body: Vec<u8>) -> Result<Enqueued, QueueError> {
        self.enqueue_recorded(env, body, |_| Ok(Vec::new())).await
    }

    /// [`enqueue_held`](Self::enqueue_held) that also commits audit records about the new
    /// message (`rows` gets its id) in the same transaction: they are in the outbox when this
    /// returns, and the sink gets them before delivery can start (see `outbox.rs`). Refused
    /// with [`QueueError::OutboxFull`] while too many records wait for the audit log.
    pub async fn enqueue_recorded(
        &self,
        env: Envelope,
        body: Vec<u8>,
        rows: impl FnOnce(QueueId) -> Result<Vec<Vec<u8>>, String> + Send + 'static,
    ) -> Result<Enqueued, QueueError> {
        if env.recipients.is_empty() {
            return Err(QueueError::NoRecipients);
        }
        let id = QueueId::generate();
        let arrival = SystemTime::now();
        let inline = body.len() <= INLINE_SEAL_BYTES;
        // Delivery takes the message at once if it has room: it is stored already leased, and
        // the lease goes to delivery once the commit is durable (no `lease_due` round trip).
        let slot = self.inner.reserve_handoff();
        let lease_until = slot.as_ref().map(|_| arrival + self.inner.core.opts.lease);
        let prepare = move |inner: &Inner| {
            let mut record = MessageRecord::new(env, arrival, body.len() as u64);
            // every recipient of a new record is pending, due at its arrival
            let lease = lease_until.and_then(|until| record.lease(id, to_ms(arrival), until));
            let plain = record.encode().map_err(|e| QueueError::Decode {
                id,
                detail: e.to_string(),
            })?;
            let meta = inner.core.seal(id, Kind::Meta, &plain)?;
            let sealed = inner.core.seal(id, Kind::Body, &body)?;
            let rows = match rows(id).map_err(QueueError::OutboxRow)? {
                plain if plain.is_empty() => Rows::none(),
                plain => {
                    inner.outbox.check_room()?;
                    Rows::seal(&inner.core, id, plain)?
                }
            };
            let (reply, rx) = oneshot::channel();
            let job = Insert {
                id,
                meta,
                body: sealed,
                due_ms: to_ms(lease.as_ref().and(lease_until).unwrap_or(arrival)),
                rows,
                reply,
            };
            Ok((job, rx, body, lease))
        };
        // A small body is sealed right here (tens of microseconds): the trip to a blocking
        // thread and back costs more than that under load. A large one would hold up the other
        // tasks of this worker thread.
        let (job, rx, plain_body, lease) = if inline {
            prepare(&self.inner)?
        } else {
            self.blocking(prepare).await?
        };
        // Kept before the commit (dropped at once if it does not fit), so that a delivery that
        // leases the message the moment it is durable finds it, and an outcome recorded then
        // cannot be followed by a late insert. Nothing can lease it before the commit.
        self.inner.hot.insert(id, Arc::new(plain_body));
        let committed = async {
            self.inner.committer.submit(Box::new(job))?;
            rx.await.map_err(|_| QueueError::Closed)?
        };
        if let Err(e) = committed.await {
            // a reserved place, if any, is given back by dropping it
            self.inner.hot.remove(id);
            return Err(e);
        }
        Ok(Enqueued::new(
            id,
            slot.zip(lease),
            self.inner.notify.clone(),
        ))
    }

    /// Sets (or with `None` removes) where committed audit records go: called on the committer
    /// thread with each commit's rows (seq, record), in seq order.
    pub fn set_outbox_sink(&self, sink: Option<OutboxSink>) {
        self.inner.outbox.set_sink(sink);
    }

    /// Every audit record still in the outbox (seq, record), in seq order: at a start, the ones
    /// the audit log may lack.
    pub async fn outbox_pending(&self) -> Result<Vec<(u64, Vec<u8>)>, QueueError> {
        self.blocking(|inner| outbox::pending(&inner.store, &inner.core))
            .await
    }

    /// Drops the outbox's records up to seq `through` (the audit log has them on disk);
    /// returns how many.
    pub async fn outbox_trim(&self, through: u64) -> Result<u64, QueueError> {
        let dropped = self.committed(move |_, t| outbox::trim(t, through)).await?;
        self.inner.outbox.trimmed(through);
        Ok(dropped)
    }

    /// Audit records committed but not yet dropped from the outbox.
    pub fn outbox_waiting(&self) -> u64 {
        self.inner.outbox.waiting()
    }

    /// Lets delivery take just-committed messages directly (`None` stops it; messages then wait
    /// for [`lease_due`](Self::lease_due)).
    pub fn set_handoff(&self, handoff: Option<Arc<dyn Handoff>>) {
        let mut current = self
            .inner
            .handoff
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = handoff;
    }

    /// Runs a read-modify-write on the committer, sharing a transaction (and its fsync) with
    /// whatever else is waiting; returns once it is durable.
    async fn committed<T: Send + 'static>(
        &self,
        run: impl FnMut(&Core, &mut Tables<'_>) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let core = self.inner.core.clone();
        let mut run = run;
        let (job, rx) = Change::job(move |t: &mut Tables<'_>| run(&core, t));
        self.inner.committer.submit(job)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// Signalled after each enqueue, release and retry so the scheduler wakes.
    pub fn notify(&self) -> Arc<Notify> {
        self.inner.notify.clone()
    }

    /// When the earliest due recipient is due, if any.
    pub async fn next_due(&self) -> Result<Option<SystemTime>, QueueError> {
        self.blocking(|inner| inner.next_due()).await
    }

    /// How many messages are due at `now` (counting no further than `max`) and when the
    /// earliest is due: one read, for sizing the next [`lease_due`](Self::lease_due) and the
    /// scheduler's sleep.
    pub async fn due_now(&self, now: SystemTime, max: usize) -> Result<DueNow, QueueError> {
        self.blocking(move |inner| inner.due_now(to_ms(now), max))
            .await
    }

    /// Leases the due recipients of up to `max` messages (in-flight until `now + lease`).
    pub async fn lease_due(&self, now: SystemTime, max: usize) -> Result<Vec<Lease>, QueueError> {
        self.committed(move |core, t| core.lease_due(t, now, max))
            .await
    }

    /// The decrypted body of a queued message, read from the store.
    pub async fn body(&self, id: QueueId) -> Result<Vec<u8>, QueueError> {
        self.blocking(move |inner| inner.body(id)).await
    }

    /// Sets how many bytes of just-enqueued bodies are kept in memory for their first delivery
    /// (0: none, e.g. while delivery is paused).
    pub fn set_fresh_body_budget(&self, bytes: usize) {
        self.inner.hot.set_budget(bytes);
    }

    /// Drops the just-enqueued bodies kept in memory longer than a minute.
    pub fn forget_stale_bodies(&self) {
        self.inner.hot.expire();
    }

    /// Drops the copy of message `id`'s body kept in memory for its first delivery, if any.
    pub fn forget_body(&self, id: QueueId) {
        self.inner.hot.remove(id);
    }

    /// The body of a queued message for delivery: from memory if it was enqueued moments ago
    /// (see `hot.rs`), otherwise read from the store and decrypted.
    pub async fn delivery_body(&self, id: QueueId) -> Result<Arc<Vec<u8>>, QueueError> {
        if let Some(body) = self.inner.hot.get(id) {
            return Ok(body);
        }
        self.body(id).await.map(Arc::new)
    }

    /// Records outcomes per recipient index; removes the message once every recipient is final.
    pub async fn complete(
        &self,
        id: QueueId,
        results: Vec<(usize, Outcome)>,
    ) -> Result<(), QueueError> {
        let now = SystemTime::now();
        // whatever the outcome, the next attempt (if any) is far enough away to read the store
        self.inner.hot.remove(id);
        let due_again = results
            .iter()
            .any(|(_, o)| !matches!(o, Outcome::Delivered { .. } | Outcome::Failed { .. }));
        self.committed(move |core, t| core.complete(t, id, results.clone(), now))
            .await?;
        if due_again {
            // the scheduler learns the new due time (a retry, a fallback step)
            self.inner.notify.notify_one();
        }
        Ok(())
    }

    /// Records that a delay notice went out for these recipients, so none is sent twice.
    pub async fn mark_delay_notified(
        &self,
        id: QueueId,
        indices: Vec<usize>,
    ) -> Result<(), QueueError> {
        self.committed(move |core, t| core.mark_delay_notified(t, id, &indices))
            .await
    }

    /// Whether a leased message has outlived the queue lifetime at `now`.
    pub fn expired(&self, lease: &Lease, now: SystemTime) -> bool {
        now >= lease.arrival + self.inner.core.opts.lifetime
    }

    /// The configured message lifetime.
    pub fn lifetime(&self) -> Duration {
        self.inner.core.opts.lifetime
    }

    /// Summaries of all queued messages.
    pub async fn list(&self) -> Result<Vec<MessageSummary>, QueueError> {
        self.blocking(|inner| inner.list()).await
    }

    /// Metadata and per-recipient state of one message (never the body).
    pub async fn show(&self, id: QueueId) -> Result<MessageDetail, QueueError> {
        self.blocking(move |inner| inner.show(id)).await
    }

    /// Makes every deferred or held recipient due now (admin holds stay held).
    pub async fn retry(&self, id: QueueId) -> Result<(), QueueError> {
        self.blocking(move |inner| inner.retry(id)).await?;
        self.inner.notify.notify_one();
        Ok(())
    }

    /// Puts a message on admin hold: never due until released.
    pub async fn hold(&self, id: QueueId) -> Result<(), QueueError> {
        self.inner.hot.remove(id);
        self.blocking(move |inner| inner.hold(id)).await
    }

    /// Releases an admin hold.
    pub async fn release(&self, id: QueueId) -> Result<(), QueueError> {
        self.blocking(move |inner| inner.release(id)).await?;
        self.inner.notify.notify_one();
        Ok(())
    }

    /// Deletes a message and its body.
    pub async fn delete(&self, id: QueueId) -> Result<(), QueueError> {
        self.inner.hot.remove(id);
        self.blocking(move |inner| inner.delete(id)).await
    }

    /// Counts of messages and recipients per state, quarantined records, bytes.
    pub async fn stats(&self) -> Result<Stats, QueueError> {
        self.blocking(|inner| inner.stats()).await
    }

    /// Number of group commits the committer has begun (each is counted before any of its
    /// writes is answered).
    #[doc(hidden)]
    pub fn commit_count(&self) -> u64 {
        self.inner.committer.commits()
    }

    /// Ids of messages quarantined (failed authentication) since the last call, for the audit log.
    pub fn take_quarantined(&self) -> Vec<QueueId> {
        let mut ids = std::mem::take(
            &mut *self
                .inner
                .core
                .quarantined
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // a group transaction that aborted and re-ran reports its quarantines twice
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Re-encrypts every record under the primary key; returns how many messages changed.
    pub fn rekey(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64, QueueError> {
        self.inner.rekey(progress)
    }
}
