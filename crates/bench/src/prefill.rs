//! Filling a queue with messages before Sealpost starts (the "N already queued" rows).
//! Uses the queue crate directly with the instance's key: the same encrypted, fsync'd records
//! that submission writes, much faster than submitting them over SMTP.

use crate::error::BenchError;
use crate::mix::{body, message};
use sealpost_queue::{Envelope, Keyring, Queue, QueueOptions, RecipientSpec};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// What a prefill did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefillReport {
    /// Messages enqueued.
    pub messages: u64,
    /// Body size of each, bytes.
    pub size: usize,
    /// Seconds taken.
    pub secs: f64,
}

/// Enqueues `count` messages of `size` bytes to `rcpt_domain` into the queue in `queue_dir`.
pub async fn prefill(
    queue_dir: &Path,
    key: &Path,
    count: u64,
    size: usize,
    rcpt_domain: &str,
    concurrency: usize,
) -> Result<PrefillReport, BenchError> {
    let keys = Keyring::load(key, &[])?;
    let opts = QueueOptions {
        dir: queue_dir.to_path_buf(),
        retry: vec![Duration::from_secs(300)],
        lifetime: Duration::from_secs(5 * 86_400),
        lease: Duration::from_secs(600),
    };
    let queue = Queue::open(opts, keys)?;
    let b = Arc::new(body(size));
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (q, b, next, domain) = (
            queue.clone(),
            b.clone(),
            next.clone(),
            rcpt_domain.to_string(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<(), BenchError>(());
                }
                let to = format!("queued{i}@{domain}");
                let env = Envelope {
                    sender: "bench@clinic.bench.test".into(),
                    recipients: vec![RecipientSpec {
                        address: to.clone(),
                        notify: None,
                        orcpt: None,
                    }],
                    user: None,
                    policy: "phi".into(),
                    tags: Vec::new(),
                    client_ip: None,
                    ret: None,
                    envid: None,
                    smtputf8: false,
                    eight_bit: false,
                    received_at: SystemTime::now(),
                };
                let msg = message("prefill", i, "bench@clinic.bench.test", &to, 0, &b);
                q.enqueue(env, msg).await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(res) => res?,
            Err(_) => {
                return Err(BenchError::Option {
                    option: "prefill",
                    detail: "an enqueue task panicked".into(),
                })
            }
        }
    }
    drop(queue);
    Ok(PrefillReport {
        messages: count,
        size,
        secs: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real queue on disk: the prefilled messages are there after reopening.
    #[tokio::test]
    async fn prefilled_messages_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("queue.key");
        Keyring::generate(&key).unwrap();
        let qdir = dir.path().join("queue");
        let rep = prefill(&qdir, &key, 40, 1000, "bench.test", 8)
            .await
            .unwrap();
        assert_eq!(rep.messages, 40);
        let q = Queue::open(
            QueueOptions {
                dir: qdir,
                retry: vec![Duration::from_secs(300)],
                lifetime: Duration::from_secs(86_400),
                lease: Duration::from_secs(600),
            },
            Keyring::load(&key, &[]).unwrap(),
        )
        .unwrap();
        assert_eq!(q.list().await.unwrap().len(), 40);
    }
}
