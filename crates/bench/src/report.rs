//! The run's results: rows, the one table, the targets from issue 7, and the JSON form.

use crate::load::LoadReport;
use crate::runner::RunOptions;
use crate::sink::SinkReport;
use serde::Serialize;
use std::fmt::Write as _;

/// Tag prefix of the open-loop 50 KB rows; the offered rate follows it.
pub const OPEN_50K_TAG: &str = "sealpost-50k-open-";
/// Tag of Postfix's row on the closed-loop 50 KB load (compared with `sealpost-50k`).
pub const POSTFIX_50K_TAG: &str = "postfix-50k";

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub label: String,
    /// `sealpost` or `postfix`.
    pub system: String,
    /// The load generator's view.
    pub load: LoadReport,
    /// The sink's view (absent for acceptance-only rows).
    pub sink: Option<SinkReport>,
    /// Delivered messages per second: messages at the sink / (last arrival − load start).
    pub delivered_per_s: Option<f64>,
    /// Peak resident memory, KiB (Sealpost: VmHWM; Postfix: peak of the summed VmRSS of the
    /// master and its children, sampled every 100 ms).
    pub peak_rss_kb: u64,
    /// Peak of the summed proportional set size (shared pages divided among the processes
    /// sharing them), sampled every 100 ms; Postfix's end-to-end rows only.
    pub peak_pss_kb: Option<u64>,
    /// CPU seconds (user + system, reaped children included) from load start to last delivery.
    pub cpu_secs: f64,
    /// CPU seconds per 1,000 accepted messages.
    pub cpu_per_1k: f64,
    /// CPU seconds the benchmark process itself used during the row (load generator and
    /// sink share the machine with the system under test).
    pub bench_cpu_secs: f64,
    /// TLS handshakes the sink completed during the row (connections the relay opened).
    pub tls_handshakes: Option<u64>,
    /// The machine's 1-minute load average when the row started and ended (the machine may be
    /// shared; a high load means other work competed for the cores).
    pub loadavg: (f64, f64),
    /// Percent of the machine's CPU time the hypervisor took during the row (`steal` in
    /// `/proc/stat`): other guests competing for the host's cores.
    pub steal_percent: Option<f64>,
    /// Accepted msg/s of every run when the row is the median of repeated runs.
    pub repeats: Vec<f64>,
    /// Whether the kernel's page cache was dropped right before the row (see `settle_memory`).
    pub page_cache_dropped: Option<bool>,
}

impl Row {
    /// A row from its parts.
    pub fn new(
        label: &str,
        system: &str,
        load: LoadReport,
        sink: Option<SinkReport>,
        peak_rss_kb: u64,
        cpu_secs: f64,
    ) -> Row {
        let delivered_per_s = sink.as_ref().map(|s| {
            let span = s.last_unix_ns.saturating_sub(load.started_unix_ns) as f64 / 1e9;
            s.messages as f64 / span.max(1e-9)
        });
        let cpu_per_1k = cpu_secs * 1000.0 / (load.accepted.max(1) as f64);
        Row {
            label: label.to_string(),
            system: system.to_string(),
            load,
            sink,
            delivered_per_s,
            peak_rss_kb,
            peak_pss_kb: None,
            cpu_secs,
            cpu_per_1k,
            bench_cpu_secs: 0.0,
            tls_handshakes: None,
            loadavg: (0.0, 0.0),
            steal_percent: None,
            repeats: Vec::new(),
            page_cache_dropped: None,
        }
    }
}

/// Resident memory growth per idle session.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// How far each session went before idling.
    pub kind: String,
    /// Sessions held open.
    pub sessions: usize,
    /// VmRSS before opening them, KiB.
    pub rss_before_kb: u64,
    /// VmRSS with all open (after 1 s), KiB.
    pub rss_after_kb: u64,
    /// (after − before) / sessions, KiB.
    pub per_session_kb: f64,
}

