//! Enqueue throughput (messages/s, fsync'd) for 10 KB and 1 MB bodies at concurrency 1 and 50,
//! with and without group commit. Bodies live in redb (see docs/decisions.md, "Queue body storage").
//!
//! Run: `cargo bench -p sealpost-queue --bench enqueue_bench` (release build).
//! The store goes to `$SEALPOST_BENCH_DIR` (default: the system temp dir); it must be a real disk.

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

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
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
