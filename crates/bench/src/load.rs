//! The load generator: N concurrent SMTP sessions sending a total number of messages,
//! closed loop (as fast as replies come) or open loop (at a target rate).

use crate::client::{Client, Security};
use crate::error::BenchError;
use crate::mix::{message_into, Bodies, SizeMix};
use crate::stats::{summarize, timeline, Summary, Window};
use serde::Serialize;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What load to generate.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Server address.
    pub target: SocketAddr,
    /// Plain or STARTTLS + AUTH.
    pub security: Security,
    /// Concurrent sessions.
    pub sessions: usize,
    /// Messages in total (spread over the sessions as they free up).
    pub total: u64,
    /// Body sizes.
    pub mix: SizeMix,
    /// Open loop at this many messages per second; `None` for closed loop.
    pub rate: Option<f64>,
    /// Run tag written into `X-Bench-Run` (the sink counts per tag).
    pub tag: String,
    /// Envelope sender and `From:`.
    pub from: String,
    /// Recipient domain; recipient `n` is `rcptN@domain`.
    pub rcpt_domain: String,
    /// Print a progress line on stderr every second.
    pub progress: bool,
}

/// What a load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// The run tag.
    pub tag: String,
    /// Sessions.
    pub sessions: usize,
    /// Messages attempted.
    pub attempted: u64,
    /// Messages answered 250.
    pub accepted: u64,
    /// Messages refused with 4xx/5xx.
    pub refused: u64,
    /// Sessions that broke (I/O or protocol errors), each reconnected.
    pub errors: u64,
    /// First error seen, if any.
    pub first_error: Option<String>,
    /// Message bytes sent (bodies plus headers).
    pub bytes: u64,
    /// Wall time from the first connection to the last reply, seconds.
    pub elapsed_s: f64,
    /// Accepted messages per second.
    pub accepted_per_s: f64,
    /// Acceptance latency (end of DATA to the 250).
    pub acceptance: Summary,
    /// The same latency per window of [`TIMELINE_MS`] by when the reply came: shows whether
    /// the slowest replies cluster (a start-up phase, one slow disk flush) or spread out.
    pub acceptance_timeline: Vec<Window>,
    /// When the load started, Unix nanoseconds.
    pub started_unix_ns: u128,
}

/// Unix time now in nanoseconds.
pub fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Width of the windows of [`LoadReport::acceptance_timeline`], milliseconds.
pub const TIMELINE_MS: u64 = 250;

#[derive(Default)]
struct Counters {
    next: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
}

/// Runs the load and returns its report.
pub async fn run(opts: LoadOptions) -> Result<LoadReport, BenchError> {
    if opts.sessions == 0 {
        return Err(BenchError::Option {
            option: "sessions",
            detail: "must be at least 1".into(),
        });
    }
    if let Some(r) = opts.rate {
        if r.is_nan() || r <= 0.0 {
            return Err(BenchError::Option {
                option: "rate",
                detail: "must be a positive number of messages per second".into(),
            });
        }
    }
    let opts = Arc::new(opts);
    let bodies = Arc::new(Bodies::for_mix(&opts.mix));
    let counters = Arc::new(Counters::default());
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let started_unix_ns = unix_ns();
    let start = Instant::now();
    let progress = opts.progress.then(|| {
        let (c, o) = (counters.clone(), opts.clone());
        tokio::spawn(progress_line(c, o, start))
    });
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..opts.sessions {
        let (o, b, c, fe) = (
            opts.clone(),
            bodies.clone(),
            counters.clone(),
            first_error.clone(),
        );
        tasks.spawn(session(s, o, b, c, fe, start));
    }
    let mut timed = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(mut v) = done {
            timed.append(&mut v);
        }
    }
    let acceptance_timeline = timeline(&timed, TIMELINE_MS);
    let mut samples: Vec<u64> = timed.iter().map(|&(_, latency)| latency).collect();
    let elapsed = start.elapsed();
    if let Some(p) = progress {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    let accepted = counters.accepted.load(Ordering::Relaxed);
    let report = LoadReport {
        tag: opts.tag.clone(),
        sessions: opts.sessions,
        attempted: counters.next.load(Ordering::Relaxed).min(opts.total),
        accepted,
        refused: counters.refused.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        first_error: first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        bytes: counters.bytes.load(Ordering::Relaxed),
        elapsed_s: elapsed.as_secs_f64(),
        accepted_per_s: accepted as f64 / elapsed.as_secs_f64().max(1e-9),
        acceptance: summarize(&mut samples),
        acceptance_timeline,
        started_unix_ns,
    };
    Ok(report)
}

async fn progress_line(c: Arc<Counters>, o: Arc<LoadOptions>, start: Instant) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let acc = c.accepted.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        let line = format!(
            "[{}] {acc}/{} accepted, {} refused, {} errors, {:.0} msg/s, {:.0} s",
            o.tag,
            o.total,
            c.refused.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
            acc as f64 / secs.max(1e-9),
            secs
        );
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
}

async fn session(
    id: usize,
    o: Arc<LoadOptions>,
    bodies: Arc<Bodies>,
    c: Arc<Counters>,
    first_error: Arc<Mutex<Option<String>>>,
    start: Instant,
) -> Vec<(u64, u64)> {
    // (reply time since `start`, latency), microseconds
    let mut samples = Vec::new();
    let helo = format!("load-{id}.bench.test");
    let mut client: Option<Client> = None;
    let mut consecutive_errors = 0u32;
    // one buffer per session, reused: a fresh 50 KB allocation per message was ~5% of the
    // load generator's CPU (page faults and copying into new memory)
    let mut msg = Vec::new();
    let note = |e: &BenchError| {
        c.errors.fetch_add(1, Ordering::Relaxed);
        let mut fe = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if fe.is_none() {
            *fe = Some(e.to_string());
        }
    };
    loop {
        if client.is_none() {
            match Client::connect(o.target, &helo, &o.security).await {
                Ok(cl) => {
                    client = Some(cl);
                }
                Err(e) => {
                    note(&e);
                    consecutive_errors += 1;
                    if consecutive_errors > 20 {
                        return samples;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let i = c.next.fetch_add(1, Ordering::Relaxed);
        if i >= o.total {
            break;
        }
        if let Some(rate) = o.rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let body = bodies.get(o.mix.size_of(i));
        let to = format!("rcpt{i}@{}", o.rcpt_domain);
        message_into(&mut msg, &o.tag, i, &o.from, &to, unix_ns(), &body);
        let Some(cl) = client.as_mut() else { continue };
        match cl.send(&o.from, &to, &msg).await {
            Ok(sent) if sent.accepted => {
                consecutive_errors = 0;
                c.accepted.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(msg.len() as u64, Ordering::Relaxed);
                let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
                samples.push((micros(start.elapsed()), micros(sent.latency)));
            }
            Ok(_) => {
                c.refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                note(&e);
                client = None;
                consecutive_errors += 1;
                if consecutive_errors > 20 {
                    return samples;
                }
            }
        }
    }
    if let Some(cl) = client {
        cl.quit().await;
    }
    samples
}
