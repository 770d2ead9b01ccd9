//! The transactional outbox's rows: a record decided inside the queue's commit, as bytes the
//! queue stores next to the message, until the log has the record's line on disk.
//!
//! A row is `{"at":"<RFC 3339 decision time>","rec":{<the record's fields>}}`. The queue treats
//! it as opaque bytes and gives each row a seq in commit order; the writer appends the record
//! with `at` and that seq as `outbox` (see the crate docs).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Arc, Weak};

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::error::AuditError;
use crate::files::{LineReader, LogPaths};
use crate::line::outbox_of;
use crate::record::{Event, Record};
use crate::writer::{Inner, Job};

/// The stored form of a row.
#[derive(Serialize, Deserialize)]
struct Row<R> {
    at: String,
    rec: R,
}

/// The bytes of an outbox row for `rec`, decided now.
pub fn encode_row(rec: &Record) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Row {
        at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        rec,
    })
}

/// The decision time and the record of an outbox row.
pub(crate) fn decode_row(bytes: &[u8]) -> Result<(String, Record), serde_json::Error> {
    let row: Row<Record> = serde_json::from_slice(bytes)?;
    Ok((row.at, row.rec))
}

/// The row's record, or, for a row that cannot be read (a bug, never expected), an `admin`
/// record that keeps its bytes verbatim: a committed row is never dropped.
pub(crate) fn decode_or_verbatim(seq: u64, bytes: &[u8]) -> (u64, String, Record) {
    match decode_row(bytes) {
        Ok((at, rec)) => (seq, at, rec),
        Err(e) => {
            tracing::error!(outbox = seq, error = %e, "an outbox row is unreadable; recording its bytes");
            let rec = Record::new(Event::Admin)
                .detail("outbox_row", String::from_utf8_lossy(bytes).into_owned())
                .detail("error", e.to_string());
            let at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
            (seq, at, rec)
        }
    }
}

/// The outbox seqs from `first` on whose lines are in the log: searches the current file, and
/// the newest rotated file too when the current file has no outbox line older than `first`.
///
/// Rows still in the queue at a start were written at most a lazy-sync interval and a queue
/// commit before the stop, so their lines, if any, are near the end of the log.
pub(crate) fn present_in(paths: &LogPaths, first: u64) -> Result<HashSet<u64>, AuditError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| AuditError::Read {
            path,
            source: Arc::new(source),
        }
    };
    let mut present = HashSet::new();
    let rotated = paths.rotated().map_err(read_err(&paths.dir))?;
    let newest_rotated = rotated.last().map(|(_, path)| path.as_path());
    for path in std::iter::once(paths.current.as_path()).chain(newest_rotated) {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(read_err(path)(e)),
        };
        let mut reader = LineReader::new(file);
        let mut older = false;
        while let Some(line) = reader.next_line().map_err(read_err(path))? {
            match outbox_of(line.bytes) {
                Some(seq) if seq >= first => {
                    present.insert(seq);
                }
                Some(_) => older = true,
                None => {}
            }
        }
        if older {
            break;
        }
    }
    Ok(present)
}

/// Hands the rows the queue committed to the log's writer; it does not keep the log open.
#[derive(Clone)]
pub struct OutboxWriter {
    inner: Weak<Inner>,
}

impl std::fmt::Debug for OutboxWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxWriter").finish_non_exhaustive()
    }
}

impl OutboxWriter {
    pub(crate) fn new(inner: Weak<Inner>) -> OutboxWriter {
        OutboxWriter { inner }
    }

