//! Synchronous queue operations on sealed records inside redb transactions.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redb::{ReadableTable, WriteTransaction};
use tokio::sync::Notify;

use crate::body;
use crate::commit::Committer;
use crate::crypto::{self, CryptoError, Kind};
use crate::error::QueueError;
use crate::hot::HotBodies;
use crate::id::QueueId;
use crate::keys::Keyring;
use crate::record::{MessageRecord, RecipientState};
use crate::schedule::{message_due_ms, retry_delay, to_ms};
use crate::store::{
    op_err, table_err, Store, BODY, BODY_CHUNKS, DUE, DUE_BY_ID, META, QUARANTINE_BODY,
    QUARANTINE_META,
};
use crate::{Lease, Outcome, QueueOptions};

/// Shared state behind a `Queue`.
pub(crate) struct Inner {
    pub(crate) store: Arc<Store>,
    pub(crate) core: Arc<Core>,
    pub(crate) notify: Arc<Notify>,
    pub(crate) committer: Committer,
    /// Bodies just enqueued, for their first delivery.
    pub(crate) hot: HotBodies,
    /// Delivery's hand-off for just-committed messages, if it takes them.
    pub(crate) handoff: std::sync::RwLock<Option<Arc<dyn crate::Handoff>>>,
}

impl Inner {
    /// A place in delivery for one just-enqueued message, if delivery takes them and has room.
    pub(crate) fn reserve_handoff(&self) -> Option<Box<dyn crate::HandoffSlot>> {
        let handoff = self
            .handoff
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        handoff.reserve()
    }
}

/// What a write transaction needs to read and change sealed records: keys, options, reports.
///
/// Kept apart from [`Inner`] so operations queued on the committer thread can hold it without
/// holding the committer itself.
pub(crate) struct Core {
    pub(crate) keys: Keyring,
    pub(crate) opts: QueueOptions,
    /// Ids quarantined since the owner last asked (for its audit log).
    pub(crate) quarantined: std::sync::Mutex<Vec<QueueId>>,
}

impl Core {
    /// Remembers a quarantined id until [`crate::Queue::take_quarantined`] collects it.
    pub(crate) fn report_quarantined(&self, id: QueueId) {
        self.quarantined
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(id);
    }

    /// Seals a record for storage under the primary key.
    pub(crate) fn seal(
        &self,
        id: QueueId,
        kind: Kind,
        plain: &[u8],
    ) -> Result<Vec<u8>, QueueError> {
        crypto::seal(&self.keys, id, kind, plain).map_err(|_| QueueError::Encrypt)
    }

    /// Opens a sealed record; an authentication failure is reported as `Integrity`.
    pub(crate) fn unseal(
        &self,
        id: QueueId,
        kind: Kind,
        sealed: &[u8],
    ) -> Result<Vec<u8>, QueueError> {
        crypto::open(&self.keys, id, kind, sealed).map_err(|e| match e {
            CryptoError::UnknownKey(key_id) => QueueError::UnknownKey { id, key_id },
            CryptoError::Authentication => {
                tracing::error!(queue_id = %id, "queued record failed authentication; quarantining it");
                QueueError::Integrity { id }
            }
            CryptoError::Random | CryptoError::Key => QueueError::Encrypt,
        })
    }

    /// Opens and decodes a sealed meta record.
    pub(crate) fn unseal_meta(
        &self,
        id: QueueId,
        sealed: &[u8],
    ) -> Result<MessageRecord, QueueError> {
        let plain = self.unseal(id, Kind::Meta, sealed)?;
        MessageRecord::decode(&plain).map_err(|e| QueueError::Decode {
            id,
            detail: e.to_string(),
        })
    }

    /// Loads a message record for update; a record failing authentication is quarantined.
    pub(crate) fn load(
        &self,
        txn: &WriteTransaction,
        id: QueueId,
    ) -> Result<MessageRecord, QueueError> {
        let ctx = "loading a message";
        let sealed = {
            let meta = txn.open_table(META).map_err(table_err(ctx))?;
            let guard = meta.get(id.as_u128()).map_err(op_err(ctx))?;
            match guard {
                Some(g) => g.value().to_vec(),
                None => return Err(QueueError::NotFound(id)),
            }
        };
        match self.unseal_meta(id, &sealed) {
            Err(QueueError::Integrity { id }) => {
                quarantine(txn, id)?;
                self.report_quarantined(id);
                Err(QueueError::Integrity { id })
            }
            other => other,
        }
    }

