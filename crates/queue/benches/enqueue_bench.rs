//! Enqueue throughput (messages/s, fsync'd) for 10 KB and 1 MB bodies at concurrency 1 and 50,
//! with and without group commit. Bodies live in redb (see docs/decisions.md, "Queue body storage").
//!
//! Run: `cargo bench -p sealpost-queue --bench enqueue_bench` (release build).
//! The store goes to `$SEALPOST_BENCH_DIR` (default: the system temp dir); it must be a real disk.
//!
//! With `SEALPOST_BENCH_PREFILL=N` it instead measures how enqueue cost changes with store size:
//! 50 sessions enqueue the end-to-end benchmark's size mix (70% 5 KB, 25% 50 KB, 5% 1 MB) in
//! rounds of 6,000 into an empty store and into one prefilled with N 5 KB messages (reopened
//! first, like a restart), printing messages/s and process CPU per 1,000 messages per round.

#![allow(clippy::expect_used)] // a measurement tool: any failure should abort it loudly

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sealpost_queue::{Envelope, Keyring, Queue, QueueOptions, RecipientSpec, Tuning};

fn envelope() -> Envelope {
    Envelope {
        sender: "app@clinic.example".into(),
        recipients: vec![RecipientSpec {
            address: "patient@example.org".into(),
            notify: None,
            orcpt: None,
        }],
        user: Some("billing-app".into()),
        policy: "phi".into(),
        tags: vec![],
        client_ip: None,
        ret: None,
        envid: None,
        smtputf8: false,
        eight_bit: false,
        received_at: SystemTime::now(),
    }
}

async fn run(group: bool, size: usize, concurrency: usize, budget: Duration, cap: u64) -> f64 {
    let base = std::env::var_os("SEALPOST_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let key = dir.path().join("queue.key");
    Keyring::generate(&key).expect("key");
    let keys = Keyring::load(&key, &[]).expect("load key");
    let opts = QueueOptions {
        dir: dir.path().join("queue"),
        retry: vec![Duration::from_secs(300)],
        lifetime: Duration::from_secs(5 * 86400),
        lease: Duration::from_secs(600),
    };
    let tuning = Tuning {
        max_batch: if group { 256 } else { 1 },
        ..Tuning::default()
    };
    let queue = Queue::open_tuned(opts, keys, tuning).expect("open");
    let body = vec![b'x'; size];
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let queue = queue.clone();
        let body = body.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < budget && done.load(Ordering::Relaxed) < cap {
                queue
                    .enqueue(envelope(), body.clone())
                    .await
                    .expect("enqueue");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    done.load(Ordering::Relaxed) as f64 / elapsed
}

/// Process CPU seconds (user + system) so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The end-to-end benchmark's mix: body `i % 100` of 70 × 5 KB, 25 × 50 KB, 5 × 1 MB.
fn mixed_body(i: u64) -> Vec<u8> {
    match i % 100 {
        0..70 => vec![b'x'; 5 * 1024],
        70..95 => vec![b'x'; 50 * 1024],
        _ => vec![b'x'; 1024 * 1024],
    }
}

/// Enqueues `n` messages from 50 tasks (`body(i)` for the i-th); returns (msg/s, CPU s per 1k).
async fn enqueue_n(queue: &Queue, n: u64, body: fn(u64) -> Vec<u8>) -> (f64, f64) {
    let next = Arc::new(AtomicU64::new(0));
    let cpu = cpu_seconds();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (queue, next) = (queue.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                queue.enqueue(envelope(), body(i)).await.expect("enqueue");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let secs = start.elapsed().as_secs_f64();
    (n as f64 / secs, (cpu_seconds() - cpu) / n as f64 * 1000.0)
}

fn scale(rt: &tokio::runtime::Runtime, prefill: u64) {
    println!("| store at start | round | messages/s | CPU s / 1k msgs |");
    println!("|---|---|---|---|");
    for queued in [0, prefill] {
        let base =
            std::env::var_os("SEALPOST_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
        let dir = tempfile::tempdir_in(base).expect("temp dir");
        let key = dir.path().join("queue.key");
        Keyring::generate(&key).expect("key");
        let opts = QueueOptions {
            dir: dir.path().join("queue"),
            retry: vec![Duration::from_secs(300)],
            lifetime: Duration::from_secs(5 * 86400),
            lease: Duration::from_secs(600),
        };
        rt.block_on(async {
            if queued > 0 {
                let keys = Keyring::load(&key, &[]).expect("load key");
                let queue = Queue::open(opts.clone(), keys).expect("open");
                enqueue_n(&queue, queued, |_| vec![b'x'; 5 * 1024]).await;
            }
            let keys = Keyring::load(&key, &[]).expect("load key");
            let queue = Queue::open(opts, keys).expect("reopen");
            for round in 1..=3 {
                let (rate, cpu) = enqueue_n(&queue, 6_000, mixed_body).await;
                println!("| {queued} queued | {round} | {rate:.0} | {cpu:.2} |");
            }
        });
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(prefill) = std::env::var("SEALPOST_BENCH_PREFILL")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        scale(&rt, prefill);
        return;
    }
    let budget = Duration::from_secs(
        std::env::var("SEALPOST_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(4),
    );
    println!("| group commit | body | sessions | messages/s | MB/s |");
    println!("|---|---|---|---|---|");
    for size in [10 * 1024, 1024 * 1024] {
        for concurrency in [1, 50] {
            for group in [false, true] {
                let cap = if size > 100_000 { 2_000 } else { 50_000 };
                let rate = rt.block_on(run(group, size, concurrency, budget, cap));
                println!(
                    "| {} | {} | {} | {:.0} | {:.1} |",
                    if group { "on" } else { "off" },
                    if size > 100_000 { "1 MB" } else { "10 KB" },
                    concurrency,
                    rate,
                    rate * size as f64 / 1_048_576.0
                );
            }
        }
    }
}
