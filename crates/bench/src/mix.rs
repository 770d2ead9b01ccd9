//! Message sizes and contents: the size distribution and the generated messages.

use crate::error::BenchError;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A size distribution such as 70% 5 KB, 25% 50 KB, 5% 1 MB, applied deterministically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeMix {
    /// (percent, body bytes); percents add up to 100.
    buckets: Vec<(u32, usize)>,
}

/// The default mix: 70% 5 KB, 25% 50 KB, 5% 1 MB.
pub const DEFAULT_MIX: &str = "70:5KB,25:50KB,5:1MB";

fn parse_size(text: &str) -> Option<usize> {
    let t = text.trim().to_ascii_uppercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("MB") {
        (n, 1024 * 1024)
    } else if let Some(n) = t.strip_suffix("KB") {
        (n, 1024)
    } else if let Some(n) = t.strip_suffix('B') {
        (n, 1)
    } else {
        (t.as_str(), 1)
    };
    num.trim().parse::<usize>().ok()?.checked_mul(mult)
}

impl SizeMix {
    /// Parses `PERCENT:SIZE,...` (sizes like `5KB`, `1MB`, `300B`); percents must add up to 100.
    pub fn parse(text: &str) -> Result<SizeMix, BenchError> {
        let err = |detail: &str| BenchError::Mix {
            text: text.to_string(),
            detail: detail.to_string(),
        };
        let mut buckets = Vec::new();
        for part in text.split(',') {
            let (pct, size) = part
                .split_once(':')
                .ok_or_else(|| err("each entry is PERCENT:SIZE, e.g. 70:5KB"))?;
            let pct: u32 = pct
                .trim()
                .parse()
                .map_err(|_| err("percent is not a whole number"))?;
            let size = parse_size(size).ok_or_else(|| err("size is not like 5KB, 1MB or 300B"))?;
            if size == 0 {
                return Err(err("a size must be larger than zero"));
            }
            if pct > 0 {
                buckets.push((pct, size));
            }
        }
        if buckets.iter().map(|b| b.0).sum::<u32>() != 100 {
            return Err(err("percents must add up to 100"));
        }
        Ok(SizeMix { buckets })
    }

    /// The body size of message number `i`: every 100 consecutive messages follow the percents
    /// exactly, with the sizes spread out (slot = i·37 mod 100).
    pub fn size_of(&self, i: u64) -> usize {
        let slot = u32::try_from(i.wrapping_mul(37) % 100).unwrap_or(0);
        let mut acc = 0;
        for &(pct, size) in &self.buckets {
            acc += pct;
            if slot < acc {
                return size;
            }
        }
        self.buckets.last().map_or(1024, |b| b.1)
    }