    /// Queues `rows` (seq, row bytes; in seq order, right after their commit) for the log,
    /// behind every record handed over before. Blocks while the writer's queue is full, so call
    /// it from a plain thread, not an async task. Rows the log never gets (it is closed or has
    /// failed) stay in the queue's outbox and are replayed at the next start.
    pub fn append(&self, rows: Vec<(u64, Vec<u8>)>) {
        if rows.is_empty() {
            return;
        }
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        if let Some(tx) = &inner.tx {
            if tx.blocking_send(Job::Outbox(rows)).is_err() {
                tracing::warn!("audit writer gone; committed outbox rows wait for the next start");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::record::Json;
    use crate::test_support::{json, lines_of, rotated_files, sample};
    use crate::{verify, AuditLog, AuditOptions};

    /// Outbox rows for `seqs`, each an `accepted` record of queue id `q<seq>`.
    fn rows(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, Vec<u8>)> {
        seqs.into_iter()
            .map(|seq| {
                let rec = Record::new(Event::Accepted).queue_id(format!("q{seq}"));
                (seq, encode_row(&rec).unwrap())
            })
            .collect()
    }

    /// Hands `rows` to the writer from a plain thread, as the queue's committer does.
    fn append(log: &AuditLog, rows: Vec<(u64, Vec<u8>)>) {
        let writer = log.outbox_writer();
        std::thread::spawn(move || writer.append(rows))
            .join()
            .unwrap();
    }

    /// Waits until the log reports outbox seq `seq` durable.
    async fn durable(log: &AuditLog, seq: u64) {
        let mut rx = log.outbox_durable();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| *s >= seq))
            .await
            .expect("outbox seq not reported durable within 5 s")
            .unwrap();
    }

    /// The outbox seqs of the lines in the current file, in file order.
    fn logged_outbox(path: &Path) -> Vec<u64> {
        lines_of(path)
            .iter()
            .filter_map(|l| json(l).get("outbox").and_then(serde_json::Value::as_u64))
            .collect()
    }

    #[tokio::test]
    async fn outbox_lines_follow_earlier_records_and_are_synced_lazily() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        log.record(Record::new(Event::Started)).await.unwrap();
        let before = log.syncs();
        append(&log, rows(1..=3));
        append(&log, rows(4..=4));
        // written at once, in order, behind the record before them ...
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while logged_outbox(&path).len() < 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "outbox lines not written"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(logged_outbox(&path), vec![1, 2, 3, 4]);
        // ... but not synced on their own account: nobody waits for them
        assert_eq!(log.syncs(), before, "outbox lines were synced at once");
        assert_eq!(*log.outbox_durable().borrow(), 0);
        durable(&log, 4).await;
        assert_eq!(log.syncs(), before + 1, "one lazy sync for both batches");
        // a record a caller waits for makes the lines before it durable with it
        append(&log, rows(5..=5));
        log.record(sample(1)).await.unwrap();
        assert_eq!(*log.outbox_durable().borrow(), 5);
        drop(log);

        let lines = lines_of(&path);
        let first = json(&lines[1]);
        assert_eq!(first["event"], "accepted");
        assert_eq!(first["queue_id"], "q1");
        assert_eq!(first["outbox"], 1);
        let at = first["at"].as_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{at}");
        assert_eq!(json(&lines[6])["event"], "delivered");
        assert_eq!(verify(&path).unwrap().records, 7);
    }

