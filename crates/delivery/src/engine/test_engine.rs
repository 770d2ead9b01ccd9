//! An engine on a real queue and audit log, for the engine's tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sealpost_audit::{AuditLog, AuditOptions};
use std::time::SystemTime;

use sealpost_queue::{Envelope, Keyring, Queue, QueueOptions, RecipientSpec};

use super::Engine;

/// An engine in `dir` with `extra` appended to a minimal config; `hold` is both the retry
/// interval and the lease. Returns the engine, its queue and the audit log's path.
pub(super) fn engine_in(dir: &Path, extra: &str, hold: Duration) -> (Engine, Queue, PathBuf) {
    let audit_path = dir.join("audit").join("audit.jsonl");
    let audit = AuditLog::open(AuditOptions::new(&audit_path)).unwrap();
    let (engine, queue) = engine_with_audit(dir, extra, hold, audit);
    (engine, queue, audit_path)
}

/// As [`engine_in`], with the audit log the test opened.
pub(super) fn engine_with_audit(
    dir: &Path,
    extra: &str,
    hold: Duration,
    audit: AuditLog,
) -> (Engine, Queue) {
    let cfg_path = dir.join("sealpost.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[server]\nhostname = \"relay.unit.test\"\nstate_dir = \"{}\"\n\n\
             [[listeners]]\naddress = \"127.0.0.1:2587\"\nmode = \"starttls\"\n\n{extra}",
            dir.display()
        ),
    )
    .unwrap();
    let config =
        sealpost_config::Config::load_with_env_prefix(&cfg_path, "SEALPOST_UNIT_TEST_NONE_")
            .unwrap();
    let key = dir.join("queue.key");
    Keyring::generate(&key).unwrap();
    let queue = Queue::open(
        QueueOptions {
            dir: dir.join("queue"),
            retry: vec![hold],
            lifetime: Duration::from_secs(3600),
            lease: hold,
        },
        Keyring::load(&key, &[]).unwrap(),
    )
    .unwrap();
    let engine = Engine::new(&config, queue.clone(), audit).unwrap();
    (engine, queue)
}

/// An envelope from `sender` to `pat@b.test` under `policy`.
pub(super) fn envelope(sender: &str, policy: &str) -> Envelope {
    Envelope {
        sender: sender.into(),
        recipients: vec![RecipientSpec {
            address: "pat@b.test".into(),
            notify: None,
            orcpt: Some("rfc822;pat@b.test".into()),
        }],
        user: Some("app".into()),
        policy: policy.into(),
        tags: Vec::new(),
        client_ip: None,
        ret: None,
        envid: None,
        smtputf8: false,
        eight_bit: false,
        received_at: SystemTime::now(),
    }
}

/// Tells a running engine to stop and waits (at most 30 s) until its run has ended.
pub(super) async fn stop_engine(
    stop: tokio::sync::watch::Sender<bool>,
    run: tokio::task::JoinHandle<()>,
) {
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the engine stops once its deliveries ended")
        .unwrap();
}