    /// Stores an updated record, or removes the message when every recipient is final.
    pub(crate) fn save(
        &self,
        txn: &WriteTransaction,
        id: QueueId,
        record: &MessageRecord,
    ) -> Result<(), QueueError> {
        if record.all_final() {
            remove_message(txn, id)?;
            return Ok(());
        }
        let ctx = "saving a message";
        let plain = record.encode().map_err(|e| QueueError::Decode {
            id,
            detail: e.to_string(),
        })?;
        let sealed = self.seal(id, Kind::Meta, &plain)?;
        txn.open_table(META)
            .map_err(table_err(ctx))?
            .insert(id.as_u128(), sealed.as_slice())
            .map_err(op_err(ctx))?;
        set_due(txn, id, message_due_ms(record))
    }

    /// Leases the due recipients of up to `max` messages inside `txn`.
    pub(crate) fn lease_due(
        &self,
        txn: &WriteTransaction,
        now: SystemTime,
        max: usize,
    ) -> Result<Vec<Lease>, QueueError> {
        let ctx = "leasing due messages";
        let now_ms = to_ms(now);
        let lease_until = now + self.opts.lease;
        {
            let ids: Vec<QueueId> = {
                let due = txn.open_table(DUE).map_err(table_err(ctx))?;
                let range = due.range(..=(now_ms, u128::MAX)).map_err(op_err(ctx))?;
                let mut ids = Vec::new();
                for entry in range.take(max) {
                    let (key, _) = entry.map_err(op_err(ctx))?;
                    ids.push(QueueId::from_u128(key.value().1));
                }
                ids
            };
            let mut leases = Vec::with_capacity(ids.len());
            for id in ids {
                let mut record = match self.load(txn, id) {
                    Ok(r) => r,
                    Err(QueueError::Integrity { .. }) => continue,
                    Err(QueueError::UnknownKey { id, key_id }) => {
                        tracing::error!(queue_id = %id, key_id, "queued message needs a key that is not loaded; skipping it until the queue is reopened with that key");
                        set_due(txn, id, None)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let lease = record.lease(id, now_ms, lease_until);
                self.save(txn, id, &record)?;
                leases.extend(lease);
            }
            Ok(leases)
        }
    }

    /// Records delivery outcomes inside `txn`; removes the message once every recipient is final.
    pub(crate) fn complete(
        &self,
        txn: &WriteTransaction,
        id: QueueId,
        results: Vec<(usize, Outcome)>,
        now: SystemTime,
    ) -> Result<(), QueueError> {
        let retry = &self.opts.retry;
        self.change(txn, id, move |record| {
            for (index, outcome) in results {
                let rcpt = record
                    .recipients
                    .get_mut(index)
                    .ok_or(QueueError::NoSuchRecipient { id, index })?;
                if rcpt.state.is_final() {
                    tracing::debug!(queue_id = %id, index, "outcome for a final recipient ignored");
                    continue;
                }
                rcpt.attempts = rcpt.attempts.saturating_add(1);
                let next = match outcome {
                    Outcome::Delivered { .. } => RecipientState::Delivered,
                    Outcome::Failed { reason } => {
                        rcpt.last_error = Some(reason.clone());
                        RecipientState::Failed { reason }
                    }
                    Outcome::Deferred { reason } => {
                        rcpt.last_error = Some(reason.clone());
                        RecipientState::Deferred {
                            attempts: rcpt.attempts,
                            next_attempt: now + retry_delay(retry, rcpt.attempts),
                            last_error: reason,
                        }
                    }
                    Outcome::Held {
                        until,
                        step,
                        reason,
                    } => {
                        rcpt.last_error = Some(reason.clone());
                        RecipientState::Held {
                            until,
                            step,
                            reason,
                        }
                    }
                };
                if rcpt.state == RecipientState::AdminHold && !next.is_final() {
                    // stays on admin hold; resumes in the reported state when released
                    rcpt.resume = Some(next);
                } else {
                    rcpt.state = next;
                    rcpt.resume = None;
                }
            }
            Ok(())
        })
    }

    /// Records inside `txn` that a delay notice was sent for the recipients at `indices`.
    pub(crate) fn mark_delay_notified(
        &self,
        txn: &WriteTransaction,
        id: QueueId,
        indices: &[usize],
    ) -> Result<(), QueueError> {
        self.change(txn, id, move |record| {
            for &index in indices {
                record
                    .recipients
                    .get_mut(index)
                    .ok_or(QueueError::NoSuchRecipient { id, index })?
                    .delay_notified = true;
            }
            Ok(())
        })
    }

    /// Loads, changes and saves one message inside `txn`.
    pub(crate) fn change<T>(
        &self,
        txn: &WriteTransaction,
        id: QueueId,
        change: impl FnOnce(&mut MessageRecord) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let mut record = self.load(txn, id)?;
        let value = change(&mut record)?;
        self.save(txn, id, &record)?;
        Ok(value)
    }
}

impl Inner {
    /// Loads, changes and saves one message in its own transaction.
    pub(crate) fn update<T>(
        &self,
        id: QueueId,
        context: &'static str,
        change: impl FnOnce(&mut MessageRecord) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        self.store
            .write(context, |txn| self.core.change(txn, id, change))
    }

    /// Moves a message to quarantine in its own transaction.
    pub(crate) fn quarantine_now(&self, id: QueueId) -> Result<(), QueueError> {
        self.store
            .write("quarantining a record", |txn| quarantine(txn, id))
            .inspect(|_| self.core.report_quarantined(id))
    }

    /// Returns every in-flight recipient (from a crash) to its earlier state, due now, and
    /// re-derives any due index entry that does not match its record.
    pub(crate) fn recover_leases(&self) -> Result<usize, QueueError> {
        let ctx = "recovering leases";
        let now = SystemTime::now();
        self.store.write(ctx, |txn| {
            let ids = all_ids(txn)?;
            let mut recovered = 0;
            for id in ids {
                let mut record = match self.core.load(txn, id) {
                    Ok(r) => r,
                    Err(QueueError::Integrity { .. }) => continue,
                    Err(e) => return Err(e),
                };
                let mut changed = false;
                for rcpt in &mut record.recipients {
                    if let RecipientState::InFlight { .. } = rcpt.state {
                        rcpt.state = due_now(rcpt.resume.take(), now);
                        changed = true;
                        recovered += 1;
                    }
                }
                if changed {
                    self.core.save(txn, id, &record)?;
                } else {
                    // the due index is derived data: make sure it matches the record
                    let wanted = message_due_ms(&record);
                    let indexed = txn
                        .open_table(DUE_BY_ID)
                        .map_err(table_err(ctx))?
                        .get(id.as_u128())
                        .map_err(op_err(ctx))?
                        .map(|g| g.value());
                    if indexed != wanted {
                        set_due(txn, id, wanted)?;
                    }
                }
            }
            Ok(recovered)
        })
    }

    /// Reads and decrypts a body.
    pub(crate) fn body(&self, id: QueueId) -> Result<Vec<u8>, QueueError> {
        let ctx = "reading a body";
        let sealed = self.store.read(ctx, |txn| {
            let chunks = txn.open_table(BODY_CHUNKS).map_err(table_err(ctx))?;
            let legacy = txn.open_table(BODY).map_err(table_err(ctx))?;
            body::get(&chunks, &legacy, id)?.ok_or(QueueError::NotFound(id))
        })?;
        match self.core.unseal(id, Kind::Body, &sealed) {
            Err(QueueError::Integrity { id }) => {
                self.quarantine_now(id)?;
                Err(QueueError::Integrity { id })
            }
            other => other,
        }
    }

    /// Earliest due time in the index.
    pub(crate) fn next_due(&self) -> Result<Option<SystemTime>, QueueError> {
        let ctx = "reading the due index";
        self.store.read(ctx, |txn| {
            let due = txn.open_table(DUE).map_err(table_err(ctx))?;
            let first = due.first().map_err(op_err(ctx))?;
            Ok(first.map(|(k, _)| SystemTime::UNIX_EPOCH + Duration::from_millis(k.value().0)))
        })
    }

    /// How many messages are due at `now_ms` (counting no further than `max`), and the earliest
    /// due time of any, in one read of the due index.
    pub(crate) fn due_now(&self, now_ms: u64, max: usize) -> Result<crate::DueNow, QueueError> {
        let ctx = "reading the due index";
        self.store.read(ctx, |txn| {
            let due = txn.open_table(DUE).map_err(table_err(ctx))?;
            let first = due.first().map_err(op_err(ctx))?;
            let next =
                first.map(|(k, _)| SystemTime::UNIX_EPOCH + Duration::from_millis(k.value().0));
            let range = due.range(..=(now_ms, u128::MAX)).map_err(op_err(ctx))?;
            Ok(crate::DueNow {
                count: range.take(max).count(),
                next,
            })
        })
    }

    /// Re-encrypts every record not sealed under the primary key.
    pub(crate) fn rekey(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64, QueueError> {
        let ctx = "re-encrypting records";
        let ids = self.store.read(ctx, |txn| {
            let meta = txn.open_table(META).map_err(table_err(ctx))?;
            let mut ids = Vec::new();
            for entry in meta.iter().map_err(op_err(ctx))? {
                let (k, _) = entry.map_err(op_err(ctx))?;
                ids.push(QueueId::from_u128(k.value()));
            }
            Ok(ids)
        })?;
        let total = ids.len() as u64;
        let primary = self.core.keys.primary().id;
        let mut done = 0u64;
        let mut rekeyed = 0u64;
        progress(0, total);
        for chunk in ids.chunks(32) {
            rekeyed += self.store.write(ctx, |txn| {
                let mut count = 0u64;
                for &id in chunk {
                    let mut changed = false;
                    for kind in [Kind::Meta, Kind::Body] {
                        let sealed = match kind {
                            Kind::Meta => txn
                                .open_table(META)
                                .map_err(table_err(ctx))?
                                .get(id.as_u128())
                                .map_err(op_err(ctx))?
                                .map(|g| g.value().to_vec()),
                            Kind::Body => body::get_in(txn, id)?,
                        };
                        let Some(sealed) = sealed else { continue };
                        if crypto::key_id(&sealed) == Some(&primary[..]) {
                            continue;
                        }
                        let plain = match self.core.unseal(id, kind, &sealed) {
                            Ok(p) => p,
                            Err(QueueError::Integrity { id }) => {
                                quarantine(txn, id)?;
                                self.core.report_quarantined(id);
                                break;
                            }
                            Err(e) => return Err(e),
                        };
                        let resealed = self.core.seal(id, kind, &plain)?;
                        match kind {
                            Kind::Meta => {
                                txn.open_table(META)
                                    .map_err(table_err(ctx))?
                                    .insert(id.as_u128(), resealed.as_slice())
                                    .map_err(op_err(ctx))?;
                            }
                            Kind::Body => body::replace(txn, id, &resealed)?,
                        }
                        changed = true;
                    }
                    if changed {
                        count += 1;
                    }
                }
                Ok(count)
            })?;
            done += chunk.len() as u64;
            progress(done, total);
        }
        Ok(rekeyed)
    }
}

/// The state a recipient returns to when made due now.
pub(crate) fn due_now(previous: Option<RecipientState>, now: SystemTime) -> RecipientState {
    match previous {
        Some(RecipientState::Deferred {
            attempts,
            last_error,
            ..
        }) => RecipientState::Deferred {
            attempts,
            next_attempt: now,
            last_error,
        },
        Some(RecipientState::Held { step, reason, .. }) => RecipientState::Held {
            until: now,
            step,
            reason,
        },
        _ => RecipientState::Pending,
    }
}

/// Every queued message id.
pub(crate) fn all_ids(txn: &WriteTransaction) -> Result<Vec<QueueId>, QueueError> {
    let ctx = "listing messages";
    let meta = txn.open_table(META).map_err(table_err(ctx))?;
    let mut ids = Vec::new();
    for entry in meta.iter().map_err(op_err(ctx))? {
        let (k, _) = entry.map_err(op_err(ctx))?;
        ids.push(QueueId::from_u128(k.value()));
    }
    Ok(ids)
}

/// Replaces a message's due index entry.
pub(crate) fn set_due(
    txn: &WriteTransaction,
    id: QueueId,
    due_ms: Option<u64>,
) -> Result<(), QueueError> {
    let ctx = "updating the due index";
    let mut by_id = txn.open_table(DUE_BY_ID).map_err(table_err(ctx))?;
    let mut due = txn.open_table(DUE).map_err(table_err(ctx))?;
    let old = by_id
        .remove(id.as_u128())
        .map_err(op_err(ctx))?
        .map(|g| g.value());
    if let Some(old) = old {
        due.remove((old, id.as_u128())).map_err(op_err(ctx))?;
    }
    if let Some(ms) = due_ms {
        due.insert((ms, id.as_u128()), ()).map_err(op_err(ctx))?;
        by_id.insert(id.as_u128(), ms).map_err(op_err(ctx))?;
    }
    Ok(())
}

/// Removes a message's record, body and index entries; false if it was not queued.
pub(crate) fn remove_message(txn: &WriteTransaction, id: QueueId) -> Result<bool, QueueError> {
    let ctx = "removing a message";
    let existed = txn
        .open_table(META)
        .map_err(table_err(ctx))?
        .remove(id.as_u128())
        .map_err(op_err(ctx))?
        .is_some();
    body::remove(txn, id)?;
    set_due(txn, id, None)?;
    Ok(existed)
}

/// Moves a message's sealed records into the quarantine tables.
pub(crate) fn quarantine(txn: &WriteTransaction, id: QueueId) -> Result<(), QueueError> {
    let ctx = "quarantining a record";
    let meta = txn
        .open_table(META)
        .map_err(table_err(ctx))?
        .remove(id.as_u128())
        .map_err(op_err(ctx))?
        .map(|g| g.value().to_vec());
    // the body is kept whole in quarantine: it is evidence, read rarely if ever
    let body = body::get_in(txn, id)?;
    body::remove(txn, id)?;
    for (sealed, to) in [(meta, QUARANTINE_META), (body, QUARANTINE_BODY)] {
        if let Some(sealed) = sealed {
            txn.open_table(to)
                .map_err(table_err(ctx))?
                .insert(id.as_u128(), sealed.as_slice())
                .map_err(op_err(ctx))?;
        }
    }
    set_due(txn, id, None)?;
    tracing::error!(queue_id = %id, "queued message quarantined: it will not be delivered");
    Ok(())
}