    /// The distinct sizes.
    pub fn sizes(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.buckets.iter().map(|b| b.1).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Mean body size in bytes.
    pub fn mean(&self) -> f64 {
        self.buckets
            .iter()
            .map(|&(p, s)| f64::from(p) * s as f64 / 100.0)
            .sum()
    }

    /// The mix written back as text.
    pub fn describe(&self) -> String {
        self.buckets
            .iter()
            .map(|&(p, s)| format!("{p}% {}", human_size(s)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `5 KB`, `1 MB`, `300 B`.
pub fn human_size(bytes: usize) -> String {
    if bytes >= 1024 * 1024 && bytes.is_multiple_of(1024 * 1024) {
        format!("{} MB", bytes / (1024 * 1024))
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

/// A body of exactly `size` bytes: 78-character text lines with CRLF, never starting with a dot.
pub fn body(size: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(size);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ size as u64;
    while out.len() < size {
        let left = size - out.len();
        if left <= 2 {
            out.extend_from_slice(&b"\r\n"[..left]);
            if left == 1 {
                // A lone CR would be a bare CR: replace with a text byte.
                if let Some(last) = out.last_mut() {
                    *last = b'x';
                }
            }
            break;
        }
        let len = (left - 2).min(78);
        for _ in 0..len {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let idx = usize::try_from(state >> 58).unwrap_or(0) % ALPHABET.len();
            out.push(ALPHABET.get(idx).copied().unwrap_or(b'x'));
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Pre-built bodies for every size of a mix.
#[derive(Debug, Clone)]
pub struct Bodies {
    by_size: BTreeMap<usize, Arc<Vec<u8>>>,
}

impl Bodies {
    /// Builds one body per distinct size of `mix`.
    pub fn for_mix(mix: &SizeMix) -> Bodies {
        Bodies {
            by_size: mix
                .sizes()
                .into_iter()
                .map(|s| (s, Arc::new(body(s))))
                .collect(),
        }
    }

    /// The body of `size` bytes (built on demand if the mix did not have it).
    pub fn get(&self, size: usize) -> Arc<Vec<u8>> {
        self.by_size
            .get(&size)
            .cloned()
            .unwrap_or_else(|| Arc::new(body(size)))
    }
}

/// Header naming the benchmark run a message belongs to.
pub const RUN_HEADER: &str = "X-Bench-Run";
/// Header with the send time in Unix nanoseconds.
pub const SENT_HEADER: &str = "X-Bench-Sent";

/// One complete message (CRLF line endings) with the benchmark headers.
pub fn message(
    run: &str,
    seq: u64,
    from: &str,
    to: &str,
    sent_unix_ns: u128,
    body: &[u8],
) -> Vec<u8> {
    let mut m = Vec::new();
    message_into(&mut m, run, seq, from, to, sent_unix_ns, body);
    m
}

/// [`message`] written into `out` (cleared first), so a sender can reuse one buffer.
pub fn message_into(
    out: &mut Vec<u8>,
    run: &str,
    seq: u64,
    from: &str,
    to: &str,
    sent_unix_ns: u128,
    body: &[u8],
) {
    use std::io::Write as _;
    out.clear();
    // writing into a Vec cannot fail
    let _ = write!(
        out,
        "From: Bench <{from}>\r\nTo: <{to}>\r\nSubject: bench message {seq}\r\n\
         Message-ID: <bench-{run}-{seq}@bench.invalid>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n{RUN_HEADER}: {run}\r\n\
         {SENT_HEADER}: {sent_unix_ns}\r\n\r\n"
    );
    out.extend_from_slice(body);
}

/// Finds the benchmark headers in a message's header section: (run, sent ns).
pub fn bench_headers(message: &[u8]) -> (Option<String>, Option<u128>) {
    let mut run = None;
    let mut sent = None;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let value = String::from_utf8_lossy(value.get(1..).unwrap_or_default());
        if name.eq_ignore_ascii_case(RUN_HEADER.as_bytes()) {
            run = Some(value.trim().to_string());
        } else if name.eq_ignore_ascii_case(SENT_HEADER.as_bytes()) {
            sent = value.trim().parse().ok();
        }
    }
    (run, sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mix_is_exact_per_hundred_messages() {
        let mix = SizeMix::parse(DEFAULT_MIX).unwrap();
        let mut counts = BTreeMap::new();
        for i in 0..1000 {
            *counts.entry(mix.size_of(i)).or_insert(0) += 1;
        }
        assert_eq!(counts.get(&(5 * 1024)), Some(&700));
        assert_eq!(counts.get(&(50 * 1024)), Some(&250));
        assert_eq!(counts.get(&(1024 * 1024)), Some(&50));
        assert_eq!(mix.describe(), "70% 5 KB, 25% 50 KB, 5% 1 MB");
    }

    #[test]
    fn bad_mixes_are_refused() {
        for bad in [
            "70:5KB,25:50KB",
            "x:5KB,100:1KB",
            "100:5XB",
            "100:0KB",
            "100",
        ] {
            assert!(SizeMix::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(SizeMix::parse("100:300B").unwrap().size_of(7), 300);
    }

    #[test]
    fn bodies_have_exact_size_and_only_crlf() {
        for size in [1, 2, 3, 80, 81, 5 * 1024, 50 * 1024] {
            let b = body(size);
            assert_eq!(b.len(), size);
            for (i, &c) in b.iter().enumerate() {
                if c == b'\n' {
                    assert_eq!(b[i - 1], b'\r');
                }
                if c == b'\r' {
                    assert_eq!(b.get(i + 1), Some(&b'\n'));
                }
            }
            assert!(!b.split(|&c| c == b'\n').any(|l| l.first() == Some(&b'.')));
        }
    }

    #[test]
    fn headers_round_trip() {
        let m = message(
            "run-1",
            5,
            "a@x.test",
            "b@y.test",
            1234567890123,
            &body(100),
        );
        assert_eq!(
            bench_headers(&m),
            (Some("run-1".into()), Some(1234567890123))
        );
        // Headers after the blank line are body, not headers.
        let m = b"Subject: x\r\n\r\nX-Bench-Run: no\r\n";
        assert_eq!(bench_headers(m), (None, None));
    }
}