    #[tokio::test]
    async fn replay_appends_only_the_rows_the_log_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        append(&log, rows(1..=3));
        durable(&log, 3).await;
        drop(log);
        // The queue still held rows 2..=5 at the crash: 2 and 3 reached the log, 4 and 5 not.
        let log = AuditLog::open(AuditOptions::new(&path)).unwrap();
        assert_eq!(log.replay_outbox(rows(2..=5)).await.unwrap(), Some(5));
        assert_eq!(*log.outbox_durable().borrow(), 5);
        // the same rows again (a crash before the queue dropped them) add nothing
        assert_eq!(log.replay_outbox(rows(2..=5)).await.unwrap(), Some(5));
        assert_eq!(log.replay_outbox(Vec::new()).await.unwrap(), None);
        log.record(Record::new(Event::Started)).await.unwrap();
        drop(log);
        assert_eq!(logged_outbox(&path), vec![1, 2, 3, 4, 5]);
        let report = verify(&path).unwrap();
        assert_eq!((report.records, report.last_seq), (6, 6));
        let lines = lines_of(&path);
        assert_eq!(json(&lines[3])["queue_id"], "q4");
        assert_eq!(json(&lines[5])["event"], "started");
    }

    #[tokio::test]
    async fn replay_finds_lines_in_the_newest_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let opts = AuditOptions {
            path: path.clone(),
            rotate_bytes: 400,
        };
        let log = AuditLog::open(opts.clone()).unwrap();
        append(&log, rows(1..=2));
        durable(&log, 2).await;
        // enough plain records to rotate the outbox lines out of the current file
        for i in 0..3 {
            log.record(sample(i)).await.unwrap();
        }
        drop(log);
        assert!(!rotated_files(&path).is_empty());
        assert!(logged_outbox(&path).is_empty());
        let log = AuditLog::open(opts).unwrap();
        assert_eq!(log.replay_outbox(rows(2..=3)).await.unwrap(), Some(3));
        drop(log);
        assert_eq!(
            logged_outbox(&path),
            vec![3],
            "row 2 was in the rotated file already"
        );
        assert!(verify(&path).is_ok());
    }

    #[tokio::test]
    async fn a_failed_log_takes_no_rows_and_reports_none_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::test_support::write_log(dir.path(), 1, 0).await;
        // a file already holds the name the first rotation needs
        std::fs::write(dir.path().join("audit.00000000000000000001.jsonl"), b"x\n").unwrap();
        let log = AuditLog::open(AuditOptions {
            path: path.clone(),
            rotate_bytes: 300,
        })
        .unwrap();
        // the first rotation finds its name taken and stops the writer
        let mut i = 0;
        while log.record(sample(i)).await.is_ok() {
            i += 1;
        }
        assert!(log.failed());
        append(&log, rows(1..=2));
        assert!(log.replay_outbox(rows(1..=2)).await.is_err());
        assert!(
            log.record(sample(99)).await.is_err(),
            "the rows went ahead of this"
        );
        assert_eq!(*log.outbox_durable().borrow(), 0);
        drop(log);
        assert!(logged_outbox(&path).is_empty());
    }

    #[test]
    fn outbox_seq_is_read_from_the_end_of_the_line() {
        let rec = Record::new(Event::Accepted).detail("outbox", 7);
        let origin = crate::line::Origin {
            seq: 42,
            at: "2026-01-02T03:04:05.678Z",
        };
        let mut line = Vec::new();
        crate::line::seal_into(
            &mut line,
            1,
            origin.at,
            crate::GENESIS_PREV,
            &rec,
            Some(origin),
        )
        .unwrap();
        line.pop();
        assert_eq!(outbox_of(&line), Some(42));
        assert!(crate::check_line(&line).is_ok());
        // a `detail` key of that name is not the field
        let (plain, _) = crate::line::seal(1, origin.at, crate::GENESIS_PREV, &rec).unwrap();
        assert_eq!(outbox_of(plain.strip_suffix(b"\n").unwrap()), None);
        assert_eq!(outbox_of(b""), None);
        assert_eq!(outbox_of(b"short"), None);
    }

    #[test]
    fn rows_round_trip_every_field() {
        let rec = Record::new(Event::Attempt)
            .queue_id("q1")
            .user("app")
            .client_ip("192.0.2.1".parse().unwrap())
            .recipient("r@example.org")
            .mx("mx.example.org")
            .ip("2001:db8::1".parse().unwrap())
            .tls(Json::of(
                &serde_json::json!({"version": "TLSv1_3", "n": [1, 2]}),
            ))
            .detail("size", 10)
            .detail("reason", "4.4.1 no answer");
        let bytes = encode_row(&rec).unwrap();
        let (at, back) = decode_row(&bytes).unwrap();
        assert_eq!(back, rec);
        assert!(chrono::DateTime::parse_from_rfc3339(&at).is_ok(), "{at}");
        // a bare record has no optional fields in its row
        let bare = encode_row(&Record::new(Event::Accepted)).unwrap();
        let text = String::from_utf8(bare).unwrap();
        assert!(text.ends_with(r#","rec":{"event":"accepted"}}"#), "{text}");
        assert_eq!(
            decode_row(text.as_bytes()).unwrap().1,
            Record::new(Event::Accepted)
        );
    }

    #[test]
    fn damaged_rows_are_refused() {
        assert!(decode_row(b"").is_err());
        assert!(decode_row(br#"{"rec":{"event":"accepted"}}"#).is_err());
        assert!(decode_row(br#"{"at":"x","rec":{"event":"nonsense"}}"#).is_err());
    }
}
