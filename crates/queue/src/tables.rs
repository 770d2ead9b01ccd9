//! The queue's tables inside one write transaction, each opened once.
//!
//! A group commit applies dozens of writes (enqueues, leases, outcomes) in one transaction.
//! Each used to open and close the three to five tables it touched; redb looks a table up by
//! name and checks its key and value types on every open, and stages its root on every close,
//! which came to ~4% of the relay's CPU, on the committer's thread that every enqueue waits
//! for. Here a table is opened on first use and stays open until the transaction commits.
//!
//! Write paths reach the transaction only through [`Tables`], so no table can be opened twice
//! (redb refuses that at run time).

use redb::{Key, ReadableTable, Table, TableDefinition, Value, WriteTransaction};

use crate::error::QueueError;
use crate::store::{
    op_err, table_err, BODY, BODY_CHUNKS, DUE, DUE_BY_ID, META, OUTBOX, OUTBOX_NEXT, OUTBOX_STATE,
    QUARANTINE_BODY, QUARANTINE_META,
};

/// A table of sealed bytes by queue id.
pub(crate) type BytesTable<'t> = Table<'t, u128, &'static [u8]>;
/// The chunked body table: (queue id, index) → sealed bytes.
pub(crate) type ChunkTable<'t> = Table<'t, (u128, u32), &'static [u8]>;
/// The due index: (due ms, queue id) → ().
pub(crate) type DueTable<'t> = Table<'t, (u64, u128), ()>;
/// Each message's current due ms.
pub(crate) type DueByIdTable<'t> = Table<'t, u128, u64>;
/// The outbox: seq → id | sealed audit record.
pub(crate) type OutboxTable<'t> = Table<'t, u64, &'static [u8]>;
/// The outbox's counter.
pub(crate) type OutboxStateTable<'t> = Table<'t, &'static str, u64>;

/// The tables of one write transaction, opened on first use and closed when dropped (before
/// the transaction commits).
pub(crate) struct Tables<'t> {
    txn: &'t WriteTransaction,
    meta: Option<BytesTable<'t>>,
    body: Option<BytesTable<'t>>,
    chunks: Option<ChunkTable<'t>>,
    due: Option<DueTable<'t>>,
    due_by_id: Option<DueByIdTable<'t>>,
    quarantine_meta: Option<BytesTable<'t>>,
    quarantine_body: Option<BytesTable<'t>>,
    outbox: Option<OutboxTable<'t>>,
    outbox_state: Option<OutboxStateTable<'t>>,
    /// The outbox seq the next row gets, once this transaction handed one out (written back
    /// once, by [`Tables::finish`], instead of once per write of a group).
    outbox_next: Option<u64>,
}

/// The table in `slot`, opening it first if needed.
fn open<'a, 't, K: Key + 'static, V: Value + 'static>(
    txn: &'t WriteTransaction,
    slot: &'a mut Option<Table<'t, K, V>>,
    def: TableDefinition<K, V>,
    ctx: &'static str,
) -> Result<&'a mut Table<'t, K, V>, QueueError> {
    let table = match slot.take() {
        Some(table) => table,
        None => txn.open_table(def).map_err(table_err(ctx))?,
    };
    Ok(slot.insert(table))
}

