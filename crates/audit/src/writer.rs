//! The append side: [`AuditLog`], its options, and the group-committing writer thread.

use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use chrono::{SecondsFormat, Utc};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::AuditError;
use crate::files::{read_ends, sync_dir, LogPaths};
use crate::line::{check_line, seal_into, LineError, Origin, GENESIS_PREV};
use crate::outbox::{decode_or_verbatim, present_in};
use crate::record::Record;

/// Default size at which the current file is rotated: 64 MiB.
pub const DEFAULT_ROTATE_BYTES: u64 = 64 * 1024 * 1024;

/// Records waiting for the writer before `record` callers have to wait to enqueue.
const QUEUE_DEPTH: usize = 4096;
/// Most records written under one fsync.
const MAX_BATCH: usize = 1024;
/// Largest batch buffer kept for the next batch, bytes (a rare huge batch gives its memory back).
const MAX_KEPT_BUF: usize = 1024 * 1024;
/// Longest an outbox line waits for its fsync (its record is durable in the queue meanwhile).
const LAZY_SYNC: Duration = Duration::from_millis(200);
/// Most outbox lines written but not yet synced before the writer syncs anyway.
const LAZY_MAX_LINES: usize = 4096;
/// Longest a record handed over with [`AuditLog::submit_soon`] waits for its fsync.
pub const SOON_SYNC: Duration = Duration::from_millis(20);

/// Where the audit log lives and when it rotates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditOptions {
    /// The current file, e.g. `/var/lib/sealpost/audit/audit.jsonl`.
    pub path: PathBuf,
    /// Rotate the current file before it would exceed this many bytes (0 disables rotation).
    pub rotate_bytes: u64,
}

impl AuditOptions {
    /// Options for `path` with the default rotation size.
    pub fn new(path: impl Into<PathBuf>) -> AuditOptions {
        AuditOptions {
            path: path.into(),
            rotate_bytes: DEFAULT_ROTATE_BYTES,
        }
    }
}

/// One job for the writer, in the order the log must show it.
pub(crate) enum Job {
    /// A record whose caller waits until its line is on disk.
    Record {
        rec: Record,
        reply: oneshot::Sender<Result<(), AuditError>>,
        /// When the writer syncs for it.
        sync: SyncWhen,
        /// Answered once the line is in the file (before its sync), if the caller asked.
        written: Option<oneshot::Sender<Result<(), AuditError>>>,
    },
    /// Rows the queue just committed, in seq order: written at once, synced lazily, and
    /// reported through [`AuditLog::outbox_durable`].
    Outbox(Vec<(u64, Vec<u8>)>),
    /// Start-up: append the rows whose lines the log lacks, sync, answer with the last seq.
    Replay {
        rows: Vec<(u64, Vec<u8>)>,
        reply: oneshot::Sender<Result<Option<u64>, AuditError>>,
    },
}

/// When the writer syncs a record a caller waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncWhen {
    /// Right after writing its batch.
    Now,
    /// Within [`SOON_SYNC`], sharing the fsync with whatever else is written meanwhile.
    Soon,
}

/// A handle to the append-only, hash-chained audit log; clones share one writer.
///
/// Dropping the last clone closes the queue and waits for the writer thread to finish its
/// current batch and release the lock, so a new handle can open the same log right after.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

/// The shared part of every [`AuditLog`] clone.
pub(crate) struct Inner {
    path: PathBuf,
    pub(crate) tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// Set once the writer refuses records (after a failed write, fsync or rotation).
    failed: Arc<AtomicBool>,
    /// The highest outbox seq whose line is on disk (0: none yet).
    durable: watch::Receiver<u64>,
    #[cfg(test)]
    syncs: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer loop; joining releases the lock file before a
        // new handle may open the log again.
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("audit writer thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// Where the chain stands: what the next record gets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainHead {
    next_seq: u64,
    prev: String,
    /// The first seq in the current file, if it holds any record.
    first_seq_in_file: Option<u64>,
}

/// Checks one line read at open time and maps a failure to [`AuditError::Corrupt`].
fn check_at_open(
    file: &Path,
    line: u64,
    bytes: &[u8],
    terminated: bool,
) -> Result<crate::line::Sealed, AuditError> {
    let corrupt = |source| AuditError::Corrupt {
        file: file.to_path_buf(),
        line,
        source,
    };
    if !terminated {
        return Err(corrupt(LineError::Unterminated));
    }
    check_line(bytes).map_err(corrupt)
}

/// Reads where the chain stands from the current file, or else from the newest rotated file.
fn find_head(paths: &LogPaths) -> Result<ChainHead, AuditError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AuditError::Read {
            path,
            source: Arc::new(source),
        }
    };
    let ends = match read_ends(&paths.current) {
        Ok(ends) => ends,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(read_err(&paths.current)(e)),
    };
    if let (Some(first), Some((number, last, terminated))) = (&ends.first, &ends.last) {
        let last = check_at_open(&paths.current, *number, last, *terminated)?;
        let first = check_at_open(&paths.current, 1, first, true)?;
        return Ok(ChainHead {
            next_seq: last.seq.checked_add(1).ok_or(AuditError::SeqExhausted)?,
            prev: last.hash,
            first_seq_in_file: Some(first.seq),
        });
    }
    let rotated = paths.rotated().map_err(read_err(&paths.dir))?;
    let Some((_, newest)) = rotated.last() else {
        return Ok(ChainHead {
            next_seq: 1,
            prev: GENESIS_PREV.to_string(),
            first_seq_in_file: None,
        });
    };
    let ends = read_ends(newest).map_err(read_err(newest))?;
    let Some((number, last, terminated)) = ends.last else {
        return Err(AuditError::Corrupt {
            file: newest.clone(),
            line: 1,
            source: LineError::Empty,
        });
    };
    let last = check_at_open(newest, number, &last, terminated)?;
    Ok(ChainHead {
        next_seq: last.seq.checked_add(1).ok_or(AuditError::SeqExhausted)?,
        prev: last.hash,
        first_seq_in_file: None,
    })
}

