//! Sealed bodies, stored as chunks of at most [`CHUNK`] bytes under `(queue id, index)`.
//!
//! redb gives a value larger than a page a contiguous run of pages, rounded up to a power of
//! two. A sealed 1 MiB body therefore took a 2 MiB allocation, and such allocations got dearer
//! as the store file grew. The queue's `SEALPOST_BENCH_PREFILL` benchmark shows it: enqueueing
//! the end-to-end size mix fell from ~2,100 to ~1,550 msg/s over three rounds into an empty
//! store, and ran at 1,270–1,630 msg/s into one holding 200,000 messages. With chunks, the same
//! rounds run at ~2,700–3,300 and ~2,000–2,900 msg/s. Bodies written before chunking sit whole
//! in `BODY`; they are still read, rewritten as chunks if re-keyed, and removed with their
//! message.

use redb::ReadableTable;

use crate::error::QueueError;
use crate::id::QueueId;
use crate::store::op_err;
use crate::tables::Tables;

/// Largest chunk of a sealed body, in bytes: with its leaf's header it fits a 256 KiB page run.
/// Tried: 32 KiB chunks also stop the growth, but their per-entry cost lowers throughput.
pub(crate) const CHUNK: usize = 256 * 1024 - 512;

/// Stores a sealed body as chunks.
pub(crate) fn put(t: &mut Tables<'_>, id: QueueId, sealed: &[u8]) -> Result<(), QueueError> {
    let ctx = "storing a body";
    let chunks = t.chunks(ctx)?;
    for (index, chunk) in (0u32..).zip(sealed.chunks(CHUNK)) {
        chunks
            .insert((id.as_u128(), index), chunk)
            .map_err(op_err(ctx))?;
    }
    Ok(())
}

/// The sealed body of `id` from its chunks (or its whole legacy value), if stored.
pub(crate) fn get(
    chunks: &impl ReadableTable<(u128, u32), &'static [u8]>,
    legacy: &impl ReadableTable<u128, &'static [u8]>,
    id: QueueId,
) -> Result<Option<Vec<u8>>, QueueError> {
    let ctx = "reading a body";
    let key = id.as_u128();
    let mut sealed: Option<Vec<u8>> = None;
    for entry in chunks
        .range((key, 0)..=(key, u32::MAX))
        .map_err(op_err(ctx))?
    {
        let (_, value) = entry.map_err(op_err(ctx))?;
        sealed
            .get_or_insert_with(Vec::new)
            .extend_from_slice(value.value());
    }
    if sealed.is_some() {
        return Ok(sealed);
    }
    Ok(legacy
        .get(key)
        .map_err(op_err(ctx))?
        .map(|g| g.value().to_vec()))
}

/// The sealed body of `id` inside a write transaction, if stored.
pub(crate) fn get_in(t: &mut Tables<'_>, id: QueueId) -> Result<Option<Vec<u8>>, QueueError> {
    let (chunks, legacy) = t.bodies("reading a body")?;
    get(chunks, legacy, id)
}

/// Removes the body of `id` (chunks and legacy value).
pub(crate) fn remove(t: &mut Tables<'_>, id: QueueId) -> Result<(), QueueError> {
    let ctx = "removing a body";
    let key = id.as_u128();
    let (chunks, legacy) = t.bodies(ctx)?;
    chunks
        .retain_in((key, 0)..=(key, u32::MAX), |_, _| false)
        .map_err(op_err(ctx))?;
    legacy.remove(key).map_err(op_err(ctx))?;
    Ok(())
}

/// Replaces the body of `id` with `sealed`, as chunks.
pub(crate) fn replace(t: &mut Tables<'_>, id: QueueId, sealed: &[u8]) -> Result<(), QueueError> {
    remove(t, id)?;
    put(t, id, sealed)
}
