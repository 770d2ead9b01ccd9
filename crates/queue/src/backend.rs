//! The store's file backend: redb's `FileBackend`, plus a count of failed `fsync`s (and, in
//! tests, injected faults), and a file that does not shrink while the store is open.
//!
//! The count is what lets the committer tell "the commit failed, but everything it wrote was
//! synced" from "an fsync failed, so nothing it wrote is known to be on disk" (see `commit.rs`).
//!
//! redb shrinks its file at a commit whose end of file is free, i.e. after the queue drained.
//! On the benchmark VM a shrinking `ftruncate` took 23–80 ms, and every enqueue waiting for
//! that commit waited for it. So a shrink only changes the length redb sees (`logical`); the
//! bytes past it stay in the file (`physical`) until the queue is closed, and a later grow
//! first zeroes the part it takes back (`FALLOC_FL_ZERO_RANGE`: redb requires new space to
//! read as zeros). If the process dies in between, the file is longer than redb's last layout;
//! redb repairs after any crash anyway, and it takes its layout from the file's length, which
//! is always one it used before (see decisions.md, "The store file shrinks when it closes").

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rustix::fs::FallocateFlags;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Counters shared by every backend the store opens on its file (it reopens after I/O errors).
#[derive(Debug, Default)]
pub(crate) struct Health {
    sync_failures: AtomicU64,
    /// Set once `FALLOC_FL_ZERO_RANGE` failed (logged once; regrows then truncate first).
    no_zero_range: std::sync::atomic::AtomicBool,
    #[cfg(test)]
    pub(crate) faults: Faults,
    /// The backend's lengths after its last `set_len`.
    #[cfg(test)]
    pub(crate) lengths: Mutex<Option<Lengths>>,
}

impl Health {
    /// How many `fsync`s of the store file have failed since the queue was opened.
    pub(crate) fn sync_failures(&self) -> u64 {
        self.sync_failures.load(Ordering::SeqCst)
    }
}

/// Faults a test arms; each counter is how many more times the fault fires. Sync faults fire
/// only on a commit's final sync (the first after a header write), not on the syncs redb makes
/// while growing the file mid-transaction.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Writes that fail with ENOSPC (nothing written).
    pub(crate) no_space_writes: AtomicU64,
    /// Syncs that happen and then report EIO (an fsync error: what reached the disk is unknown).
    pub(crate) failed_syncs: AtomicU64,
    /// Syncs that succeed but are reported to redb as an error, as if redb failed after the
    /// commit was durable.
    pub(crate) errors_after_sync: AtomicU64,
    /// Commit syncs that pass before the sync faults above start firing.
    pub(crate) clean_syncs: AtomicU64,
    /// The header (offset 0) was written since the last sync.
    header_written: std::sync::atomic::AtomicBool,
    /// `FALLOC_FL_ZERO_RANGE` reports "not supported" (as on tmpfs).
    pub(crate) no_zero_range: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl Faults {
    /// Arms `counter` to fire `times` more times.
    pub(crate) fn arm(counter: &AtomicU64, times: u64) {
        counter.store(times, Ordering::SeqCst);
    }

    fn fire(counter: &AtomicU64) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// The store file's length as redb sees it, and on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lengths {
    /// The length redb last set: it reads and writes only below it.
    pub(crate) logical: u64,
    /// The file's length: at least `logical`; the rest is left over from before a shrink.
    pub(crate) physical: u64,
}

/// redb's file backend with the store's health counters and a deferred shrink.
#[derive(Debug)]
pub(crate) struct Backend {
    inner: FileBackend,
    /// The same open file, for `fallocate` and the truncate at close.
    file: File,
    lengths: Mutex<Lengths>,
    health: Arc<Health>,
}

impl Backend {
    /// Opens (creating if needed) the store file, as `redb::Builder::create` does.
    pub(crate) fn open(path: &Path, health: Arc<Health>) -> Result<Backend, redb::DatabaseError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        let own = file.try_clone()?;
        Ok(Backend {
            inner: FileBackend::new(file)?,
            file: own,
            lengths: Mutex::new(Lengths {
                logical: len,
                physical: len,
            }),
            health,
        })
    }

    /// The current lengths.
    #[cfg(test)]
    pub(crate) fn lengths(&self) -> Lengths {
        *self.lengths.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Zeroes `len` bytes at `offset` without writing them; false where the file system
    /// cannot (then the caller truncates instead).
    fn zero_range(&self, offset: u64, len: u64) -> bool {
        #[cfg(test)]
        if self.health.faults.no_zero_range.load(Ordering::SeqCst) {
            return false;
        }
        match rustix::fs::fallocate(&self.file, FallocateFlags::ZERO_RANGE, offset, len) {
            Ok(()) => true,
            Err(e) => {
                if !self.health.no_zero_range.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "the file system cannot zero a range of the queue file; it is truncated and extended instead, which can stall commits after the queue drained");
                }
                false
            }
        }
    }

    /// Cuts the file to the length redb sees.
    fn trim(&self, lengths: &mut Lengths) -> Result<(), io::Error> {
        if lengths.physical > lengths.logical {
            self.inner.set_len(lengths.logical)?;
            lengths.physical = lengths.logical;
        }
        Ok(())
    }

    /// Makes `len` the length redb sees: a shrink is only recorded; a grow zeroes (or, where
    /// that is missing, truncates away) the old bytes it takes back and extends past them.
    fn resize(&self, l: &mut Lengths, len: u64) -> Result<(), io::Error> {
        if len <= l.logical {
            // a shrink: the bytes past `len` stay until the store closes
            l.logical = len;
            return Ok(());
        }
        // a grow: what it takes back of the old bytes must read as zeros
        let reused = len.min(l.physical);
        if reused > l.logical && !self.zero_range(l.logical, reused - l.logical) {
            self.trim(l)?;
        }
        if len > l.physical {
            // extending fills with zeros
            self.inner.set_len(len)?;
            l.physical = len;
        }
        l.logical = len;
        Ok(())
    }
}