/// Opens (creating if needed, mode 0600) a log file for appending.
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

impl AuditLog {
    /// Opens the log, continuing the chain from its last record, and starts the writer.
    ///
    /// Creates the directory (0700) and the current file (0600) if missing. Refuses to open when
    /// the current file's last (or first) line is not a valid record, naming the file and line:
    /// a cut-short last line means a crash mid-write, and continuing silently would hide it.
    /// Only one writer may hold a log at a time (an advisory lock on `<stem>.lock`).
    pub fn open(opts: AuditOptions) -> Result<AuditLog, AuditError> {
        Self::open_gated(opts, None)
    }

    /// [`AuditLog::open`], with a writer that waits for `gate` before its first batch.
    fn open_gated(
        opts: AuditOptions,
        gate: Option<std::sync::mpsc::Receiver<()>>,
    ) -> Result<AuditLog, AuditError> {
        let paths = LogPaths::new(&opts.path);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&paths.dir)
            .map_err(|source| AuditError::CreateDir {
                path: paths.dir.clone(),
                source: Arc::new(source),
            })?;

        let lock_path = paths.lock_file();
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| AuditError::Open {
                path: lock_path.clone(),
                source: Arc::new(source),
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(AuditError::Locked { path: lock_path }),
            Err(TryLockError::Error(source)) => {
                return Err(AuditError::Open {
                    path: lock_path,
                    source: Arc::new(source),
                })
            }
        }

        let head = find_head(&paths)?;
        let existed = paths.current.exists();
        let file = open_append(&paths.current).map_err(|source| AuditError::Open {
            path: paths.current.clone(),
            source: Arc::new(source),
        })?;
        let meta = file.metadata().map_err(|source| AuditError::Read {
            path: paths.current.clone(),
            source: Arc::new(source),
        })?;
        if meta.mode() & 0o077 != 0 {
            tracing::warn!(
                path = %paths.current.display(),
                mode = format_args!("{:o}", meta.mode() & 0o777),
                "audit file is accessible to group or others; expected 0600"
            );
        }
        if !existed {
            sync_dir(&paths.dir).map_err(|source| AuditError::Sync {
                path: paths.dir.clone(),
                source: Arc::new(source),
            })?;
        }

        #[cfg(test)]
        let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let (durable_tx, durable) = watch::channel(0);
        let mut writer = Writer {
            paths,
            file,
            size: meta.len(),
            head,
            rotate_bytes: opts.rotate_bytes,
            poisoned: false,
            failed: Arc::clone(&failed),
            buf: Vec::new(),
            dirty_since: None,
            dirty_lines: 0,
            appended_outbox: 0,
            waiters: Vec::new(),
            waiting_since: None,
            durable_tx,
            _lock: lock,
            #[cfg(test)]
            syncs: Arc::clone(&syncs),
        };
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("sealpost-audit".into())
            .spawn(move || {
                if let Some(gate) = gate {
                    // A closed gate also opens it.
                    let _ = gate.recv();
                }
                writer.run(rx);
            })
            .map_err(|e| AuditError::Spawn(Arc::new(e)))?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                path: opts.path,
                tx: Some(tx),
                thread: Some(thread),
                failed,
                durable,
                #[cfg(test)]
                syncs,
            }),
        })
    }

    /// The path of the current file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Appends `rec` to the chain; returns once its line is written and fsync'd.
    ///
    /// Concurrent callers share fsyncs (group commit). If the future is dropped after the record
    /// was handed to the writer, the record is still written.
    pub async fn record(&self, rec: Record) -> Result<(), AuditError> {
        self.submit(rec).await?.wait().await
    }

    /// Hands `rec` to the writer (in call order) without waiting for the disk; the returned
    /// [`Durable`] resolves once its line is written and fsync'd.
    ///
    /// A caller producing several records for one event submits them all and waits for them
    /// together, so they share one fsync instead of paying one each.
    pub async fn submit(&self, rec: Record) -> Result<Durable, AuditError> {
        self.hand_over(rec, SyncWhen::Now, None).await
    }

    /// [`AuditLog::submit`] for a caller that can wait a little: the line is written at once
    /// (in call order, like every record) but its fsync may wait up to [`SOON_SYNC`], so that
    /// records arriving meanwhile share it.
    ///
    /// For records whose durability gates something no client waits for, such as a delivery's
    /// outcome before the queue records it.
    pub async fn submit_soon(&self, rec: Record) -> Result<Durable, AuditError> {
        self.hand_over(rec, SyncWhen::Soon, None).await
    }

    /// [`AuditLog::submit_soon`] that returns once the line is in the file (its fsync still to
    /// come): `Err` if it could not be written, and then the log has failed.
    ///
    /// For a record that must exist before an action, such as a delivery attempt's evidence
    /// before the message is sent.
    pub async fn submit_soon_written(&self, rec: Record) -> Result<Durable, AuditError> {
        let (written, in_file) = oneshot::channel();
        let durable = self.hand_over(rec, SyncWhen::Soon, Some(written)).await?;
        in_file.await.map_err(|_| AuditError::Closed)??;
        Ok(durable)
    }

    async fn hand_over(
        &self,
        rec: Record,
        sync: SyncWhen,
        written: Option<oneshot::Sender<Result<(), AuditError>>>,
    ) -> Result<Durable, AuditError> {
        let tx = self.inner.tx.as_ref().ok_or(AuditError::Closed)?;
        let (reply, outcome) = oneshot::channel();
        tx.send(Job::Record {
            rec,
            reply,
            sync,
            written,
        })
        .await
        .map_err(|_| AuditError::Closed)?;
        Ok(Durable(outcome))
    }

    /// Whether the writer has stopped taking records after a failed write, fsync or rotation.
    pub fn failed(&self) -> bool {
        self.inner.failed.load(Ordering::SeqCst)
    }

    /// The highest outbox seq whose line is on disk (0 before the first); changes after each
    /// sync that made new outbox lines durable.
    pub fn outbox_durable(&self) -> watch::Receiver<u64> {
        self.inner.durable.clone()
    }

    /// Appends, in order, the lines of those outbox `rows` (seq, row bytes) that the log does
    /// not hold yet, syncs, and returns the highest seq of `rows` (now all durable in the log).
    ///
    /// For start-up, before any other record: the rows are what the queue still held, i.e.
    /// committed decisions whose lines may or may not have reached the log before a crash.
    /// The current file and the newest rotated file are searched for lines already there.
    pub async fn replay_outbox(
        &self,
        rows: Vec<(u64, Vec<u8>)>,
    ) -> Result<Option<u64>, AuditError> {
        let tx = self.inner.tx.as_ref().ok_or(AuditError::Closed)?;
        let (reply, outcome) = oneshot::channel();
        tx.send(Job::Replay { rows, reply })
            .await
            .map_err(|_| AuditError::Closed)?;
        outcome.await.map_err(|_| AuditError::Closed)?
    }

    /// A handle for the thread that commits outbox rows; it does not keep the log open.
    pub fn outbox_writer(&self) -> crate::outbox::OutboxWriter {
        crate::outbox::OutboxWriter::new(Arc::downgrade(&self.inner))
    }
}

