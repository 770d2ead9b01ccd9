//! Where the log's files live: the current file, rotated files and their names, line reading.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Number of digits of the first seq in a rotated file's name.
const SEQ_DIGITS: usize = 20;
/// Extension of rotated files.
const ROTATED_EXT: &[u8] = b".jsonl";

/// The file names of one audit log: `<dir>/<stem>.<ext>` and `<dir>/<stem>.<20-digit seq>.jsonl`.
#[derive(Debug, Clone)]
pub(crate) struct LogPaths {
    /// The directory holding all files of the log.
    pub dir: PathBuf,
    /// The current file (the configured path).
    pub current: PathBuf,
    /// The current file's name without its extension.
    stem: Vec<u8>,
}

impl LogPaths {
    /// The names derived from the configured path of the current file.
    pub fn new(path: &Path) -> LogPaths {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let stem = path
            .file_stem()
            .map(|s| s.as_bytes().to_vec())
            .unwrap_or_default();
        LogPaths {
            dir,
            current: path.to_path_buf(),
            stem,
        }
    }

    /// The name a current file whose first record is `first_seq` gets when rotated.
    pub fn rotated_name(&self, first_seq: u64) -> PathBuf {
        let mut name = self.stem.clone();
        name.extend_from_slice(format!(".{first_seq:0SEQ_DIGITS$}").as_bytes());
        name.extend_from_slice(ROTATED_EXT);
        self.dir.join(OsString::from_vec(name))
    }

    /// The advisory lock file that keeps a second writer away.
    pub fn lock_file(&self) -> PathBuf {
        let mut name = self.stem.clone();
        name.extend_from_slice(b".lock");
        self.dir.join(OsString::from_vec(name))
    }

    /// The first seq encoded in `file_name` if it names a rotated file of this log.
    fn rotated_seq(&self, file_name: &[u8]) -> Option<u64> {
        let rest = file_name.strip_prefix(self.stem.as_slice())?;
        let rest = rest.strip_prefix(b".")?;
        let digits = rest.strip_suffix(ROTATED_EXT)?;
        if digits.len() != SEQ_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    }

    /// The rotated files of this log, oldest (lowest first seq) first.
    pub fn rotated(&self) -> io::Result<Vec<(u64, PathBuf)>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry?;
            if let Some(seq) = self.rotated_seq(entry.file_name().as_bytes()) {
                found.push((seq, entry.path()));
            }
        }
        found.sort_by_key(|(seq, _)| *seq);
        Ok(found)
    }
}

/// Flushes a directory's entries (new, renamed files) to disk.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One line read from a log file.
pub(crate) struct Line<'a> {
    /// 1-based line number.
    pub number: u64,
    /// The bytes without the terminating newline.
    pub bytes: &'a [u8],
    /// Whether a newline terminated the line (false only for a cut-short last line).
    pub terminated: bool,
}

/// Reads a log file line by line, reusing one buffer.
pub(crate) struct LineReader<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
    number: u64,
}

impl<R: Read> LineReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> LineReader<R> {
        LineReader {
            reader: BufReader::with_capacity(64 * 1024, inner),
            buf: Vec::new(),
            number: 0,
        }
    }

    /// The next line, or `None` at the end of the file.
    pub fn next_line(&mut self) -> io::Result<Option<Line<'_>>> {
        self.buf.clear();
        let n = self.reader.read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(None);
        }
        self.number += 1;
        let terminated = self.buf.last() == Some(&b'\n');
        let end = if terminated {
            self.buf.len() - 1
        } else {
            self.buf.len()
        };
        Ok(Some(Line {
            number: self.number,
            bytes: self.buf.get(..end).unwrap_or_default(),
            terminated,
        }))
    }
}

/// The first and last lines of a file, with their numbers and whether the last was terminated.
#[derive(Debug, Default)]
pub(crate) struct Ends {
    /// Line 1, if the file is not empty.
    pub first: Option<Vec<u8>>,
    /// The last line: its number, bytes and whether it ended with a newline.
    pub last: Option<(u64, Vec<u8>, bool)>,
}

/// Reads the first and last lines of `path`.
pub(crate) fn read_ends(path: &Path) -> io::Result<Ends> {
    let mut reader = LineReader::new(File::open(path)?);
    let mut ends = Ends::default();
    while let Some(line) = reader.next_line()? {
        if line.number == 1 {
            ends.first = Some(line.bytes.to_vec());
        }
        match &mut ends.last {
            Some((number, bytes, terminated)) => {
                *number = line.number;
                bytes.clear();
                bytes.extend_from_slice(line.bytes);
                *terminated = line.terminated;
            }
            None => ends.last = Some((line.number, line.bytes.to_vec(), line.terminated)),
        }
    }
    Ok(ends)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_round_trip_and_sort() {
        let dir = tempfile::tempdir().unwrap();
        let paths = LogPaths::new(&dir.path().join("audit.jsonl"));
        let a = paths.rotated_name(1);
        assert_eq!(
            a.file_name().unwrap().to_str().unwrap(),
            "audit.00000000000000000001.jsonl"
        );
        for seq in [1_000u64, 1, 20, u64::MAX] {
            std::fs::write(paths.rotated_name(seq), b"").unwrap();
        }
        // Names that must not be taken for rotated files.
        for other in [
            "audit.jsonl",
            "audit.lock",
            "audit.123.jsonl",
            "other.00000000000000000005.jsonl",
            "audit.0000000000000000000x.jsonl",
        ] {
            std::fs::write(dir.path().join(other), b"").unwrap();
        }
        let seqs: Vec<u64> = paths
            .rotated()
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(seqs, vec![1, 20, 1_000, u64::MAX]);
    }

    #[test]
    fn relative_path_without_dir_uses_cwd() {
        let paths = LogPaths::new(Path::new("audit.jsonl"));
        assert_eq!(paths.dir, PathBuf::from("."));
    }

    #[test]
    fn read_ends_reports_unterminated_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"one\ntwo\nthr").unwrap();
        let ends = read_ends(&path).unwrap();
        assert_eq!(ends.first.as_deref(), Some(&b"one"[..]));
        assert_eq!(ends.last, Some((3, b"thr".to_vec(), false)));
        std::fs::write(&path, b"").unwrap();
        let ends = read_ends(&path).unwrap();
        assert!(ends.first.is_none() && ends.last.is_none());
    }
}