impl StorageBackend for Backend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self
            .lengths
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .logical)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut l = self.lengths.lock().unwrap_or_else(PoisonError::into_inner);
        let result = self.resize(&mut l, len);
        #[cfg(test)]
        {
            *self
                .health
                .lengths
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(*l);
        }
        result
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let result = self.inner.sync_data();
        #[cfg(test)]
        let commit_sync = self
            .health
            .faults
            .header_written
            .swap(false, Ordering::SeqCst);
        #[cfg(test)]
        let clean = !commit_sync || Faults::fire(&self.health.faults.clean_syncs);
        #[cfg(test)]
        let result = result.and_then(|()| {
            if !clean && Faults::fire(&self.health.faults.failed_syncs) {
                Err(io::Error::from_raw_os_error(EIO))
            } else {
                Ok(())
            }
        });
        if result.is_err() {
            self.health.sync_failures.fetch_add(1, Ordering::SeqCst);
        }
        #[cfg(test)]
        let result = result.and_then(|()| {
            if !clean && Faults::fire(&self.health.faults.errors_after_sync) {
                Err(io::Error::other("injected error after a successful sync"))
            } else {
                Ok(())
            }
        });
        result
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        #[cfg(test)]
        if Faults::fire(&self.health.faults.no_space_writes) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        #[cfg(test)]
        if offset == 0 {
            self.health
                .faults
                .header_written
                .store(true, Ordering::SeqCst);
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        // redb wrote and synced its clean header before this: leave a file whose length is the
        // one that header records, durably, so the next open needs no repair
        let trimmed = {
            let mut l = self.lengths.lock().unwrap_or_else(PoisonError::into_inner);
            let cut = l.physical > l.logical;
            self.trim(&mut l).map(|()| cut)
        };
        let synced = match trimmed {
            Ok(true) => StorageBackend::sync_data(self),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        let closed = self.inner.close();
        synced.and(closed)
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// EIO, the error a failed fsync reports (Linux's number).
#[cfg(test)]
const EIO: i32 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    /// Whether the file system under `dir` has `FALLOC_FL_ZERO_RANGE` (tmpfs does not).
    fn zero_range_works(dir: &Path) -> bool {
        let probe = File::create(dir.join("probe")).unwrap();
        probe.set_len(8192).unwrap();
        rustix::fs::fallocate(&probe, FallocateFlags::ZERO_RANGE, 0, 4096).is_ok()
    }

    /// A shrink leaves the file as it is; a grow reads zeros where the old bytes were, with
    /// `FALLOC_FL_ZERO_RANGE` or, where that is missing, by truncating first; closing cuts the
    /// file to the length redb last set.
    #[test]
    fn a_shrink_waits_for_close_and_a_regrow_reads_zeros() {
        const MIB: u64 = 1 << 20;
        for no_zero_range in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store");
            let health = Arc::new(Health::default());
            health
                .faults
                .no_zero_range
                .store(no_zero_range, Ordering::SeqCst);
            let b = Backend::open(&path, health).unwrap();
            b.set_len(MIB).unwrap();
            b.write(0, &vec![0xAB; MIB as usize]).unwrap();
            b.set_len(4096).unwrap();
            assert_eq!(b.len().unwrap(), 4096);
            assert_eq!(
                b.lengths(),
                Lengths {
                    logical: 4096,
                    physical: MIB
                }
            );
            assert_eq!(file_len(&path), MIB, "the shrink did not truncate");
            b.set_len(MIB / 2).unwrap();
            let mut back = vec![0xFF; (MIB / 2 - 4096) as usize];
            b.read(4096, &mut back).unwrap();
            assert!(back.iter().all(|&x| x == 0), "stale bytes after a regrow");
            let mut kept = vec![0; 4096];
            b.read(0, &mut kept).unwrap();
            assert!(
                kept.iter().all(|&x| x == 0xAB),
                "bytes below the shrink changed"
            );
            let expect_physical = if no_zero_range || !zero_range_works(dir.path()) {
                MIB / 2
            } else {
                MIB
            };
            assert_eq!(b.lengths().physical, expect_physical);
            assert_eq!(file_len(&path), expect_physical);
            // growing past the old end: zeros there too
            b.set_len(2 * MIB).unwrap();
            let mut tail = vec![0xFF; MIB as usize];
            b.read(MIB, &mut tail).unwrap();
            assert!(tail.iter().all(|&x| x == 0));
            b.set_len(8192).unwrap();
            assert_eq!(file_len(&path), 2 * MIB);
            b.close().unwrap();
            assert_eq!(
                file_len(&path),
                8192,
                "close cuts the file to redb's length"
            );
        }
    }
}