/// A record handed to the writer; [`Durable::wait`] returns once it is on disk.
#[derive(Debug)]
pub struct Durable(oneshot::Receiver<Result<(), AuditError>>);

impl Durable {
    /// Waits until the record is written and fsync'd (or failed).
    pub async fn wait(self) -> Result<(), AuditError> {
        self.0.await.map_err(|_| AuditError::Closed)?
    }
}

/// The writer thread's state: the open current file and the chain head.
struct Writer {
    paths: LogPaths,
    file: File,
    /// Bytes in the current file.
    size: u64,
    head: ChainHead,
    rotate_bytes: u64,
    /// Set after a failed write, fsync or rotation; every later record is refused.
    poisoned: bool,
    /// `poisoned`, for [`AuditLog::failed`].
    failed: Arc<AtomicBool>,
    /// The lines of the batch being written (kept between batches, so its memory is reused).
    buf: Vec<u8>,
    /// When the oldest line written but not yet synced was written.
    dirty_since: Option<Instant>,
    /// Lines written but not yet synced.
    dirty_lines: usize,
    /// The highest outbox seq written to the file (0: none).
    appended_outbox: u64,
    /// Callers of [`AuditLog::submit_soon`] whose lines are written, answered at the next sync.
    waiters: Vec<oneshot::Sender<Result<(), AuditError>>>,
    /// When the oldest of `waiters` was written.
    waiting_since: Option<Instant>,
    /// Publishes the highest outbox seq on disk after each sync.
    durable_tx: watch::Sender<u64>,
    /// Held (locked) for the writer's lifetime.
    _lock: File,
    #[cfg(test)]
    syncs: Arc<std::sync::atomic::AtomicU64>,
}

/// One line to write: a record and, for an outbox row, where it was decided.
struct Entry<'a> {
    rec: &'a Record,
    origin: Option<Origin<'a>>,
}

/// How the lines of one run of entries fared.
struct LinesOutcome {
    /// Per entry: `Some(err)` when the record could not even be serialised.
    serialise_errors: Vec<Option<AuditError>>,
    /// Entries `..synced` are on disk even if a later step failed.
    synced: usize,
    /// The failure that stopped the run, if any.
    failure: Option<AuditError>,
}

/// What the writer does next.
// `Next` lives for one turn of the writer's loop, on its stack; boxing the job would cost an
// allocation per record for nothing.
#[allow(clippy::large_enum_variant)]
enum Next {
    Job(Job),
    /// Written lines have waited [`LAZY_SYNC`] (outbox rows) or [`SOON_SYNC`]: sync them.
    Due,
    /// Every handle is gone.
    Closed,
}

impl Writer {
    /// Takes batches off the queue until every handle is gone.
    fn run(&mut self, mut rx: mpsc::Receiver<Job>) {
        // The lazy sync of outbox lines needs a timer; without one they are synced at once.
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| tracing::warn!(error = %e, "audit writer has no timer; outbox lines are synced at once"))
            .ok();
        let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        loop {
            let first = match self.next(&mut rx, timer.as_ref()) {
                Next::Job(job) => job,
                Next::Due => {
                    self.sync_dirty();
                    continue;
                }
                Next::Closed => {
                    self.sync_dirty();
                    break;
                }
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.process(&mut batch, timer.is_some());
        }
    }

