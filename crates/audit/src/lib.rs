//! Sealpost's append-only, hash-chained audit log (HIPAA 45 CFR 164.312(b) audit controls and
//! (c) integrity) and its verifier.
//!
//! # What is recorded
//! Every decision the relay takes: authentication failures, acceptance, each delivery attempt
//! with its TLS evidence, deliveries, deferrals, diversions to fallbacks, bounces, expiries,
//! drops, admin actions, configuration reloads, start and stop. Callers build a [`Record`] and
//! await [`AuditLog::record`], which returns only once the line is written **and fsync'd**;
//! concurrent callers share one fsync (group commit through a dedicated writer thread).
//!
//! PHI hygiene: [`Record`] has no field for a message's subject, body or attachment names, and
//! callers must not put them in `detail`. Addresses (recipient, user) are recorded because the
//! audit trail needs them; the audit directory is 0700 and its files 0600.
//!
//! # Line format
//! One JSON object per line, fields in this fixed order: `seq` (from 1), `ts` (RFC 3339 UTC,
//! milliseconds), `prev` (the previous record's `hash`; 64 zeros for the first record ever),
//! `event`, the optional fields that are set (`queue_id`, `user`, `client_ip`, `recipient`, `mx`,
//! `ip`, `tls`), `detail` if non-empty, for a record that came through the outbox (below) `at`
//! and `outbox`, and last `hash`. `hash` is the lowercase hex SHA-256 of
//! the exact bytes of the line with its final `,"hash":"<64 hex>"}` replaced by `}`, so checking
//! is byte-exact and needs no canonical re-serialisation.
//!
//! # The transactional outbox
//! A decision the queue records (a message accepted, a delivery's outcome) can carry its audit
//! record inside the same queue commit, as an outbox row ([`encode_row`]): the decision and its
//! evidence are then durable together, and the caller does not wait for a second fsync. The
//! queue numbers rows in commit order and hands them to [`OutboxWriter::append`] after each
//! commit; the writer appends them at once, behind every record handed over before, with
//! `"at"` (when the record was decided; `ts` is when its line was written) and `"outbox"` (the
//! row's seq). It syncs them with the next record a caller waits for, or at most 200 ms later,
//! and then publishes the highest seq on disk ([`AuditLog::outbox_durable`]); the queue drops
//! rows up to it. Rows left in the queue by a crash are appended at the next start by
//! [`AuditLog::replay_outbox`], which first looks for their lines near the end of the log so
//! none is written twice.
//!
//! # Rotation
//! When the current file (say `audit.jsonl`) would exceed `rotate_bytes`, it is fsync'd and
//! renamed to `audit.<first seq, 20 digits>.jsonl` in the same directory, the directory is
//! fsync'd, and a new current file starts. The chain continues across files: the new file's
//! first `prev` is the rotated file's last `hash`. [`verify`] finds rotated files by that name
//! pattern, orders them by seq, and checks them and then the current file as one chain.
//!
//! # What tampering is detected
//! [`verify`] recomputes every record's hash, checks that each `prev` equals the previous
//! record's hash, that `seq` increases by exactly one (also across files), that a rotated file's
//! name matches its first record, and that `ts` does not step back by more than a tolerance.
//! So it detects, naming the file and 1-based line: a changed byte anywhere in a record (in the
//! current or a rotated file), a deleted line, reordered lines, an inserted or forged line
//! (even one carrying a correctly recomputed hash of its own), a deleted or renamed rotated
//! file in the middle of the sequence, and a cut-short last line.
//!
//! # What is not detected from the files alone
//! - Truncation at the end: removing the newest records, or the whole newest file, leaves a
//!   valid shorter chain.
//! - Removal of the oldest rotated files: the chain then starts later (the report's
//!   `first_seq` is no longer 1, which is the only hint).
//! - A rewrite of the chain: the hash is not keyed, so someone with write access who rewrites
//!   a record *and recomputes every later hash* produces a valid chain.
//!
//! All three are countered outside the files: ship the log off-host as it is written (syslog,
//! WORM storage) and record the `last_seq` and `last_hash` that `sealpost audit verify` prints
//! somewhere the relay's host cannot change; a later verify must reach that seq with that hash.
//!
//! # A crash mid-write
//! A batch whose fsync did not complete was never acknowledged to any caller. If the crash cut
//! the last line short, [`AuditLog::open`] refuses to start and names the file and line, rather
//! than silently chaining onto damage (which would also make later verifies fail at that line).
//! The operator inspects the file, removes the partial last line, and starts again.
//! Outbox lines written but not yet synced can be lost or cut short the same way; their rows are
//! still in the queue (it drops a row only once its line is on disk), so after the partial line
//! is removed the next start appends them again.
//!
//! Only one writer may own a log: [`AuditLog::open`] takes an advisory lock on `<stem>.lock`.
//! [`verify`] only reads; run while the relay writes, it may see a line being appended and
//! report it as cut short; run it again.

mod error;
mod files;
mod line;
mod outbox;
mod record;
mod verify;
mod writer;

pub use error::AuditError;
pub use line::{check_line, LineError, Sealed, GENESIS_PREV};
pub use outbox::{encode_row, OutboxWriter};
pub use record::{Event, Json, Record};
pub use verify::{verify, verify_with, VerifyError, VerifyOptions, VerifyReport};
pub use writer::{AuditLog, AuditOptions, Durable, DEFAULT_ROTATE_BYTES, SOON_SYNC};
#[cfg(test)]
mod test_support;
