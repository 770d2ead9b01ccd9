//! The store's file backend: redb's `FileBackend`, plus a count of failed `fsync`s (and, in
//! tests, injected faults).
//!
//! The count is what lets the committer tell "the commit failed, but everything it wrote was
//! synced" from "an fsync failed, so nothing it wrote is known to be on disk" (see `commit.rs`).

use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Counters shared by every backend the store opens on its file (it reopens after I/O errors).
#[derive(Debug, Default)]
pub(crate) struct Health {
    sync_failures: AtomicU64,
    #[cfg(test)]
    pub(crate) faults: Faults,
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

/// redb's file backend with the store's health counters.
#[derive(Debug)]
pub(crate) struct Backend {
    inner: FileBackend,
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
        Ok(Backend {
            inner: FileBackend::new(file)?,
            health,
        })
    }
}

impl StorageBackend for Backend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.inner.set_len(len)
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
        self.inner.close()
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
