//! What can go wrong while opening or writing the audit log.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::line::LineError;

/// An error opening or appending to the audit log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The log directory could not be created.
    #[error("cannot create audit directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: Arc<io::Error>,
    },
    /// A log file (or the lock file) could not be opened or created.
    #[error("cannot open audit file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: Arc<io::Error>,
    },
    /// A log file or the log directory could not be read.
    #[error("cannot read audit log {path}: {source}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: Arc<io::Error>,
    },
    /// Another writer (this or another process) holds the log's lock file.
    #[error("audit log {path} is already open for writing by another process or handle")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The tail (or first line) of an existing file is not a valid record, so the chain cannot
    /// be continued safely.
    #[error(
        "{file}: line {line}: {source}; refusing to continue the audit chain \
         (inspect the file, run `sealpost audit verify`, and remove a cut-short last line by hand)"
    )]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// What is wrong with the line.
        source: LineError,
    },
    /// A record could not be serialised (nothing was written for it).
    #[error("cannot serialise audit record: {0}")]
    Serialize(#[source] Arc<serde_json::Error>),
    /// Writing to the current file failed; the writer stopped.
    #[error("cannot write audit file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error (shared by every record of the failed batch).
        source: Arc<io::Error>,
    },
    /// Flushing the current file or the directory to disk failed; the writer stopped.
    #[error("cannot fsync audit log {path}: {source}")]
    Sync {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error (shared by every record of the failed batch).
        source: Arc<io::Error>,
    },
    /// Renaming the current file for rotation, or creating its successor, failed; the writer
    /// stopped.
    #[error("cannot rotate audit file {from} to {to}: {source}")]
    Rotate {
        /// The current file.
        from: PathBuf,
        /// The rotated name (or the new current file when creating it failed).
        to: PathBuf,
        /// The underlying error (shared by every record of the failed batch).
        source: Arc<io::Error>,
    },
    /// The name a rotation needs already exists; nothing is overwritten and the writer stopped.
    #[error("cannot rotate audit file: {path} already exists")]
    RotateTargetExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The writer stopped after an earlier write, fsync or rotation failure; restart required.
    #[error("audit log {path} stopped after an earlier write failure; restart to recover")]
    Poisoned {
        /// The current file.
        path: PathBuf,
    },
    /// The sequence number space (u64) is exhausted.
    #[error("audit sequence number exhausted")]
    SeqExhausted,
    /// The writer thread could not be started.
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(#[source] Arc<io::Error>),
    /// The writer thread is gone (it panicked or the log is shutting down).
    #[error("the audit writer is no longer running")]
    Closed,
}