    /// When lines written but not yet synced are due for their sync, if any are waiting.
    fn sync_due(&self) -> Option<Instant> {
        let lazy = self.dirty_since.map(|t| t + LAZY_SYNC);
        let soon = self.waiting_since.map(|t| t + SOON_SYNC);
        match (lazy, soon) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Waits for the next job, or until written lines are due for their sync.
    fn next(&self, rx: &mut mpsc::Receiver<Job>, timer: Option<&tokio::runtime::Runtime>) -> Next {
        let job = match (self.sync_due(), timer) {
            (Some(due), Some(rt)) => {
                let deadline = tokio::time::Instant::from_std(due);
                // the timer must be made inside the runtime
                match rt.block_on(async { tokio::time::timeout_at(deadline, rx.recv()).await }) {
                    Ok(job) => job,
                    Err(_) => return Next::Due,
                }
            }
            (Some(_), None) => return Next::Due,
            (None, _) => rx.blocking_recv(),
        };
        job.map_or(Next::Closed, Next::Job)
    }

    /// Writes a batch in order; a replay runs after the jobs before it are written.
    fn process(&mut self, batch: &mut Vec<Job>, lazy: bool) {
        while let Some(at) = batch.iter().position(|j| matches!(j, Job::Replay { .. })) {
            let mut rest = batch.split_off(at);
            self.write_jobs(batch, lazy);
            let Job::Replay { rows, reply } = rest.remove(0) else {
                continue;
            };
            let result = if self.poisoned {
                Err(self.poisoned_error())
            } else {
                self.replay(rows)
            };
            let _ = reply.send(result);
            *batch = rest;
        }
        self.write_jobs(batch, lazy);
    }

    /// The error every record gets once the writer stopped.
    fn poisoned_error(&self) -> AuditError {
        AuditError::Poisoned {
            path: self.paths.current.clone(),
        }
    }

    /// Stops taking records after `err`.
    fn poison(&mut self, err: &AuditError) {
        self.poisoned = true;
        self.failed.store(true, Ordering::SeqCst);
        // lines written but never synced are not known to be on disk
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Err(err.clone()));
        }
        self.waiting_since = None;
        tracing::error!(error = %err, "audit log write failed; refusing further records");
    }

    /// Writes the records and outbox rows of `jobs` (no replays), syncing at once if a caller
    /// waits (or `lazy` is false), and answers the callers; drains `jobs`.
    fn write_jobs(&mut self, jobs: &mut Vec<Job>, lazy: bool) {
        if jobs.is_empty() {
            return;
        }
        if self.poisoned {
            for job in jobs.drain(..) {
                if let Job::Record { reply, written, .. } = job {
                    if let Some(written) = written {
                        let _ = written.send(Err(self.poisoned_error()));
                    }
                    let _ = reply.send(Err(self.poisoned_error()));
                }
                // outbox rows stay in the queue and are replayed at the next start
            }
            return;
        }
        let decoded: Vec<(u64, String, Record)> = jobs
            .iter()
            .filter_map(|job| match job {
                Job::Outbox(rows) => Some(rows),
                _ => None,
            })
            .flatten()
            .map(|(seq, bytes)| decode_or_verbatim(*seq, bytes))
            .collect();
        let mut urgent = !lazy;
        let mut entries = Vec::with_capacity(jobs.len() + decoded.len());
        let mut rows = decoded.iter();
        for job in jobs.iter() {
            match job {
                Job::Record { rec, sync, .. } => {
                    urgent |= *sync == SyncWhen::Now;
                    entries.push(Entry { rec, origin: None });
                }
                Job::Outbox(batch) => {
                    for (seq, at, rec) in rows.by_ref().take(batch.len()) {
                        let origin = Some(Origin { seq: *seq, at });
                        entries.push(Entry { rec, origin });
                    }
                }
                Job::Replay { .. } => {}
            }
        }
        let outcome = self.write_entries(&entries, urgent);
        drop(entries);
        if let Some(err) = &outcome.failure {
            self.poison(err);
        }
        let mut errors = outcome.serialise_errors.into_iter();
        let mut index = 0;
        for job in jobs.drain(..) {
            match job {
                Job::Record {
                    reply,
                    sync,
                    written,
                    ..
                } => {
                    let serialise_error = errors.next().flatten();
                    if let Some(written) = written {
                        // in the file unless it could not be serialised or the run failed
                        // before it was synced (where it stopped is not known)
                        let in_file = match (&serialise_error, &outcome.failure) {
                            (Some(err), _) => Err(err.clone()),
                            (None, Some(err)) if index >= outcome.synced => Err(err.clone()),
                            _ => Ok(()),
                        };
                        let _ = written.send(in_file);
                    }
                    let result = match (serialise_error, &outcome.failure) {
                        (Some(err), _) => Err(err),
                        (None, _) if index < outcome.synced => Ok(()),
                        (None, Some(err)) => Err(err.clone()),
                        (None, None) if sync == SyncWhen::Soon => {
                            // written; answered by the sync that makes it durable
                            self.waiters.push(reply);
                            self.waiting_since.get_or_insert_with(Instant::now);
                            index += 1;
                            continue;
                        }
                        (None, None) => Err(AuditError::Closed),
                    };
                    // The caller may have given up waiting; the record stands either way.
                    let _ = reply.send(result);
                    index += 1;
                }
                Job::Outbox(rows) => {
                    errors.by_ref().take(rows.len()).for_each(drop);
                    index += rows.len();
                }
                Job::Replay { .. } => {}
            }
        }
    }

    /// Appends the lines of the outbox rows the log lacks (see [`AuditLog::replay_outbox`]).
    fn replay(&mut self, mut rows: Vec<(u64, Vec<u8>)>) -> Result<Option<u64>, AuditError> {
        rows.sort_by_key(|(seq, _)| *seq);
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(None);
        };
        let (first, last) = (first.0, last.0);
        let present = present_in(&self.paths, first)?;
        let decoded: Vec<(u64, String, Record)> = rows
            .iter()
            .filter(|(seq, _)| !present.contains(seq))
            .map(|(seq, bytes)| decode_or_verbatim(*seq, bytes))
            .collect();
        if !decoded.is_empty() {
            tracing::warn!(
                appended = decoded.len(),
                already_logged = rows.len() - decoded.len(),
                "appending audit records committed before an unclean stop"
            );
        }
        let entries: Vec<Entry<'_>> = decoded
            .iter()
            .map(|(seq, at, rec)| Entry {
                rec,
                origin: Some(Origin { seq: *seq, at }),
            })
            .collect();
        // The lines found in the file become durable with this sync too.
        self.appended_outbox = self.appended_outbox.max(last);
        let outcome = self.write_entries(&entries, true);
        if let Some(err) = outcome.failure {
            self.poison(&err);
            return Err(err);
        }
        Ok(Some(last))
    }

    /// Syncs lines written lazily, if any.
    fn sync_dirty(&mut self) {
        if self.dirty_since.is_some() && !self.poisoned {
            if let Err(e) = self.sync() {
                self.poison(&e);
            }
        }
    }

    /// Seals and writes `entries`, rotating as needed; syncs if `sync_now` or if written lines
    /// have waited long enough.
    fn write_entries(&mut self, entries: &[Entry<'_>], sync_now: bool) -> LinesOutcome {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        if buf.capacity() > MAX_KEPT_BUF {
            buf = Vec::new();
        }
        let outcome = self.write_lines(entries, &mut buf, sync_now);
        self.buf = buf;
        outcome
    }

    /// [`Writer::write_entries`]'s work, with `buf` to collect the lines in.
    fn write_lines(
        &mut self,
        entries: &[Entry<'_>],
        buf: &mut Vec<u8>,
        sync_now: bool,
    ) -> LinesOutcome {
        let mut outcome = LinesOutcome {
            serialise_errors: Vec::with_capacity(entries.len()),
            synced: 0,
            failure: None,
        };
        // the highest outbox seq among the lines in `buf`, and how many lines it holds
        let (mut buf_outbox, mut buf_lines) = (0, 0);
        let mut end = entries.len();
        let mut stopped = None;
        for (i, entry) in entries.iter().enumerate() {
            let seq = self.head.next_seq;
            let Some(next_seq) = seq.checked_add(1) else {
                outcome
                    .serialise_errors
                    .push(Some(AuditError::SeqExhausted));
                continue;
            };
            let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
            let start = buf.len();
            let hash = match seal_into(buf, seq, &ts, &self.head.prev, entry.rec, entry.origin) {
                Ok(hash) => hash,
                Err(e) => {
                    let err = AuditError::Serialize(Arc::new(e));
                    if entry.origin.is_some() {
                        // A committed row must reach the log before later rows count as
                        // durable: stop here.
                        end = i;
                        stopped = Some(err);
                        break;
                    }
                    outcome.serialise_errors.push(Some(err));
                    continue;
                }
            };
            outcome.serialise_errors.push(None);
            let line_len = (buf.len() - start) as u64;
            let pending = self.size + start as u64;
            if self.rotate_bytes > 0 && pending > 0 && pending + line_len > self.rotate_bytes {
                // the lines before this one go to the current file, this one to the next
                let before = buf.get(..start).unwrap_or_default();
                if let Err(e) = self
                    .append_lines(before, buf_lines, buf_outbox)
                    .and_then(|()| self.sync())
                {
                    outcome.failure = Some(e);
                    return outcome;
                }
                buf.drain(..start);
                (buf_outbox, buf_lines) = (0, 0);
                outcome.synced = i;
                if let Err(e) = self.rotate() {
                    outcome.failure = Some(e);
                    return outcome;
                }
            }
            if self.head.first_seq_in_file.is_none() {
                self.head.first_seq_in_file = Some(seq);
            }
            self.head.next_seq = next_seq;
            self.head.prev = hash;
            buf_lines += 1;
            if let Some(origin) = entry.origin {
                buf_outbox = buf_outbox.max(origin.seq);
            }
        }
        if let Err(e) = self.append_lines(buf, buf_lines, buf_outbox) {
            outcome.failure = Some(e);
            return outcome;
        }
        let waited = self.sync_due().is_some_and(|due| Instant::now() >= due);
        if sync_now || waited || self.dirty_lines >= LAZY_MAX_LINES {
            if let Err(e) = self.sync() {
                outcome.failure = Some(e);
                return outcome;
            }
            outcome.synced = end;
        }
        outcome.failure = stopped;
        outcome
    }

    /// Appends `lines` complete lines whose highest outbox seq is `max_outbox` (not yet durable).
    fn append_lines(
        &mut self,
        bytes: &[u8],
        lines: usize,
        max_outbox: u64,
    ) -> Result<(), AuditError> {
        self.append(bytes)?;
        if lines > 0 {
            self.dirty_since.get_or_insert_with(Instant::now);
            self.dirty_lines += lines;
        }
        self.appended_outbox = self.appended_outbox.max(max_outbox);
        Ok(())
    }

    /// Writes `bytes` at the end of the current file (not yet durable).
    fn append(&mut self, bytes: &[u8]) -> Result<(), AuditError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(bytes)
            .map_err(|source| AuditError::Write {
                path: self.paths.current.clone(),
                source: Arc::new(source),
            })?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Flushes the current file's data to disk and publishes the outbox seq now durable.
    fn sync(&mut self) -> Result<(), AuditError> {
        self.file.sync_data().map_err(|source| AuditError::Sync {
            path: self.paths.current.clone(),
            source: Arc::new(source),
        })?;
        #[cfg(test)]
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dirty_since = None;
        self.dirty_lines = 0;
        self.waiting_since = None;
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Ok(()));
        }
        if self.appended_outbox > *self.durable_tx.borrow() {
            self.durable_tx.send_replace(self.appended_outbox);
        }
        Ok(())
    }

    /// Renames the (already synced) current file to its rotated name and starts a new one.
    fn rotate(&mut self) -> Result<(), AuditError> {
        let Some(first_seq) = self.head.first_seq_in_file else {
            return Ok(());
        };
        let from = self.paths.current.clone();
        let to = self.paths.rotated_name(first_seq);
        // We hold the lock, so nobody else creates this name between the check and the rename.
        if to.exists() {
            return Err(AuditError::RotateTargetExists { path: to });
        }
        let rotate_err = |to: &Path| {
            let from = from.clone();
            let to = to.to_path_buf();
            move |source| AuditError::Rotate {
                from,
                to,
                source: Arc::new(source),
            }
        };
        std::fs::rename(&from, &to).map_err(rotate_err(&to))?;
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&from)
            .map_err(rotate_err(&from))?;
        sync_dir(&self.paths.dir).map_err(|source| AuditError::Sync {
            path: self.paths.dir.clone(),
            source: Arc::new(source),
        })?;
        tracing::info!(
            rotated = %to.display(),
            first_seq,
            last_seq = self.head.next_seq.saturating_sub(1),
            "audit log rotated"
        );
        self.file = file;
        self.size = 0;
        self.head.first_seq_in_file = None;
        Ok(())
    }
}

