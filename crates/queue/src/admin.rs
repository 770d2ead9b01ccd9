//! Admin operations: list, show, retry, hold, release, delete, stats.

use std::time::{Duration, SystemTime};

use redb::{ReadableTable, ReadableTableMetadata};
use serde::Serialize;

use crate::engine::{due_now, remove_message, Inner};
use crate::error::QueueError;
use crate::id::QueueId;
use crate::record::{Envelope, MessageRecord, RecipientState};
use crate::schedule::message_due_ms;
use crate::store::{op_err, table_err, META, QUARANTINE_META};

/// Number of recipients in each state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    /// Not attempted yet.
    pub pending: u64,
    /// Leased by a delivery worker.
    pub in_flight: u64,
    /// Waiting for a retry.
    pub deferred: u64,
    /// Diverted, waiting for a fallback step.
    pub held: u64,
    /// Held by an administrator.
    pub admin_hold: u64,
    /// Delivered.
    pub delivered: u64,
    /// Failed.
    pub failed: u64,
}

impl StateCounts {
    fn add(&mut self, state: &RecipientState) {
        let slot = match state {
            RecipientState::Pending => &mut self.pending,
            RecipientState::InFlight { .. } => &mut self.in_flight,
            RecipientState::Deferred { .. } => &mut self.deferred,
            RecipientState::Held { .. } => &mut self.held,
            RecipientState::AdminHold => &mut self.admin_hold,
            RecipientState::Delivered => &mut self.delivered,
            RecipientState::Failed { .. } => &mut self.failed,
        };
        *slot += 1;
    }

    fn of(record: &MessageRecord) -> StateCounts {
        let mut counts = StateCounts::default();
        for r in &record.recipients {
            counts.add(&r.state);
        }
        counts
    }
}

/// One line of `queue list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MessageSummary {
    /// Queue id.
    pub id: QueueId,
    /// When the message was queued.
    pub arrival: SystemTime,
    /// Body size in bytes.
    pub size: u64,
    /// Reverse-path.
    pub sender: String,
    /// Policy name.
    pub policy: String,
    /// Recipients by state.
    pub recipients: StateCounts,
    /// When the message is next due, if ever (None: admin hold only).
    pub next_attempt: Option<SystemTime>,
}

/// One recipient in `queue show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecipientDetail {
    /// Index in the envelope.
    pub index: usize,
    /// Address.
    pub address: String,
    /// Current state.
    pub state: RecipientState,
    /// Attempts so far.
    pub attempts: u32,
    /// The last error.
    pub last_error: Option<String>,
    /// A delay notice went out for this recipient (none is sent again).
    pub delay_notified: bool,
}

/// `queue show`: metadata and per-recipient state, never the body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MessageDetail {
    /// Queue id.
    pub id: QueueId,
    /// When the message was queued.
    pub arrival: SystemTime,
    /// Body size in bytes.
    pub size: u64,
    /// The envelope.
    pub envelope: Envelope,
    /// Recipients with their state.
    pub recipients: Vec<RecipientDetail>,
    /// When the message is next due, if ever.
    pub next_attempt: Option<SystemTime>,
}

/// `queue stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Queued messages.
    pub messages: u64,
    /// Recipients by state.
    pub recipients: StateCounts,
    /// Quarantined messages (failed authentication).
    pub quarantined: u64,
    /// Sum of queued body sizes in bytes.
    pub body_bytes: u64,
    /// Size of the store file in bytes.
    pub store_bytes: u64,
}