/// Start time with a full queue.
#[derive(Debug, Clone, Serialize)]
pub struct StartReport {
    /// Messages queued before the start.
    pub queued: u64,
    /// Their body size.
    pub queued_size: usize,
    /// Seconds the prefill took (queue crate, 64 concurrent enqueues, group commit).
    pub prefill_secs: f64,
    /// Seconds from spawning `sealpost serve` to its first 220 greeting.
    pub start_secs: f64,
}

/// One target of issue 7 and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The target.
    pub target: String,
    /// The measured value.
    pub measured: String,
    /// Met, not met, or not measured (`None`).
    pub met: Option<bool>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Messages per comparison row.
    pub messages: u64,
    /// Sessions per load.
    pub sessions: usize,
    /// The size mix.
    pub mix: String,
    /// Open-loop rate, if any.
    pub rate: Option<f64>,
    /// Whether the Postfix row ran.
    pub postfix: bool,
    /// `delivery.max_connections_per_domain` given to Sealpost.
    pub sealpost_per_domain_connections: usize,
    /// The rows.
    pub rows: Vec<Row>,
    /// Idle-session memory.
    pub idle: Vec<IdleReport>,
    /// Start time with a full queue.
    pub start: Option<StartReport>,
    /// Messages left in Postfix's queue after its row (should be 0).
    pub postfix_queue_left: usize,
    /// Sink sessions that ended in an error.
    pub sink_session_errors: u64,
    /// The targets.
    pub targets: Vec<Target>,
}

/// `200000` → `200,000`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn f(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

impl Report {
    /// An empty report for these options.
    pub fn new(opts: &RunOptions, postfix: bool) -> Report {
        Report {
            messages: opts.messages,
            sessions: opts.sessions,
            mix: opts.mix.describe(),
            rate: opts.rate,
            postfix,
            sealpost_per_domain_connections: opts.per_domain,
            rows: Vec::new(),
            idle: Vec::new(),
            start: None,
            postfix_queue_left: 0,
            sink_session_errors: 0,
            targets: Vec::new(),
        }
    }