impl<'t> Tables<'t> {
    /// No table open yet.
    pub(crate) fn new(txn: &'t WriteTransaction) -> Tables<'t> {
        Tables {
            txn,
            meta: None,
            body: None,
            chunks: None,
            due: None,
            due_by_id: None,
            quarantine_meta: None,
            quarantine_body: None,
            outbox: None,
            outbox_state: None,
            outbox_next: None,
        }
    }

    /// Sealed message records.
    pub(crate) fn meta(&mut self, ctx: &'static str) -> Result<&mut BytesTable<'t>, QueueError> {
        open(self.txn, &mut self.meta, META, ctx)
    }

    /// The chunked bodies and the legacy whole bodies, together.
    pub(crate) fn bodies(
        &mut self,
        ctx: &'static str,
    ) -> Result<(&mut ChunkTable<'t>, &mut BytesTable<'t>), QueueError> {
        let chunks = open(self.txn, &mut self.chunks, BODY_CHUNKS, ctx)?;
        let legacy = open(self.txn, &mut self.body, BODY, ctx)?;
        Ok((chunks, legacy))
    }

    /// The chunked bodies.
    pub(crate) fn chunks(&mut self, ctx: &'static str) -> Result<&mut ChunkTable<'t>, QueueError> {
        open(self.txn, &mut self.chunks, BODY_CHUNKS, ctx)
    }

    /// The due index and each message's due time, together.
    pub(crate) fn due_index(
        &mut self,
        ctx: &'static str,
    ) -> Result<(&mut DueTable<'t>, &mut DueByIdTable<'t>), QueueError> {
        let due = open(self.txn, &mut self.due, DUE, ctx)?;
        let by_id = open(self.txn, &mut self.due_by_id, DUE_BY_ID, ctx)?;
        Ok((due, by_id))
    }

    /// The due index.
    pub(crate) fn due(&mut self, ctx: &'static str) -> Result<&mut DueTable<'t>, QueueError> {
        open(self.txn, &mut self.due, DUE, ctx)
    }

    /// Each message's due time.
    pub(crate) fn due_by_id(
        &mut self,
        ctx: &'static str,
    ) -> Result<&mut DueByIdTable<'t>, QueueError> {
        open(self.txn, &mut self.due_by_id, DUE_BY_ID, ctx)
    }

    /// Quarantined records and bodies, together.
    pub(crate) fn quarantine(
        &mut self,
        ctx: &'static str,
    ) -> Result<(&mut BytesTable<'t>, &mut BytesTable<'t>), QueueError> {
        let meta = open(self.txn, &mut self.quarantine_meta, QUARANTINE_META, ctx)?;
        let body = open(self.txn, &mut self.quarantine_body, QUARANTINE_BODY, ctx)?;
        Ok((meta, body))
    }

    /// The outbox rows.
    pub(crate) fn outbox(&mut self, ctx: &'static str) -> Result<&mut OutboxTable<'t>, QueueError> {
        open(self.txn, &mut self.outbox, OUTBOX, ctx)
    }

    /// Hands out `count` consecutive outbox seqs; returns the first.
    pub(crate) fn outbox_seqs(&mut self, count: u64, ctx: &'static str) -> Result<u64, QueueError> {
        let first = match self.outbox_next {
            Some(next) => next,
            None => open(self.txn, &mut self.outbox_state, OUTBOX_STATE, ctx)?
                .get(OUTBOX_NEXT)
                .map_err(op_err(ctx))?
                .map_or(1, |g| g.value()),
        };
        self.outbox_next = Some(first.saturating_add(count));
        Ok(first)
    }

    /// Writes back what the transaction keeps in memory (the outbox counter); called once,
    /// before the commit.
    pub(crate) fn finish(mut self, ctx: &'static str) -> Result<(), QueueError> {
        if let Some(next) = self.outbox_next {
            open(self.txn, &mut self.outbox_state, OUTBOX_STATE, ctx)?
                .insert(OUTBOX_NEXT, next)
                .map_err(op_err(ctx))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

    /// Every accessor can be used again and together in one transaction (a table opened
    /// twice would be refused by redb), and what one wrote the next sees.
    #[test]
    fn tables_open_once_and_share_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = Tables::new(&txn);
            for round in 0..3u128 {
                t.meta("t").unwrap().insert(round, &b"m"[..]).unwrap();
                let (due, by_id) = t.due_index("t").unwrap();
                due.insert((5, round), ()).unwrap();
                by_id.insert(round, 5).unwrap();
                t.chunks("t")
                    .unwrap()
                    .insert((round, 0), &b"c"[..])
                    .unwrap();
                let (chunks, legacy) = t.bodies("t").unwrap();
                assert!(chunks.get((round, 0)).unwrap().is_some());
                assert!(legacy.get(round).unwrap().is_none());
                assert_eq!(
                    t.due_by_id("t")
                        .unwrap()
                        .get(round)
                        .unwrap()
                        .unwrap()
                        .value(),
                    5
                );
                assert!(t.due("t").unwrap().get((5, round)).unwrap().is_some());
                let (qm, qb) = t.quarantine("t").unwrap();
                qm.insert(round, &b"q"[..]).unwrap();
                qb.insert(round, &b"b"[..]).unwrap();
                assert_eq!(
                    ReadableTableMetadata::len(t.meta("t").unwrap()).unwrap(),
                    (round + 1) as u64
                );
            }
        }
        txn.commit().unwrap();
        let read = db.begin_read().unwrap();
        assert_eq!(read.open_table(META).unwrap().len().unwrap(), 3);
        assert_eq!(read.open_table(QUARANTINE_BODY).unwrap().len().unwrap(), 3);
    }
}