fn ms_time(ms: Option<u64>) -> Option<SystemTime> {
    ms.map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

impl Inner {
    /// Every readable message with its record; records failing authentication are quarantined.
    fn all_records(&self) -> Result<Vec<(QueueId, MessageRecord)>, QueueError> {
        let ctx = "listing messages";
        let sealed = self.store.read(ctx, |txn| {
            let meta = txn.open_table(META).map_err(table_err(ctx))?;
            let mut out = Vec::new();
            for entry in meta.iter().map_err(op_err(ctx))? {
                let (k, v) = entry.map_err(op_err(ctx))?;
                out.push((QueueId::from_u128(k.value()), v.value().to_vec()));
            }
            Ok(out)
        })?;
        let mut records = Vec::with_capacity(sealed.len());
        for (id, sealed) in sealed {
            match self.core.unseal_meta(id, &sealed) {
                Ok(r) => records.push((id, r)),
                Err(QueueError::Integrity { id }) => self.quarantine_now(id)?,
                Err(e) => return Err(e),
            }
        }
        Ok(records)
    }

    /// Summaries of every queued message, oldest first.
    pub(crate) fn list(&self) -> Result<Vec<MessageSummary>, QueueError> {
        Ok(self
            .all_records()?
            .into_iter()
            .map(|(id, r)| MessageSummary {
                id,
                arrival: r.arrival,
                size: r.size,
                sender: r.envelope.sender.clone(),
                policy: r.envelope.policy.clone(),
                recipients: StateCounts::of(&r),
                next_attempt: ms_time(message_due_ms(&r)),
            })
            .collect())
    }

    /// Metadata and recipient states of one message.
    pub(crate) fn show(&self, id: QueueId) -> Result<MessageDetail, QueueError> {
        let ctx = "showing a message";
        let sealed = self.store.read(ctx, |txn| {
            let meta = txn.open_table(META).map_err(table_err(ctx))?;
            let guard = meta.get(id.as_u128()).map_err(op_err(ctx))?;
            guard
                .map(|g| g.value().to_vec())
                .ok_or(QueueError::NotFound(id))
        })?;
        let record = match self.core.unseal_meta(id, &sealed) {
            Err(QueueError::Integrity { id }) => {
                self.quarantine_now(id)?;
                return Err(QueueError::Integrity { id });
            }
            other => other?,
        };
        let next_attempt = ms_time(message_due_ms(&record));
        let recipients = record
            .recipients
            .iter()
            .zip(record.envelope.recipients.iter())
            .enumerate()
            .map(|(index, (r, spec))| RecipientDetail {
                index,
                address: spec.address.clone(),
                state: r.state.clone(),
                attempts: r.attempts,
                last_error: r.last_error.clone(),
                delay_notified: r.delay_notified,
            })
            .collect();
        Ok(MessageDetail {
            id,
            arrival: record.arrival,
            size: record.size,
            envelope: record.envelope,
            recipients,
            next_attempt,
        })
    }

    /// Makes every waiting recipient (pending, deferred, held) due now.
    pub(crate) fn retry(&self, id: QueueId) -> Result<(), QueueError> {
        let now = SystemTime::now();
        self.update(id, "retrying a message", |record| {
            for r in &mut record.recipients {
                if matches!(
                    r.state,
                    RecipientState::Deferred { .. } | RecipientState::Held { .. }
                ) {
                    r.state = due_now(Some(r.state.clone()), now);
                }
            }
            Ok(())
        })
    }

    /// Puts every non-final recipient on admin hold.
    pub(crate) fn hold(&self, id: QueueId) -> Result<(), QueueError> {
        self.update(id, "holding a message", |record| {
            for r in &mut record.recipients {
                match &r.state {
                    s if s.is_final() => {}
                    RecipientState::AdminHold => {}
                    RecipientState::InFlight { .. } => {
                        // the worker's outcome will update `resume`; the hold stays
                        r.state = RecipientState::AdminHold;
                    }
                    other => {
                        r.resume = Some(other.clone());
                        r.state = RecipientState::AdminHold;
                    }
                }
            }
            Ok(())
        })
    }

    /// Releases an admin hold: recipients return to their earlier state.
    pub(crate) fn release(&self, id: QueueId) -> Result<(), QueueError> {
        self.update(id, "releasing a message", |record| {
            for r in &mut record.recipients {
                if r.state == RecipientState::AdminHold {
                    r.state = r.resume.take().unwrap_or(RecipientState::Pending);
                }
            }
            Ok(())
        })
    }

    /// Removes a message (record and body).
    pub(crate) fn delete(&self, id: QueueId) -> Result<(), QueueError> {
        self.store.write("deleting a message", |t| {
            if remove_message(t, id)? {
                Ok(())
            } else {
                Err(QueueError::NotFound(id))
            }
        })
    }

    /// Counts per state, quarantine and sizes.
    pub(crate) fn stats(&self) -> Result<Stats, QueueError> {
        let mut stats = Stats::default();
        for (_, r) in self.all_records()? {
            stats.messages += 1;
            stats.body_bytes += r.size;
            for rc in &r.recipients {
                stats.recipients.add(&rc.state);
            }
        }
        let ctx = "counting quarantine";
        stats.quarantined = self.store.read(ctx, |txn| {
            let q = txn.open_table(QUARANTINE_META).map_err(table_err(ctx))?;
            q.len().map_err(op_err(ctx))
        })?;
        stats.store_bytes = std::fs::metadata(self.store.path())
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(stats)
    }
}
