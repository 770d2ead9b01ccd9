//! Helpers shared by this crate's unit tests: building logs and editing their lines.

use std::path::{Path, PathBuf};

use crate::{AuditLog, AuditOptions, Event, Record};

/// A distinctive test record number `i`.
pub fn sample(i: u64) -> Record {
    Record::new(Event::Delivered)
        .queue_id(format!("q{i:04}"))
        .recipient(format!("r{i}@example.org"))
        .mx("mx.example.org")
        .ip("192.0.2.25".parse().unwrap())
        .detail("n", i)
}

/// Writes `n` sample records into a log at `dir/audit.jsonl` and closes it.
pub async fn write_log(dir: &Path, n: u64, rotate_bytes: u64) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(AuditOptions {
        path: path.clone(),
        rotate_bytes,
    })
    .unwrap();
    for i in 1..=n {
        log.record(sample(i)).await.unwrap();
    }
    drop(log);
    path
}

/// The lines of `file`, without newlines.
pub fn lines_of(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Replaces `file` with `lines`, each terminated by a newline.
pub fn write_lines(file: &Path, lines: &[String]) {
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(file, text).unwrap();
}

/// The rotated files of the log at `path`, oldest first.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    crate::files::LogPaths::new(path)
        .rotated()
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// The JSON object of one line.
pub fn json(line: &str) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_str(line).unwrap() {
        serde_json::Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}