    fn row(&self, tag: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.load.tag == tag)
    }

    /// Evaluates the targets.
    pub fn finish(&mut self) {
        let mut t = Vec::new();
        let sp = self.row("sealpost-plain");
        for (tag, which) in [
            (
                "postfix-plain",
                "Postfix's (its defaults plus the issue's TLS settings)",
            ),
            (
                "postfix-reuse",
                "Postfix's with smtp_tls_connection_reuse = yes",
            ),
        ] {
            let pf = self.row(tag);
            if pf.is_none() && tag == "postfix-reuse" {
                continue;
            }
            let (a, b) = (
                sp.and_then(|r| r.delivered_per_s),
                pf.and_then(|r| r.delivered_per_s),
            );
            t.push(Target {
                target: format!("delivered throughput ≥ 2× {which}"),
                measured: match (a, b) {
                    (Some(a), Some(b)) => {
                        format!("{} vs {} msg/s = {}", f(a), f(b), ratio(Some(a), Some(b)))
                    }
                    _ => "Postfix not run".into(),
                },
                met: match (a, b) {
                    (Some(a), Some(b)) if b > 0.0 => Some(a / b >= 2.0),
                    _ => None,
                },
            });
        }
        let mut latency_rows: Vec<(String, String)> = self
            .rows
            .iter()
            .filter_map(|r| {
                let rate = r.load.tag.strip_prefix(OPEN_50K_TAG)?;
                Some((
                    r.load.tag.clone(),
                    format!("open loop, {rate} msg/s offered"),
                ))
            })
            .collect();
        latency_rows.push((
            "sealpost-50k".into(),
            "closed loop, i.e. at saturation".into(),
        ));
        for (tag, how) in latency_rows {
            let k50 = self.row(&tag);
            let postfix = self
                .row(POSTFIX_50K_TAG)
                .filter(|_| tag == "sealpost-50k")
                .map(|p| {
                    format!(
                        " (Postfix on the same load: {} ms at {} msg/s)",
                        f(p.load.acceptance.p99_ms),
                        f(p.load.accepted_per_s)
                    )
                })
                .unwrap_or_default();
            t.push(Target {
                target: format!("acceptance p99 ≤ 20 ms at 50 sessions of 50 KB ({how})"),
                measured: k50.map_or("not run".into(), |r| {
                    format!(
                        "{} ms at {} sessions, {} msg/s{postfix}",
                        f(r.load.acceptance.p99_ms),
                        r.load.sessions,
                        f(r.load.accepted_per_s)
                    )
                }),
                met: k50
                    .filter(|r| r.load.sessions == 50)
                    .map(|r| r.load.acceptance.p99_ms <= 20.0),
            });
        }
        let (e, q) = (self.row("accept-empty"), self.row("accept-queued"));
        t.push(Target {
            target: "throughput with N queued within 10% of empty".into(),
            measured: match (e, q) {
                (Some(e), Some(q)) => format!(
                    "{} vs {} msg/s = {}",
                    f(q.load.accepted_per_s),
                    f(e.load.accepted_per_s),
                    ratio(Some(q.load.accepted_per_s), Some(e.load.accepted_per_s))
                ),
                _ => "not run".into(),
            },
            met: match (e, q) {
                (Some(e), Some(q)) if e.load.accepted_per_s > 0.0 => {
                    Some(q.load.accepted_per_s >= 0.9 * e.load.accepted_per_s)
                }
                _ => None,
            },
        });
        for idle in &self.idle {
            t.push(Target {
                target: format!("≤ 50 KB per idle session ({})", idle.kind),
                measured: format!(
                    "{} KB over {} sessions",
                    f(idle.per_session_kb),
                    idle.sessions
                ),
                met: Some(idle.per_session_kb <= 50.0),
            });
        }
        self.targets = t;
    }

    /// The one table (Markdown) plus the target lines.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| row | msgs | accepted msg/s | delivered msg/s | accept p50 ms | accept p99 ms | e2e p50 ms | e2e p99 ms | peak RSS MB | CPU s / 1k msgs | notes |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
        let opt = |v: Option<f64>| v.map_or("–".to_string(), f);
        for r in &self.rows {
            let e2e = r.sink.as_ref().map(|s| s.end_to_end);
            let mut notes = Vec::new();
            if r.load.errors > 0 || r.load.refused > 0 {
                notes.push(format!(
                    "{} refused, {} session errors",
                    r.load.refused, r.load.errors
                ));
            }
            notes.push(format!("load avg {:.1}→{:.1}", r.loadavg.0, r.loadavg.1));
            if let Some(steal) = r.steal_percent.filter(|s| *s >= 0.5) {
                notes.push(format!("hypervisor steal {steal:.1}% of CPU time"));
            }
            if r.repeats.len() > 1 {
                let all: Vec<String> = r.repeats.iter().map(|v| f(*v)).collect();
                notes.push(format!(
                    "median of {} runs ({} msg/s)",
                    r.repeats.len(),
                    all.join(", ")
                ));
            }
            match r.page_cache_dropped {
                Some(true) => notes.push("page cache dropped before each run".into()),
                Some(false) => notes.push("page cache NOT dropped (needs root)".into()),
                None => {}
            }
            if let Some(h) = r.tls_handshakes {
                notes.push(format!("{h} TLS handshakes at the sink"));
            }
            if r.bench_cpu_secs > 0.0 {
                notes.push(format!(
                    "load generator + sink used {} CPU s",
                    f(r.bench_cpu_secs)
                ));
            }
            if r.system == "postfix" {
                if let Some(p) = r.peak_pss_kb {
                    notes.push(format!(
                        "RSS summed over master + children; summed PSS peak {} MB",
                        f(p as f64 / 1024.0)
                    ));
                }
            }
            if let Some(s) = &r.sink {
                if s.over_tls != s.messages {
                    notes.push(format!("{} of {} over TLS", s.over_tls, s.messages));
                } else if let Some(k) = s.tls.keys().next() {
                    notes.push(format!("delivered over {k}"));
                }
            }
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.label,
                r.load.accepted,
                f(r.load.accepted_per_s),
                opt(r.delivered_per_s),
                f(r.load.acceptance.p50_ms),
                f(r.load.acceptance.p99_ms),
                opt(e2e.map(|s| s.p50_ms)),
                opt(e2e.map(|s| s.p99_ms)),
                f(r.peak_rss_kb as f64 / 1024.0),
                f(r.cpu_per_1k),
                notes.join("; "),
            );
            if r.system == "postfix" {
                // Each Postfix row is compared with the Sealpost row that had the same load.
                let (ours, name) = match r.load.tag.as_str() {
                    POSTFIX_50K_TAG => ("sealpost-50k", "Postfix (50 KB)"),
                    "postfix-reuse" => ("sealpost-plain", "Postfix (reuse)"),
                    _ => ("sealpost-plain", "Postfix"),
                };
                if let Some(s) = self.row(ours) {
                    let se = s.sink.as_ref().map(|x| x.end_to_end);
                    let ratio_of = |a: f64, b: f64| ratio(Some(a), Some(b));
                    let _ = writeln!(
                        out,
                        "| **Sealpost / {}** | | {} | {} | {} | {} | {} | {} | {} | {} | higher is better for msg/s, lower for the rest |",
                        name,
                        ratio_of(s.load.accepted_per_s, r.load.accepted_per_s),
                        ratio(s.delivered_per_s, r.delivered_per_s),
                        ratio_of(s.load.acceptance.p50_ms, r.load.acceptance.p50_ms),
                        ratio_of(s.load.acceptance.p99_ms, r.load.acceptance.p99_ms),
                        ratio(se.map(|x| x.p50_ms), e2e.map(|x| x.p50_ms)),
                        ratio(se.map(|x| x.p99_ms), e2e.map(|x| x.p99_ms)),
                        ratio_of(s.peak_rss_kb as f64, r.peak_rss_kb as f64),
                        ratio_of(s.cpu_per_1k, r.cpu_per_1k),
                    );
                }
            }
            if r.load.tag == "accept-queued" {
                if let Some(e) = self.row("accept-empty") {
                    let _ = writeln!(
                        out,
                        "| **queued / empty** | | {} | | {} | {} | | | | | |",
                        ratio(Some(r.load.accepted_per_s), Some(e.load.accepted_per_s)),
                        ratio(
                            Some(r.load.acceptance.p50_ms),
                            Some(e.load.acceptance.p50_ms)
                        ),
                        ratio(
                            Some(r.load.acceptance.p99_ms),
                            Some(e.load.acceptance.p99_ms)
                        ),
                    );
                }
            }
        }
        for i in &self.idle {
            let _ = writeln!(
                out,
                "| Sealpost idle sessions, {} | {} | | | | | | | {} | | {} KB per session (VmRSS {} → {} KB) |",
                i.kind,
                i.sessions,
                f(i.rss_after_kb as f64 / 1024.0),
                f(i.per_session_kb),
                i.rss_before_kb,
                i.rss_after_kb
            );
        }
        if let Some(s) = &self.start {
            let _ = writeln!(
                out,
                "| Sealpost start with {} queued ({} each) | | | | | | | | | | {} s to first greeting (prefill took {} s) |",
                thousands(s.queued),
                crate::mix::human_size(s.queued_size),
                f(s.start_secs),
                f(s.prefill_secs)
            );
        }
        let _ = writeln!(out);
        for t in &self.targets {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "not measured",
            };
            let _ = writeln!(out, "- {}: {} — {verdict}", t.target, t.measured);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(200_000), "200,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