#[cfg(test)]
impl AuditLog {
    /// Records handed over but not yet taken by the writer.
    fn queued(&self) -> usize {
        self.inner
            .tx
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    /// fsyncs of the current file so far.
    pub(crate) fn syncs(&self) -> u64 {
        self.inner.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::test_support::{json, lines_of, rotated_files, sample, write_log};
    use crate::{verify, Event};

    fn opts(path: &Path, rotate_bytes: u64) -> AuditOptions {
        AuditOptions {
            path: path.to_path_buf(),
            rotate_bytes,
        }
    }

    #[tokio::test]
    async fn append_then_verify_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        log.record(Record::new(Event::Started)).await.unwrap();
        log.record(
            Record::new(Event::Accepted)
                .queue_id("q1")
                .user("billing-app")
                .client_ip("192.0.2.1".parse().unwrap())
                .detail("size", 1234)
                .detail("recipients", 2)
                .detail("policy", "phi"),
        )
        .await
        .unwrap();
        log.record(
            Record::new(Event::Attempt)
                .queue_id("q1")
                .recipient("a@example.org")
                .mx("mx.example.org")
                .ip("192.0.2.25".parse().unwrap())
                .tls(serde_json::json!({"version": "TLSv1_3", "verified": true})),
        )
        .await
        .unwrap();
        drop(log);

        let report = verify(&path).unwrap();
        let lines = lines_of(&path);
        assert_eq!(lines.len(), 3);
        assert_eq!(report.files, 1);
        assert_eq!(report.records, 3);
        assert_eq!((report.first_seq, report.last_seq), (1, 3));
        let last = json(&lines[2]);
        assert_eq!(
            last["hash"],
            serde_json::Value::from(report.last_hash.clone())
        );

        let first = json(&lines[0]);
        assert_eq!(first["seq"], 1);
        assert_eq!(first["prev"], GENESIS_PREV);
        assert_eq!(first["event"], "started");
        let accepted = json(&lines[1]);
        assert_eq!(accepted["prev"], first["hash"]);
        assert_eq!(accepted["event"], "accepted");
        assert_eq!(accepted["user"], "billing-app");
        assert_eq!(accepted["client_ip"], "192.0.2.1");
        assert_eq!(accepted["detail"]["size"], 1234);
        assert_eq!(last["tls"]["verified"], true);
        assert_eq!(last["mx"], "mx.example.org");

        // ts: RFC 3339 UTC with milliseconds, e.g. 2025-01-02T03:04:05.678Z
        let ts = first["ts"].as_str().unwrap();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok());
        // the fixed field order is visible in the raw bytes
        assert!(lines[1].starts_with("{\"seq\":2,\"ts\":\""), "{}", lines[1]);
        assert!(lines[1].contains("\"prev\":"));
        assert!(
            lines[1].find("\"event\"").unwrap() < lines[1].find("\"queue_id\"").unwrap()
                && lines[1].find("\"detail\"").unwrap() < lines[1].find("\"hash\"").unwrap()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fifty_concurrent_tasks_make_one_gapless_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        let per_task = 20u64;
        let mut tasks = Vec::new();
        for task in 0..50u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..per_task {
                    log.record(
                        Record::new(Event::Attempt)
                            .detail("task", task)
                            .detail("n", n),
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let syncs = log.syncs();
        drop(log);

        let report = verify(&path).unwrap();
        assert_eq!(report.records, 50 * per_task);
        assert_eq!((report.first_seq, report.last_seq), (1, 50 * per_task));
        let mut seqs = HashSet::new();
        let mut facts = HashSet::new();
        for line in lines_of(&path) {
            let rec = json(&line);
            assert!(seqs.insert(rec["seq"].as_u64().unwrap()), "duplicate seq");
            let key = (
                rec["detail"]["task"].as_u64().unwrap(),
                rec["detail"]["n"].as_u64().unwrap(),
            );
            assert!(facts.insert(key), "record {key:?} written twice");
        }
        assert_eq!(seqs, (1..=50 * per_task).collect::<HashSet<_>>());
        assert_eq!(facts.len() as u64, 50 * per_task);
        assert!(syncs >= 1 && syncs <= 50 * per_task);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_callers_share_one_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (open_gate, gate) = std::sync::mpsc::channel();
        let log = AuditLog::open_gated(AuditOptions::new(&path), Some(gate)).unwrap();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move { log.record(sample(i)).await }));
        }
        while log.queued() < 50 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        open_gate.send(()).unwrap();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(log.syncs(), 1, "50 queued records must share one fsync");
        drop(log);
        assert_eq!(verify(&path).unwrap().records, 50);
    }

