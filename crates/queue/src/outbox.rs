//! The transactional outbox: audit records committed in the same transaction as the decision
//! they record (a message accepted, a delivery's outcome), until the audit log has them on disk.
//!
//! The queue treats a record as opaque bytes. Each row gets the next seq from a counter kept in
//! the store, so seqs follow commit order and are never reused. After each commit the committer
//! hands the new rows, in seq order, to the sink the relay registered (the audit log's writer);
//! the log reports the highest seq it has on disk and [`crate::Queue::outbox_trim`] drops the
//! rows up to it. Rows still here at a start are the ones the log may lack:
//! [`crate::Queue::outbox_pending`] returns them for the log to append the missing ones.
//!
//! A row is sealed like the message it belongs to (AES-256-GCM under the queue key, bound to
//! the message id and kind `o`), because it names recipients and the client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use redb::ReadableTable;

use crate::crypto::Kind;
use crate::engine::Core;
use crate::error::QueueError;
use crate::id::QueueId;
use crate::store::{op_err, table_err, Store, OUTBOX, OUTBOX_NEXT, OUTBOX_STATE};
use crate::tables::Tables;

/// Rows waiting for the audit log before new records are refused (about 40 MB).
pub(crate) const DEFAULT_LIMIT: u64 = 100_000;

/// Receives committed rows (seq, record bytes), in seq order, right after their commit, on the
/// committer thread.
pub type OutboxSink = Arc<dyn Fn(Vec<(u64, Vec<u8>)>) + Send + Sync>;

/// Audit records of one write, sealed for the table and in plain for the sink.
pub(crate) struct Rows {
    /// Message id | sealed record, one per row.
    sealed: Vec<Vec<u8>>,
    /// The records as handed in.
    plain: Vec<Vec<u8>>,
    /// The seq of the first row, once a transaction stored them.
    first: Option<u64>,
}

impl Rows {
    /// Seals `plain` (records about message `id`) for storage.
    pub(crate) fn seal(core: &Core, id: QueueId, plain: Vec<Vec<u8>>) -> Result<Rows, QueueError> {
        let sealed = plain
            .iter()
            .map(|row| {
                let mut value = id.as_u128().to_be_bytes().to_vec();
                value.extend_from_slice(&core.seal(id, Kind::Outbox, row)?);
                Ok(value)
            })
            .collect::<Result<Vec<_>, QueueError>>()?;
        Ok(Rows {
            sealed,
            plain,
            first: None,
        })
    }

    /// No rows.
    pub(crate) fn none() -> Rows {
        Rows {
            sealed: Vec::new(),
            plain: Vec::new(),
            first: None,
        }
    }

    /// Bytes the rows add to a transaction.
    pub(crate) fn bytes(&self) -> usize {
        self.sealed.iter().map(Vec::len).sum()
    }

    /// Stores the rows under the next seqs (again after an aborted attempt).
    pub(crate) fn put(&mut self, t: &mut Tables<'_>) -> Result<(), QueueError> {
        if self.sealed.is_empty() {
            return Ok(());
        }
        let ctx = "adding audit records to the outbox";
        let first = t.outbox_seqs(self.sealed.len() as u64, ctx)?;
        let rows = t.outbox(ctx)?;
        for (row, seq) in self.sealed.iter().zip(first..) {
            rows.insert(seq, row.as_slice()).map_err(op_err(ctx))?;
        }
        self.first = Some(first);
        Ok(())
    }

    /// Takes the stored rows out again (for a write refused after it landed).
    pub(crate) fn remove(&self, t: &mut Tables<'_>) -> Result<(), QueueError> {
        let Some(first) = self.first else {
            return Ok(());
        };
        let ctx = "removing audit records from the outbox";
        let rows = t.outbox(ctx)?;
        for seq in first..first + self.sealed.len() as u64 {
            rows.remove(seq).map_err(op_err(ctx))?;
        }
        Ok(())
    }

    /// The committed rows with their seqs, for the sink (empty if none were stored).
    pub(crate) fn take_committed(&mut self) -> Vec<(u64, Vec<u8>)> {
        let Some(first) = self.first else {
            return Vec::new();
        };
        std::mem::take(&mut self.plain)
            .into_iter()
            .zip(first..)
            .map(|(row, seq)| (seq, row))
            .collect()
    }
}

/// Where the outbox stands: the sink, and the seqs committed and dropped.
pub(crate) struct Outbox {
    sink: RwLock<Option<OutboxSink>>,
    /// Rows waiting before new ones are refused.
    limit: u64,
    /// The highest seq committed (0: none).
    committed: AtomicU64,
    /// Rows up to this seq are dropped (the log has them).
    trimmed: AtomicU64,
}

