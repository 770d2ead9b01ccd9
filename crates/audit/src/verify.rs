//! The verifier behind `sealpost audit verify`: checks every record of every file as one chain.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, FixedOffset};

use crate::files::{LineReader, LogPaths};
use crate::line::{check_line, LineError, GENESIS_PREV};

/// Tunables of [`verify_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOptions {
    /// How far `ts` may step back from one record to the next (clock adjustments); `None`
    /// skips the check. Default: 5 minutes.
    pub max_clock_step_back: Option<Duration>,
}

impl Default for VerifyOptions {
    fn default() -> VerifyOptions {
        VerifyOptions {
            max_clock_step_back: Some(Duration::from_secs(300)),
        }
    }
}

/// The summary of a successful verification; keep `last_seq`/`last_hash` off-host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Files checked (rotated files plus the current one).
    pub files: usize,
    /// Records checked.
    pub records: u64,
    /// The first record's seq (1 unless old rotated files were removed; 0 when empty).
    pub first_seq: u64,
    /// The last record's seq (0 when empty).
    pub last_seq: u64,
    /// The last record's hash (64 zeros when empty).
    pub last_hash: String,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit log OK: {} records in {} files, seq {}..{}, last hash {}",
            self.records, self.files, self.first_seq, self.last_seq, self.last_hash
        )
    }
}

/// The first problem found; every variant names the file and the 1-based line.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Neither the current file nor any rotated file exists.
    #[error("{path}: line 0: no audit log found (no current file and no rotated files)")]
    NoLog {
        /// The configured current file.
        path: PathBuf,
    },
    /// A file or the directory could not be read.
    #[error("{file}: line {line}: cannot read: {source}")]
    Io {
        /// The file or directory.
        file: PathBuf,
        /// The line being read (0 before the first line).
        line: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// A line is not a well-formed audit record.
    #[error("{file}: line {line}: malformed record: {detail}")]
    Malformed {
        /// The file.
        file: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// What is wrong.
        detail: String,
    },
    /// The file ends in a line without its newline (a cut-short write).
    #[error("{file}: line {line}: truncated record (no terminating newline)")]
    Truncated {
        /// The file.
        file: PathBuf,
        /// The 1-based line number.
        line: u64,
    },
    /// A record's content does not match its hash (the line was edited).
    #[error("{file}: line {line}: record seq {seq} does not match its hash (edited)")]
    HashMismatch {
        /// The file.
        file: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// The seq written in the line.
        seq: u64,
    },
    /// A record's `prev` is not the previous record's hash (deleted, reordered or inserted).
    #[error(
        "{file}: line {line}: broken chain: prev is {found_prev}, expected {expected_prev} \
         (a record was deleted, reordered or inserted)"
    )]
    BrokenChain {
        /// The file.
        file: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// The previous record's hash.
        expected_prev: String,
        /// The `prev` found in the line.
        found_prev: String,
    },
    /// A record's `seq` is not the previous one plus one.
    #[error("{file}: line {line}: sequence gap: expected seq {expected}, found {found}")]
    SeqGap {
        /// The file.
        file: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// The seq that should follow.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// A record's `ts` is earlier than the previous record's by more than the tolerance.
    #[error("{file}: line {line}: timestamp {found} is before the previous record's {previous}")]
    ClockWentBack {
        /// The file.
        file: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// The previous record's `ts`.
        previous: String,
        /// This record's `ts`.
        found: String,
    },
    /// A rotated file's name does not carry the seq of its first record (renamed file).
    #[error(
        "{file}: line 1: file name says first seq {named_seq}, first record has seq {found_seq}"
    )]
    NameMismatch {
        /// The file.
        file: PathBuf,
        /// The seq in the file name.
        named_seq: u64,
        /// The seq of the first record.
        found_seq: u64,
    },
    /// A rotated file holds no records (rotation never produces one).
    #[error("{file}: line 1: rotated file is empty")]
    EmptyRotated {
        /// The file.
        file: PathBuf,
    },
}

/// Verifies the rotated files (oldest first) and then the current file at `path` as one chain.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify_with(path, &VerifyOptions::default())
}

/// Where the chain stands while verifying.
struct Cursor {
    prev_hash: Option<String>,
    last_seq: u64,
    last_ts: Option<DateTime<FixedOffset>>,
    first_seq: u64,
    records: u64,
}