    /// One batch that crosses the rotation size several times: each file stays under it, the
    /// chain runs on across the files, and no line is lost or repeated.
    #[tokio::test]
    async fn one_batch_rotates_in_the_middle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (open_gate, gate) = std::sync::mpsc::channel();
        let log = AuditLog::open_gated(opts(&path, 1000), Some(gate)).unwrap();
        let mut pending = Vec::new();
        for i in 1..=40u64 {
            pending.push(log.submit(sample(i).detail("n", i)).await.unwrap());
        }
        while log.queued() < 40 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        open_gate.send(()).unwrap();
        for d in pending {
            d.wait().await.unwrap();
        }
        drop(log);
        let rotated = rotated_files(&path);
        assert!(rotated.len() >= 3, "only {} rotated files", rotated.len());
        let mut ns = Vec::new();
        for file in rotated.iter().chain(std::iter::once(&path)) {
            let size = std::fs::metadata(file).unwrap().len();
            assert!(size <= 1000, "{} has {size} bytes", file.display());
            for line in lines_of(file) {
                ns.push(json(&line)["detail"]["n"].as_u64().unwrap());
            }
        }
        assert_eq!(ns, (1..=40).collect::<Vec<_>>());
        let report = verify(&path).unwrap();
        assert_eq!((report.records, report.files), (40, rotated.len() + 1));
    }

    #[tokio::test]
    async fn line_is_in_the_file_when_record_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        for i in 1..=3u64 {
            log.record(sample(i)).await.unwrap();
            // A fresh reader (new open file description) sees the complete line at once.
            let text = std::fs::read(&path).unwrap();
            assert!(text.ends_with(b"\n"));
            let lines: Vec<&[u8]> = text
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .collect();
            assert_eq!(lines.len() as u64, i);
            let sealed = check_line(lines[lines.len() - 1]).unwrap();
            assert_eq!(sealed.seq, i);
        }
        assert!(log.syncs() >= 3, "every acknowledged record was fsync'd");
    }

    #[tokio::test]
    async fn submitted_records_keep_call_order_and_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        let mut pending = Vec::new();
        for i in 1..=20u64 {
            pending.push(log.submit(sample(i).detail("n", i)).await.unwrap());
        }
        for d in pending {
            d.wait().await.unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let ns: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["detail"]["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            ns,
            (1..=20).collect::<Vec<_>>(),
            "written in submission order"
        );
        assert!(
            log.syncs() < 20,
            "submitted together, they shared fsyncs ({})",
            log.syncs()
        );
        assert_eq!(verify(&path).unwrap().records, 20);
    }

    /// Records handed over with `submit_soon` are written at once and share one fsync, made
    /// when the first of them has waited `SOON_SYNC`. A round whose two lines took longer than
    /// `SOON_SYNC` to appear (a slow machine) proves nothing about the timing, so rounds are
    /// repeated until one is fast; five slow rounds in a row fail the test.
    #[tokio::test]
    async fn soon_records_are_written_at_once_and_share_a_later_fsync() {
        let limit = Duration::from_secs(10);
        for _round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.jsonl");
            let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
            let start = Instant::now();
            let first = log.submit_soon(sample(1)).await.unwrap();
            let second = log.submit_soon(sample(2)).await.unwrap();
            while lines_of(&path).len() < 2 {
                assert!(
                    start.elapsed() < limit,
                    "the lines were not written at once"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // read before the clock: no sync can come before the first line has waited SOON_SYNC
            let syncs = log.syncs();
            let fast = start.elapsed() < SOON_SYNC;
            tokio::time::timeout(limit, first.wait())
                .await
                .expect("the first waiter was answered")
                .unwrap();
            tokio::time::timeout(limit, second.wait())
                .await
                .expect("the second waiter was answered")
                .unwrap();
            assert!(start.elapsed() >= SOON_SYNC, "synced before it was due");
            let shared = log.syncs();
            drop(log);
            assert_eq!(verify(&path).unwrap().records, 2);
            if fast {
                assert_eq!(syncs, 0, "both lines written, neither synced yet");
                assert_eq!(shared, 1, "written within SOON_SYNC, they share one fsync");
                return;
            }
        }
        panic!("five rounds in a row took longer than SOON_SYNC to write two lines");
    }

    /// `submit_soon_written` returns with the line in the file, before its sync.
    #[tokio::test]
    async fn a_record_submitted_written_is_in_the_file_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        let start = Instant::now();
        let durable = log.submit_soon_written(sample(1)).await.unwrap();
        // no waiting: the line is there the moment the call returns
        assert_eq!(lines_of(&path).len(), 1);
        if start.elapsed() < SOON_SYNC {
            assert_eq!(log.syncs(), 0, "written, not yet synced");
        }
        tokio::time::timeout(Duration::from_secs(10), durable.wait())
            .await
            .expect("synced within SOON_SYNC")
            .unwrap();
        drop(log);
        assert_eq!(verify(&path).unwrap().records, 1);
    }

    /// A record that fails the log (here its rotation) makes `submit_soon_written` fail, and
    /// the log reports failed by the time it returns.
    #[tokio::test]
    async fn a_record_submitted_written_that_fails_the_log_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 1, 1000).await;
        std::fs::write(LogPaths::new(&path).rotated_name(1), b"squatter\n").unwrap();
        let log = AuditLog::open(opts(&path, 1)).unwrap();
        let result = log.submit_soon_written(sample(2)).await;
        assert!(
            matches!(result, Err(AuditError::RotateTargetExists { .. })),
            "{result:?}"
        );
        assert!(log.failed());
        let again = log.submit_soon_written(sample(3)).await;
        assert!(
            matches!(again, Err(AuditError::Poisoned { .. })),
            "{again:?}"
        );
    }

    /// A record a caller waits for now syncs the soon records written before it as well.
    #[tokio::test]
    async fn a_record_waited_for_now_syncs_earlier_soon_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        let start = Instant::now();
        let soon = log.submit_soon(sample(1)).await.unwrap();
        log.record(sample(2)).await.unwrap();
        let syncs = log.syncs();
        let fast = start.elapsed() < SOON_SYNC;
        // answered before the record's own caller was
        let answered = tokio::time::timeout(Duration::ZERO, soon.wait()).await;
        assert!(matches!(answered, Ok(Ok(()))), "{answered:?}");
        if fast {
            assert_eq!(syncs, 1, "one fsync for both");
        }
        drop(log);
        assert_eq!(verify(&path).unwrap().records, 2);
    }

    #[tokio::test]
    async fn reopen_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3, DEFAULT_ROTATE_BYTES).await;
        let before = verify(&path).unwrap();
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        log.record(sample(4)).await.unwrap();
        drop(log);
        let lines = lines_of(&path);
        assert_eq!(lines.len(), 4);
        let fourth = json(&lines[3]);
        assert_eq!(fourth["seq"], 4);
        assert_eq!(fourth["prev"], serde_json::Value::from(before.last_hash));
        assert_eq!(verify(&path).unwrap().last_seq, 4);
    }

    #[tokio::test]
    async fn reopen_after_rotation_continues_from_newest_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 12, 1000).await;
        // Simulate a crash right after the rename: the current file is gone.
        let before = verify(&path).unwrap();
        if std::fs::read(&path).unwrap().is_empty() {
            std::fs::remove_file(&path).unwrap();
        } else {
            let paths = LogPaths::new(&path);
            let first = json(&lines_of(&path)[0])["seq"].as_u64().unwrap();
            std::fs::rename(&path, paths.rotated_name(first)).unwrap();
        }
        let log = AuditLog::open(opts(&path, 1000)).unwrap();
        log.record(sample(13)).await.unwrap();
        drop(log);
        let lines = lines_of(&path);
        assert_eq!(
            json(&lines[0])["prev"],
            serde_json::Value::from(before.last_hash)
        );
        let after = verify(&path).unwrap();
        assert_eq!((after.first_seq, after.last_seq), (1, 13));
    }

    #[tokio::test]
    async fn rotation_spreads_the_chain_over_several_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 30, 1000).await;
        let rotated = rotated_files(&path);
        assert!(rotated.len() >= 3, "only {} rotated files", rotated.len());
        let mut expected_first = 1;
        let mut prev_last_hash = GENESIS_PREV.to_string();
        for file in rotated.iter().chain(std::iter::once(&path)) {
            let size = std::fs::metadata(file).unwrap().len();
            assert!(size <= 1000, "{} has {size} bytes", file.display());
            let lines = lines_of(file);
            let first = json(&lines[0]);
            assert_eq!(first["seq"], expected_first);
            assert_eq!(
                first["prev"],
                serde_json::Value::from(prev_last_hash.clone())
            );
            if file != &path {
                let name = file.file_name().unwrap().to_str().unwrap();
                assert_eq!(name, format!("audit.{expected_first:020}.jsonl"));
            }
            expected_first += lines.len() as u64;
            prev_last_hash = json(lines.last().unwrap())["hash"]
                .as_str()
                .unwrap()
                .to_string();
        }
        let report = verify(&path).unwrap();
        assert_eq!(report.files, rotated.len() + 1);
        assert_eq!(
            (report.records, report.first_seq, report.last_seq),
            (30, 1, 30)
        );
        assert_eq!(report.last_hash, prev_last_hash);
    }

    #[tokio::test]
    async fn creates_private_directory_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/audit/audit.jsonl");
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        log.record(sample(1)).await.unwrap();
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        let file_mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(file_mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_second_writer_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        let second = AuditLog::open(AuditOptions::new(&path));
        assert!(
            matches!(second, Err(AuditError::Locked { .. })),
            "{second:?}"
        );
        drop(log);
        AuditLog::open(AuditOptions::new(&path)).unwrap();
    }

    #[tokio::test]
    async fn cut_short_last_line_refuses_open_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3, DEFAULT_ROTATE_BYTES).await;
        let mut text = std::fs::read(&path).unwrap();
        let whole = text.clone();
        text.extend_from_slice(&whole[..40]); // half a line, no newline: a crash mid-write
        std::fs::write(&path, &text).unwrap();

        let err = AuditLog::open(AuditOptions::new(&path)).unwrap_err();
        match &err {
            AuditError::Corrupt { file, line, source } => {
                assert_eq!(file, &path);
                assert_eq!(*line, 4);
                assert_eq!(source, &LineError::Unterminated);
            }
            other => panic!("unexpected {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()) && message.contains("line 4"));
        assert!(matches!(
            verify(&path),
            Err(crate::VerifyError::Truncated { line: 4, .. })
        ));
        // Nothing was appended to the damaged file.
        assert_eq!(std::fs::read(&path).unwrap(), text);
    }

    #[tokio::test]
    async fn garbage_last_line_refuses_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 2, DEFAULT_ROTATE_BYTES).await;
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"seq\":3}\n");
        std::fs::write(&path, &text).unwrap();
        let err = AuditLog::open(AuditOptions::new(&path)).unwrap_err();
        assert!(
            matches!(
                &err,
                AuditError::Corrupt {
                    line: 3,
                    source: LineError::NoHashSuffix,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn damaged_newest_rotated_file_refuses_open_when_current_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 12, 1000).await;
        let newest = rotated_files(&path).pop().unwrap();
        std::fs::write(&path, b"").unwrap();
        let mut text = std::fs::read(&newest).unwrap();
        text.truncate(text.len() - 10);
        std::fs::write(&newest, &text).unwrap();
        let err = AuditLog::open(opts(&path, 1000)).unwrap_err();
        assert!(
            matches!(&err, AuditError::Corrupt { file, source: LineError::Unterminated, .. } if file == &newest),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn failed_rotation_stops_the_writer_without_overwriting() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 1, 1000).await;
        // A file already holds the name the first rotation needs.
        let squatter = LogPaths::new(&path).rotated_name(1);
        std::fs::write(&squatter, b"keep me\n").unwrap();
        let log = AuditLog::open(opts(&path, 1000)).unwrap();
        let mut first_error = None;
        for i in 2..=20 {
            if let Err(e) = log.record(sample(i)).await {
                first_error = Some(e);
                break;
            }
        }
        assert!(
            matches!(&first_error, Some(AuditError::RotateTargetExists { path }) if path == &squatter),
            "{first_error:?}"
        );
        assert!(matches!(
            log.record(sample(99)).await,
            Err(AuditError::Poisoned { .. })
        ));
        assert!(log.failed());
        assert_eq!(std::fs::read(&squatter).unwrap(), b"keep me\n");
    }
}