impl Outbox {
    /// The state of the outbox in `store`; new rows are refused while `limit` wait.
    pub(crate) fn load(store: &Store, limit: u64) -> Result<Outbox, QueueError> {
        let ctx = "reading the outbox";
        let (committed, oldest) = store.read(ctx, |txn| {
            let state = txn.open_table(OUTBOX_STATE).map_err(table_err(ctx))?;
            let next = state
                .get(OUTBOX_NEXT)
                .map_err(op_err(ctx))?
                .map_or(1, |g| g.value());
            let rows = txn.open_table(OUTBOX).map_err(table_err(ctx))?;
            let oldest = rows.first().map_err(op_err(ctx))?.map(|(k, _)| k.value());
            Ok((next.saturating_sub(1), oldest))
        })?;
        Ok(Outbox {
            sink: RwLock::new(None),
            limit,
            committed: AtomicU64::new(committed),
            trimmed: AtomicU64::new(oldest.map_or(committed, |seq| seq.saturating_sub(1))),
        })
    }

    /// Sets (or with `None` removes) the sink.
    pub(crate) fn set_sink(&self, sink: Option<OutboxSink>) {
        *self
            .sink
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = sink;
    }

    /// Hands just-committed rows to the sink; without one they wait for the next start.
    pub(crate) fn committed(&self, rows: Vec<(u64, Vec<u8>)>) {
        let Some(last) = rows.last().map(|(seq, _)| *seq) else {
            return;
        };
        self.committed.fetch_max(last, Ordering::SeqCst);
        let sink = self
            .sink
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(sink) = sink {
            sink(rows);
        }
    }

    /// Refuses new rows while too many wait for the log.
    pub(crate) fn check_room(&self) -> Result<(), QueueError> {
        let waiting = self.waiting();
        if waiting >= self.limit {
            return Err(QueueError::OutboxFull { rows: waiting });
        }
        Ok(())
    }

    /// Records that rows up to `through` are dropped.
    pub(crate) fn trimmed(&self, through: u64) {
        self.trimmed.fetch_max(through, Ordering::SeqCst);
    }

    /// Rows committed and not yet dropped.
    pub(crate) fn waiting(&self) -> u64 {
        self.committed
            .load(Ordering::SeqCst)
            .saturating_sub(self.trimmed.load(Ordering::SeqCst))
    }
}

/// Drops the rows up to `through` inside `t`; returns how many.
pub(crate) fn trim(t: &mut Tables<'_>, through: u64) -> Result<u64, QueueError> {
    let ctx = "dropping audit records the log has";
    let rows = t.outbox(ctx)?;
    let mut dropped = 0;
    rows.retain_in(..=through, |_, _| {
        dropped += 1;
        false
    })
    .map_err(op_err(ctx))?;
    Ok(dropped)
}

/// Every row still in the outbox, opened: (seq, record bytes), in seq order. A row that fails
/// to open comes back as a note saying so (the log records it instead of the lost record).
pub(crate) fn pending(store: &Store, core: &Core) -> Result<Vec<(u64, Vec<u8>)>, QueueError> {
    let ctx = "reading the outbox";
    let sealed = store.read(ctx, |txn| {
        let rows = txn.open_table(OUTBOX).map_err(table_err(ctx))?;
        let mut out = Vec::new();
        for entry in rows.iter().map_err(op_err(ctx))? {
            let (k, v) = entry.map_err(op_err(ctx))?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    })?;
    Ok(sealed
        .into_iter()
        .map(|(seq, value)| (seq, open_row(core, seq, &value)))
        .collect())
}

/// The record bytes of one stored row, or a note why they cannot be read.
fn open_row(core: &Core, seq: u64, value: &[u8]) -> Vec<u8> {
    let opened = value
        .split_first_chunk::<16>()
        .ok_or_else(|| "shorter than a message id".to_string())
        .and_then(|(id, sealed)| {
            let id = QueueId::from_u128(u128::from_be_bytes(*id));
            crate::crypto::open(&core.keys, id, Kind::Outbox, sealed).map_err(|e| format!("{e:?}"))
        });
    opened.unwrap_or_else(|e| {
        tracing::error!(outbox = seq, error = %e, "an outbox row cannot be opened");
        format!("unreadable outbox row {seq}: {e}").into_bytes()
    })
}

/// Re-seals the rows not under the primary key inside `t`; returns how many.
pub(crate) fn rekey(core: &Core, t: &mut Tables<'_>, primary: &[u8]) -> Result<u64, QueueError> {
    let ctx = "re-encrypting outbox records";
    let rows = t.outbox(ctx)?;
    let mut stale = Vec::new();
    for entry in rows.iter().map_err(op_err(ctx))? {
        let (k, v) = entry.map_err(op_err(ctx))?;
        let value = v.value();
        let sealed = value.get(16..).unwrap_or_default();
        if crate::crypto::key_id(sealed) != Some(primary) {
            stale.push((k.value(), value.to_vec()));
        }
    }
    let mut count = 0;
    for (seq, value) in stale {
        let Some((id, sealed)) = value.split_first_chunk::<16>() else {
            continue;
        };
        let id = QueueId::from_u128(u128::from_be_bytes(*id));
        // a row that cannot be opened is left for the start-up replay to report
        let Ok(plain) = crate::crypto::open(&core.keys, id, Kind::Outbox, sealed) else {
            continue;
        };
        let mut resealed = id.as_u128().to_be_bytes().to_vec();
        resealed.extend_from_slice(&core.seal(id, Kind::Outbox, &plain)?);
        rows.insert(seq, resealed.as_slice()).map_err(op_err(ctx))?;
        count += 1;
    }
    Ok(count)
}
