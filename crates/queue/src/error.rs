//! Queue errors.

use std::path::PathBuf;

use crate::id::QueueId;
use crate::keys::KeyError;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The store could not be read or written (the submission server replies `452 4.3.1`).
    #[error("queue storage error while {context}: {source}")]
    Storage {
        /// What the queue was doing.
        context: &'static str,
        /// The underlying database error.
        source: Box<redb::Error>,
    },
    /// A file next to the store could not be read or written.
    #[error("queue I/O error on {path} while {context}: {source}")]
    Io {
        /// What the queue was doing.
        context: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The filesystem holding the queue is full; nothing was stored.
    #[error("no space left for the queue; nothing was stored")]
    NoSpace,
    /// The store file is damaged and cannot be opened.
    #[error("queue store {path} is corrupt: {detail}")]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What the database reported.
        detail: String,
    },
    /// Another process holds the store open.
    #[error("queue store {path} is in use by another process")]
    Locked {
        /// The store file.
        path: PathBuf,
    },
    /// No message with this id is queued.
    #[error("no queued message {0}")]
    NotFound(QueueId),
    /// A record failed authentication; it was moved to quarantine and will never be delivered.
    #[error("queued message {id} failed authentication and was quarantined")]
    Integrity {
        /// The message.
        id: QueueId,
    },
    /// A record was sealed under a key that is not in the keyring.
    #[error("queued message {id} is encrypted under key {key_id}, which is not loaded")]
    UnknownKey {
        /// The message.
        id: QueueId,
        /// The key id named by the record (hex).
        key_id: String,
    },
    /// An authenticated record could not be decoded (written by an incompatible version).
    #[error("queued message {id} has an unreadable record: {detail}")]
    Decode {
        /// The message.
        id: QueueId,
        /// What the decoder reported.
        detail: String,
    },
    /// A key problem.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Encryption failed (random generator or key setup).
    #[error("encryption failed")]
    Encrypt,
    /// A message without recipients cannot be queued.
    #[error("a message needs at least one recipient")]
    NoRecipients,
    /// `complete` named a recipient index the message does not have.
    #[error("message {id} has no recipient {index}")]
    NoSuchRecipient {
        /// The message.
        id: QueueId,
        /// The index given.
        index: usize,
    },
    /// The options are unusable.
    #[error("invalid queue options: {0}")]
    Options(&'static str),
    /// The queue's background committer has stopped.
    #[error("the queue committer has stopped")]
    Closed,
    /// An audit record could not be turned into an outbox row.
    #[error("an audit record for the outbox could not be serialised: {0}")]
    OutboxRow(String),
    /// The audit log has not taken the outbox's rows for a while.
    #[error("{rows} audit records are waiting for the audit log; refusing new ones")]
    OutboxFull {
        /// Rows waiting.
        rows: u64,
    },
}

impl QueueError {
    /// Wraps a redb error, recognising a full disk.
    pub(crate) fn storage(context: &'static str, err: impl Into<redb::Error>) -> QueueError {
        let err: redb::Error = err.into();
        if let redb::Error::Io(io) = &err {
            if is_no_space(io) {
                return QueueError::NoSpace;
            }
        }
        QueueError::Storage {
            context,
            source: Box::new(err),
        }
    }

    /// Wraps an I/O error on a path, recognising a full disk.
    pub(crate) fn io(context: &'static str, path: PathBuf, source: std::io::Error) -> QueueError {
        if is_no_space(&source) {
            return QueueError::NoSpace;
        }
        QueueError::Io {
            context,
            path,
            source,
        }
    }

    /// Whether the store handle must be reopened after this error.
    pub(crate) fn poisons_store(&self) -> bool {
        match self {
            QueueError::NoSpace => true,
            QueueError::Storage { source, .. } => {
                matches!(**source, redb::Error::Io(_) | redb::Error::PreviousIo)
            }
            _ => false,
        }
    }
}

/// ENOSPC or EDQUOT.
fn is_no_space(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::StorageFull
        || err.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(err.raw_os_error(), Some(28) | Some(122))
}