/// [`verify`] with explicit options.
pub fn verify_with(path: &Path, opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let paths = LogPaths::new(path);
    let rotated = paths.rotated().map_err(|source| VerifyError::Io {
        file: paths.dir.clone(),
        line: 0,
        source,
    })?;
    let mut files: Vec<(PathBuf, Option<u64>)> = rotated
        .into_iter()
        .map(|(seq, file)| (file, Some(seq)))
        .collect();
    if paths.current.exists() {
        files.push((paths.current.clone(), None));
    }
    if files.is_empty() {
        return Err(VerifyError::NoLog {
            path: paths.current,
        });
    }
    let mut cursor = Cursor {
        prev_hash: None,
        last_seq: 0,
        last_ts: None,
        first_seq: 0,
        records: 0,
    };
    for (file, named_seq) in &files {
        verify_file(file, *named_seq, opts, &mut cursor)?;
    }
    Ok(VerifyReport {
        files: files.len(),
        records: cursor.records,
        first_seq: cursor.first_seq,
        last_seq: cursor.last_seq,
        last_hash: cursor.prev_hash.unwrap_or_else(|| GENESIS_PREV.to_string()),
    })
}

/// Checks one file's lines, continuing the chain in `cursor`.
fn verify_file(
    file: &Path,
    named_seq: Option<u64>,
    opts: &VerifyOptions,
    cursor: &mut Cursor,
) -> Result<(), VerifyError> {
    let io_err = |line: u64| {
        let file = file.to_path_buf();
        move |source| VerifyError::Io { file, line, source }
    };
    let mut reader = LineReader::new(File::open(file).map_err(io_err(0))?);
    let mut lines = 0u64;
    while let Some(line) = reader.next_line().map_err(io_err(lines + 1))? {
        lines = line.number;
        let at = |f: &dyn Fn(PathBuf, u64) -> VerifyError| f(file.to_path_buf(), line.number);
        if !line.terminated {
            return Err(at(&|file, line| VerifyError::Truncated { file, line }));
        }
        let sealed = match check_line(line.bytes) {
            Ok(sealed) => sealed,
            Err(LineError::HashMismatch { seq }) => {
                return Err(at(&|file, line| VerifyError::HashMismatch {
                    file,
                    line,
                    seq,
                }))
            }
            Err(e) => {
                return Err(at(&|file, line| VerifyError::Malformed {
                    file,
                    line,
                    detail: e.to_string(),
                }))
            }
        };
        if line.number == 1 {
            if let Some(named_seq) = named_seq {
                if named_seq != sealed.seq {
                    return Err(VerifyError::NameMismatch {
                        file: file.to_path_buf(),
                        named_seq,
                        found_seq: sealed.seq,
                    });
                }
            }
        }
        match &cursor.prev_hash {
            None => {
                if sealed.seq == 0 {
                    return Err(at(&|file, line| VerifyError::SeqGap {
                        file,
                        line,
                        expected: 1,
                        found: 0,
                    }));
                }
                // A log that starts at seq 1 must start from the genesis prev; a later start
                // (old rotated files removed) cannot be checked backwards.
                if sealed.seq == 1 && sealed.prev != GENESIS_PREV {
                    return Err(at(&|file, line| VerifyError::BrokenChain {
                        file,
                        line,
                        expected_prev: GENESIS_PREV.to_string(),
                        found_prev: sealed.prev.clone(),
                    }));
                }
                cursor.first_seq = sealed.seq;
            }
            Some(prev_hash) => {
                if &sealed.prev != prev_hash {
                    return Err(at(&|file, line| VerifyError::BrokenChain {
                        file,
                        line,
                        expected_prev: prev_hash.clone(),
                        found_prev: sealed.prev.clone(),
                    }));
                }
                let expected = cursor.last_seq.saturating_add(1);
                if sealed.seq != expected {
                    return Err(at(&|file, line| VerifyError::SeqGap {
                        file,
                        line,
                        expected,
                        found: sealed.seq,
                    }));
                }
            }
        }
        if let (Some(tolerance), Some(last_ts)) = (opts.max_clock_step_back, cursor.last_ts) {
            let back = last_ts.signed_duration_since(sealed.ts);
            if back.to_std().is_ok_and(|back| back > tolerance) {
                return Err(at(&|file, line| VerifyError::ClockWentBack {
                    file,
                    line,
                    previous: last_ts.to_rfc3339(),
                    found: sealed.ts.to_rfc3339(),
                }));
            }
        }
        cursor.prev_hash = Some(sealed.hash);
        cursor.last_seq = sealed.seq;
        cursor.last_ts = Some(sealed.ts);
        cursor.records += 1;
    }
    if named_seq.is_some() && lines == 0 {
        return Err(VerifyError::EmptyRotated {
            file: file.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::seal;
    use crate::test_support::{json, lines_of, rotated_files, write_lines, write_log};
    use crate::{Event, Record};

    /// A log of 30 records spread over at least three rotated files plus the current one.
    async fn rotated_log(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
        let path = write_log(dir, 30, 1000).await;
        let rotated = rotated_files(&path);
        assert!(rotated.len() >= 3);
        assert_eq!(verify(&path).unwrap().records, 30);
        (path, rotated)
    }

    fn assert_names(err: &VerifyError, file: &Path, line: u64) {
        let text = err.to_string();
        let expected = format!("{}: line {line}:", file.display());
        assert!(
            text.starts_with(&expected),
            "{text:?} should start with {expected:?}"
        );
    }

    #[tokio::test]
    async fn edited_byte_in_rotated_file_is_caught_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = rotated_log(dir.path()).await;
        let target = &rotated[1];
        let mut lines = lines_of(target);
        let seq = json(&lines[1])["seq"].as_u64().unwrap();
        let edited = lines[1].replacen("@example.org", "@examplf.org", 1);
        assert_ne!(edited, lines[1]);
        assert_eq!(edited.len(), lines[1].len(), "exactly one byte changed");
        lines[1] = edited;
        write_lines(target, &lines);

        let err = verify(&path).unwrap_err();
        match &err {
            VerifyError::HashMismatch { file, line, seq: s } => {
                assert_eq!((file, *line, *s), (target, 2, seq));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_names(&err, target, 2);
    }

    #[tokio::test]
    async fn deleted_line_is_caught_at_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = rotated_log(dir.path()).await;
        let target = &rotated[2];
        let mut lines = lines_of(target);
        assert!(lines.len() >= 3);
        lines.remove(1);
        write_lines(target, &lines);
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(&err, VerifyError::BrokenChain { file, line: 2, .. } if file == target),
            "{err:?}"
        );
        assert_names(&err, target, 2);
    }

    #[tokio::test]
    async fn deleted_line_in_current_file_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 5, 0).await;
        let mut lines = lines_of(&path);
        lines.remove(2);
        write_lines(&path, &lines);
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(&err, VerifyError::BrokenChain { file, line: 3, .. } if file == &path),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn swapped_adjacent_lines_are_caught_at_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = rotated_log(dir.path()).await;
        let target = &rotated[1];
        let mut lines = lines_of(target);
        lines.swap(1, 2);
        write_lines(target, &lines);
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(&err, VerifyError::BrokenChain { file, line: 2, .. } if file == target),
            "{err:?}"
        );
        assert_names(&err, target, 2);
    }

    #[tokio::test]
    async fn forged_line_with_own_valid_hash_but_wrong_prev_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = rotated_log(dir.path()).await;
        let target = &rotated[1];
        let mut lines = lines_of(target);
        let before = json(&lines[1]);
        let seq = before["seq"].as_u64().unwrap() + 1;
        let wrong_prev = "ab".repeat(32);
        let (forged, _) = seal(
            seq,
            before["ts"].as_str().unwrap(),
            &wrong_prev,
            &Record::new(Event::Delivered).recipient("forged@example.org"),
        )
        .unwrap();
        let forged = String::from_utf8(forged).unwrap().trim_end().to_string();
        // The forgery is self-consistent: its own hash checks out.
        assert_eq!(check_line(forged.as_bytes()).unwrap().seq, seq);
        lines.insert(2, forged);
        write_lines(target, &lines);

        let err = verify(&path).unwrap_err();
        match &err {
            VerifyError::BrokenChain {
                file,
                line,
                expected_prev,
                found_prev,
            } => {
                assert_eq!((file, *line), (target, 3));
                assert_eq!(found_prev, &wrong_prev);
                assert_eq!(expected_prev, before["hash"].as_str().unwrap());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_names(&err, target, 3);
    }

    #[tokio::test]
    async fn forged_line_with_right_prev_breaks_the_next_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 5, 0).await;
        let mut lines = lines_of(&path);
        let before = json(&lines[1]);
        let (forged, _) = seal(
            before["seq"].as_u64().unwrap() + 1,
            before["ts"].as_str().unwrap(),
            before["hash"].as_str().unwrap(),
            &Record::new(Event::Delivered).recipient("forged@example.org"),
        )
        .unwrap();
        lines.insert(2, String::from_utf8(forged).unwrap().trim_end().to_string());
        write_lines(&path, &lines);
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(&err, VerifyError::BrokenChain { line: 4, .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn removed_middle_rotated_file_is_caught_in_the_next_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = rotated_log(dir.path()).await;
        std::fs::remove_file(&rotated[1]).unwrap();
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(&err, VerifyError::BrokenChain { file, line: 1, .. } if file == &rotated[2]),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn renamed_rotated_file_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = rotated_log(dir.path()).await;
        let paths = LogPaths::new(&path);
        let first = json(&lines_of(&rotated[1])[0])["seq"].as_u64().unwrap();
        let renamed = paths.rotated_name(first + 1);
        std::fs::rename(&rotated[1], &renamed).unwrap();
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(&err, VerifyError::NameMismatch { file, named_seq, found_seq }
                if file == &renamed && *named_seq == first + 1 && *found_seq == first),
            "{err:?}"
        );
        assert_names(&err, &renamed, 1);
    }

    #[tokio::test]
    async fn removed_oldest_files_show_only_as_a_later_first_seq() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = rotated_log(dir.path()).await;
        let second_first = json(&lines_of(&rotated[1])[0])["seq"].as_u64().unwrap();
        std::fs::remove_file(&rotated[0]).unwrap();
        let report = verify(&path).unwrap();
        assert_eq!(report.first_seq, second_first);
        assert_eq!(report.last_seq, 30);
    }

    #[tokio::test]
    async fn empty_log_verifies_as_empty_and_missing_log_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        assert!(matches!(verify(&path), Err(VerifyError::NoLog { .. })));
        std::fs::write(&path, b"").unwrap();
        let report = verify(&path).unwrap();
        assert_eq!(
            report,
            VerifyReport {
                files: 1,
                records: 0,
                first_seq: 0,
                last_seq: 0,
                last_hash: GENESIS_PREV.to_string(),
            }
        );
    }

    /// Writes hand-sealed records with the given timestamps and prevs chained from `first_prev`.
    fn handmade(path: &Path, first_prev: &str, stamps: &[&str]) {
        let mut prev = first_prev.to_string();
        let mut lines = Vec::new();
        for (i, ts) in stamps.iter().enumerate() {
            let (line, hash) = seal(i as u64 + 1, ts, &prev, &Record::new(Event::Admin)).unwrap();
            lines.push(String::from_utf8(line).unwrap().trim_end().to_string());
            prev = hash;
        }
        write_lines(path, &lines);
    }

    #[test]
    fn clock_stepping_back_beyond_tolerance_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        handmade(
            &path,
            GENESIS_PREV,
            &[
                "2025-01-01T10:00:00.000Z",
                "2025-01-01T09:59:00.000Z", // one minute back: within tolerance
                "2025-01-01T09:50:00.000Z", // nine minutes back
            ],
        );
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(&err, VerifyError::ClockWentBack { line: 3, .. }),
            "{err:?}"
        );
        let lenient = VerifyOptions {
            max_clock_step_back: None,
        };
        assert_eq!(verify_with(&path, &lenient).unwrap().records, 3);
    }

    #[test]
    fn first_record_must_start_from_genesis() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        handmade(&path, &"1".repeat(64), &["2025-01-01T10:00:00.000Z"]);
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(&err, VerifyError::BrokenChain { line: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn malformed_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        handmade(
            &path,
            GENESIS_PREV,
            &["2025-01-01T10:00:00.000Z", "2025-01-01T10:00:01.000Z"],
        );
        let mut lines = lines_of(&path);
        lines.insert(1, "not json".to_string());
        write_lines(&path, &lines);
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Malformed { line: 2, .. }),
            "{err:?}"
        );
        assert_names(&err, &path, 2);
    }
}
