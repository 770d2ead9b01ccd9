//! CPU time and memory of processes, read from `/proc`.

use crate::error::BenchError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`, 100 if unknown).
pub fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// The fields of `/proc/PID/stat` the benchmark uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Parent process id.
    pub ppid: u32,
    /// User time, ticks.
    pub utime: u64,
    /// System time, ticks.
    pub stime: u64,
    /// User time of reaped children, ticks.
    pub cutime: u64,
    /// System time of reaped children, ticks.
    pub cstime: u64,
}

/// Parses the text of `/proc/PID/stat` (the command name may contain spaces and parentheses).
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<i64>().ok());
    Some(ProcStat {
        ppid: u32::try_from(num(1)?).ok()?,
        utime: u64::try_from(num(11)?).ok()?,
        stime: u64::try_from(num(12)?).ok()?,
        cutime: u64::try_from(num(13)?).ok()?,
        cstime: u64::try_from(num(14)?).ok()?,
    })
}

/// Reads `/proc/PID/stat`.
pub fn stat(pid: u32) -> Result<ProcStat, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::io("reading", path, e))?;
    parse_stat(&text).ok_or(BenchError::Proc { pid, file: "stat" })
}

/// A `kB` field of `/proc/PID/status` such as `VmHWM` or `VmRSS`, in KiB.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The 1-minute load average (`/proc/loadavg`), 0 if unreadable.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The machine's CPU time so far, in clock ticks: (all, stolen by the hypervisor), from the
/// `cpu` line of `/proc/stat`; `None` if unreadable.
pub fn machine_ticks() -> Option<(u64, u64)> {
    parse_cpu_line(std::fs::read_to_string("/proc/stat").ok()?.lines().next()?)
}

/// Parses `cpu  user nice system idle iowait irq softirq steal guest guest_nice`; guest time
/// is already counted in user and nice, so it is left out of the total.
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let steal = *v.get(7)?;
    Some((v.iter().sum(), steal))
}

/// Percent of the machine's CPU time the hypervisor took between two [`machine_ticks`].
pub fn steal_percent(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((t0, s0), (t1, s1)) = (before?, after?);
    let total = t1.checked_sub(t0).filter(|t| *t > 0)?;
    Some(100.0 * s1.saturating_sub(s0) as f64 / total as f64)
}

/// Processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat(p).map(|s| s.ppid == pid).unwrap_or(false))
        .collect()
}

/// CPU seconds of `root` (user + system), including its reaped children and its live children.
pub fn group_cpu_secs(root: u32) -> Result<f64, BenchError> {
    let s = stat(root)?;
    let mut ticks = s.utime + s.stime + s.cutime + s.cstime;
    for c in children(root) {
        if let Ok(cs) = stat(c) {
            ticks += cs.utime + cs.stime + cs.cutime + cs.cstime;
        }
    }
    Ok(ticks as f64 / clk_tck() as f64)
}

/// Sum of `VmRSS` over `root` and its live children, KiB.
pub fn group_rss_kb(root: u32) -> u64 {
    std::iter::once(root)
        .chain(children(root))
        .filter_map(|p| status_kb(p, "VmRSS"))
        .sum()
}

/// Proportional set size (`Pss` of `/proc/PID/smaps_rollup`), KiB: shared pages are divided
/// among the processes sharing them.
pub fn pss_kb(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix("Pss:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Sum of [`pss_kb`] over `root` and its live children, KiB.
pub fn group_pss_kb(root: u32) -> u64 {
    std::iter::once(root)
        .chain(children(root))
        .filter_map(pss_kb)
        .sum()
}

/// Samples [`group_rss_kb`] and [`group_pss_kb`] every 100 ms on a thread and keeps the
/// largest values.
#[derive(Debug)]
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    peak_pss: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakSampler {
    /// Starts sampling the process group rooted at `root`.
    pub fn start(root: u32) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(group_rss_kb(root)));
        let peak_pss = Arc::new(AtomicU64::new(group_pss_kb(root)));
        let (s, p, q) = (stop.clone(), peak.clone(), peak_pss.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(group_rss_kb(root), Ordering::Relaxed);
                q.fetch_max(group_pss_kb(root), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        PeakSampler {
            stop,
            peak,
            peak_pss,
            thread: Some(thread),
        }
    }

    /// Stops and returns the peaks (summed RSS, summed PSS), KiB.
    pub fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.peak.load(Ordering::Relaxed),
            self.peak_pss.load(Ordering::Relaxed),
        )
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let text = "1234 (a) b (c)) S 77 1234 1234 0 -1 4194560 100 0 0 0 15 7 3 2 20 0 1 0 1 1 1";
        let s = parse_stat(text).unwrap();
        assert_eq!(
            s,
            ProcStat {
                ppid: 77,
                utime: 15,
                stime: 7,
                cutime: 3,
                cstime: 2
            }
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn cpu_line_gives_total_and_steal() {
        let line = "cpu  100 5 50 800 20 1 4 20 7 0";
        assert_eq!(parse_cpu_line(line), Some((1000, 20)));
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_cpu_line("cpu  1 2 3"), None);
        assert_eq!(
            steal_percent(Some((1000, 20)), Some((1400, 60))),
            Some(10.0)
        );
        assert_eq!(steal_percent(Some((1000, 20)), Some((1000, 20))), None);
        assert_eq!(steal_percent(None, Some((1000, 20))), None);
        assert!(machine_ticks().is_some_and(|(t, s)| t > 0 && s <= t));
    }

    /// This process: its own stat parses, it has a VmHWM, and burning CPU shows up.
    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(loadavg() >= 0.0);
        assert!(status_kb(me, "VmHWM").unwrap() > 0);
        let before = group_cpu_secs(me).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = group_cpu_secs(me).unwrap();
        assert!(after - before >= 0.1, "{before} -> {after}");
        let child = std::process::Command::new("sleep")
            .arg("1")
            .spawn()
            .unwrap();
        assert!(children(me).contains(&child.id()));
        let sampler = PeakSampler::start(me);
        std::thread::sleep(Duration::from_millis(150));
        let (rss, pss) = sampler.finish();
        assert!(rss > 0 && pss > 0 && pss <= rss + 1024, "{rss} {pss}");
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
