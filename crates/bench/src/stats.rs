//! Latency samples and their percentiles.

use serde::Serialize;

/// Percentiles of a set of latency samples, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

/// Nearest-rank percentile `p` (0..=100) of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    sorted.get(idx).copied().unwrap_or(0)
}

/// Summarises samples given in microseconds (sorts them in place).
pub fn summarize(samples_us: &mut [u64]) -> Summary {
    samples_us.sort_unstable();
    let ms = |us: u64| us as f64 / 1000.0;
    let sum: u128 = samples_us.iter().map(|&s| u128::from(s)).sum();
    Summary {
        count: samples_us.len(),
        p50_ms: ms(percentile(samples_us, 50.0)),
        p99_ms: ms(percentile(samples_us, 99.0)),
        max_ms: ms(samples_us.last().copied().unwrap_or(0)),
        mean_ms: if samples_us.is_empty() {
            0.0
        } else {
            sum as f64 / samples_us.len() as f64 / 1000.0
        },
    }
}

/// The acceptance latency of the replies that came within one window of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Window {
    /// Start of the window, milliseconds after the load started.
    pub from_ms: u64,
    /// Percentiles of the replies received in the window.
    pub latency: Summary,
}

/// Splits `(reply time, latency)` samples (microseconds, reply time since the load started)
/// into windows of `width_ms` and summarises each; windows without replies are left out.
pub fn timeline(samples: &[(u64, u64)], width_ms: u64) -> Vec<Window> {
    let width_us = width_ms.max(1).saturating_mul(1000);
    let mut by_window: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for &(at, latency) in samples {
        by_window.entry(at / width_us).or_default().push(latency);
    }
    by_window
        .into_iter()
        .map(|(index, mut lat)| Window {
            from_ms: index.saturating_mul(width_ms.max(1)),
            latency: summarize(&mut lat),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<u64> = (1..=100).rev().map(|i| i * 1000).collect();
        let s = summarize(&mut v);
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(s.mean_ms, 50.5);
        assert_eq!(summarize(&mut []), Summary::default());
        let mut one = [7000];
        assert_eq!(summarize(&mut one).p99_ms, 7.0);
    }

    #[test]
    fn timeline_groups_replies_by_when_they_came() {
        // replies at 10 ms, 240 ms, 260 ms and 900 ms; nothing between 500 and 750 ms
        let samples = [
            (10_000, 1000),
            (240_000, 3000),
            (260_000, 5000),
            (900_000, 2000),
        ];
        let t = timeline(&samples, 250);
        let got: Vec<(u64, usize, f64)> = t
            .iter()
            .map(|w| (w.from_ms, w.latency.count, w.latency.max_ms))
            .collect();
        assert_eq!(got, [(0, 2, 3.0), (250, 1, 5.0), (750, 1, 2.0)]);
        assert!(timeline(&[], 250).is_empty());
    }
}
