//! `sealpost serve`: open the state, bind the listeners, run until SIGTERM; SIGHUP reloads.

use crate::{admin, certs, http, systemd};
use anyhow::{Context, Result};
use sealpost_audit::{AuditLog, AuditOptions, Event, Record};
use sealpost_config::Config;
use sealpost_queue::{Keyring, Queue, QueueOptions};
use sealpost_submission::{Runtime, Shared};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// How long sessions in flight may take to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the configuration comes from, for reloads.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A file given with --config.
    File(PathBuf),
    /// The embedded `config/sealpost.toml`.
    Embedded,
}

impl ConfigSource {
    /// Loads and validates the configuration.
    pub fn load(&self) -> Result<Config, sealpost_config::ConfigError> {
        match self {
            ConfigSource::File(p) => Config::load(p),
            ConfigSource::Embedded => Config::load_default(),
        }
    }
}

/// Opens the queue, generating the default key on first start.
pub fn open_queue(config: &Config) -> Result<Queue> {
    let key = config.queue_key_file();
    if !key.exists() && config.queue.key_file.is_none() {
        ensure_dir(&config.server.state_dir)?;
        Keyring::generate(&key)
            .with_context(|| format!("generating queue key {}", key.display()))?;
        tracing::warn!(
            key = %key.display(),
            "GENERATED A NEW QUEUE KEY inside state_dir. For production keep queue.key_file apart from the data (e.g. systemd LoadCredential=) and back it up: without it the queue cannot be read."
        );
    }
    let keys = Keyring::load(&key, &config.queue.previous_key_files)
        .with_context(|| format!("loading queue key (queue.key_file = {})", key.display()))?;
    let opts = QueueOptions {
        dir: config.queue_dir(),
        retry: config.queue.retry.iter().map(|d| d.0).collect(),
        lifetime: config.queue.lifetime.0,
        lease: Duration::from_secs(600),
    };
    Queue::open(opts, keys)
        .with_context(|| format!("opening the queue in {}", config.queue_dir().display()))
}

/// Opens the audit log.
pub fn open_audit(config: &Config) -> Result<AuditLog> {
    let path = config.audit_path();
    let opts = AuditOptions {
        path: path.clone(),
        rotate_bytes: config.audit.rotate_size.0,
    };
    AuditLog::open(opts).with_context(|| format!("opening the audit log {}", path.display()))
}

fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating state directory {}", dir.display()))
}

fn runtime(config: Config) -> Result<Runtime> {
    let (cert, key) = certs::listener_certificate(&config)?;
    Ok(Runtime::new(Arc::new(config), &cert, &key)?)
}

/// Runs the relay until SIGTERM or SIGINT.
pub async fn run(source: ConfigSource) -> Result<()> {
    // Handlers first: a SIGTERM that arrives while starting is then handled, not fatal.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let config = source.load()?;
    ensure_dir(&config.server.state_dir)?;
    let queue = open_queue(&config)?;
    if config.delivery.paused {
        // nothing would take the bodies kept for a first delivery; set before any listener
        queue.set_fresh_body_budget(0);
    }
    let audit = open_audit(&config)?;
    let outbox_task = connect_outbox(&queue, &audit).await?;
    let admin_path = config.admin_socket();
    let rt = runtime(config.clone())?;
    // The HTTP endpoint is bound before the SMTP listeners: once those accept, it does too.
    let metrics_task = match config.admin.http {
        Some(addr) => {
            let handle = http::install_recorder()?;
            // Bound here, before READY: a taken address fails the start, and the endpoint
            // accepts from the moment the relay says it is ready.
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin.http {addr}"))?;
            let gauges = tokio::spawn(http::queue_gauges(queue.clone()));
            let server = tokio::spawn(async move {
                if let Err(e) = http::serve(listener, handle).await {
                    tracing::error!(error = %format!("{e:#}"), "admin HTTP endpoint stopped");
                }
            });
            Some((gauges, server))
        }
        None => None,
    };
    let bound = sealpost_submission::bind(&config).await?;
    let (rt_tx, rt_rx) = watch::channel(Arc::new(rt));
    let (stop_tx, stop_rx) = watch::channel(false);
    let quarantine_task = tokio::spawn(audit_quarantined(queue.clone(), audit.clone()));
    let shared = Arc::new(Shared {
        runtime: rt_rx,
        queue: queue.clone(),
        audit: audit.clone(),
        connections: Arc::default(),
        rates: Default::default(),
        stopping: stop_rx.clone(),
        auth_slots: tokio::sync::Semaphore::new(sealpost_submission::auth_concurrency()),
    });
    let admin_task = {
        let (q, a, p) = (queue.clone(), audit.clone(), admin_path.clone());
        tokio::spawn(async move {
            if let Err(e) = admin::serve_socket(&p, q, a).await {
                tracing::error!(error = %format!("{e:#}"), "admin socket stopped");
            }
        })
    };
    let listeners = tokio::spawn(sealpost_submission::serve(
        bound,
        Arc::clone(&shared),
        stop_rx,
    ));
    let engine = sealpost_delivery::Engine::new(&config, queue.clone(), audit.clone())
        .context("starting the delivery engine")?;
    let (delivery_stop_tx, delivery_stop_rx) = watch::channel(false);
    let delivery = if config.delivery.paused {
        tracing::warn!("delivery.paused = true: mail is accepted and queued, nothing is delivered");
        tokio::spawn(async {})
    } else {
        tokio::spawn(engine.clone().run(delivery_stop_rx))
    };
    audit
        .record(Record::new(Event::Started).detail("version", env!("CARGO_PKG_VERSION")))
        .await?;
    tracing::info!(hostname = %config.server.hostname, "sealpost ready");
    systemd::ready("accepting mail");

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                systemd::reloading();
                reload(&source, &rt_tx, &engine, &audit).await;
                systemd::reloaded("accepting mail");
            }
        }
    }
    tracing::info!("stopping: no new connections; waiting for sessions in flight");
    systemd::stopping();
    let _ = stop_tx.send(true);
    let _ = listeners.await;
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while shared.connections.open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if shared.connections.open() > 0 {
        tracing::warn!(
            open = shared.connections.open(),
            "sessions still open at shutdown; nothing they sent was acknowledged"
        );
    }
    let _ = delivery_stop_tx.send(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, delivery).await.is_err() {
        tracing::warn!("deliveries still in flight at shutdown; their recipients stay queued and are retried after restart");
    }
    admin_task.abort();
    quarantine_task.abort();
    if let Some((gauges, server)) = metrics_task {
        gauges.abort();
        server.abort();
    }
    let _ = std::fs::remove_file(&admin_path);
    audit.record(Record::new(Event::Stopped)).await?;
    // The `stopped` record's sync made every outbox line before it durable: drop those rows
    // now, so a clean start has nothing to replay.
    outbox_task.abort();
    queue.set_outbox_sink(None);
    let through = *audit.outbox_durable().borrow();
    if through > 0 {
        if let Err(e) = queue.outbox_trim(through).await {
            tracing::warn!(error = %e, "could not drop logged audit records from the queue; the next start skips them");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// How often audit records the log has on disk are dropped from the queue.
const OUTBOX_TRIM_EVERY: Duration = Duration::from_secs(1);

/// Connects the queue's outbox to the audit log: appends the records a crash left in the queue
/// (those the log lacks), then hands each commit's records to the log and drops them from the
/// queue once the log has them on disk. Returns the task doing the dropping.
pub async fn connect_outbox(
    queue: &Queue,
    audit: &AuditLog,
) -> Result<tokio::task::JoinHandle<()>> {
    let pending = queue
        .outbox_pending()
        .await
        .context("reading the audit records waiting in the queue")?;
    if let Some(through) = audit
        .replay_outbox(pending)
        .await
        .context("appending the audit records waiting in the queue to the audit log")?
    {
        queue
            .outbox_trim(through)
            .await
            .context("dropping the audit records the log now holds from the queue")?;
    }
    let writer = audit.outbox_writer();
    queue.set_outbox_sink(Some(Arc::new(move |rows| writer.append(rows))));
    let mut durable = audit.outbox_durable();
    let queue = queue.clone();
    Ok(tokio::spawn(async move {
        // ends when the audit log closes
        while durable.changed().await.is_ok() {
            // Each drop is a queue write: gather a second's worth (a few thousand small rows
            // at full load) instead of one per audit sync.
            tokio::time::sleep(OUTBOX_TRIM_EVERY).await;
            let through = *durable.borrow_and_update();
            if let Err(e) = queue.outbox_trim(through).await {
                tracing::warn!(error = %e, "could not drop logged audit records from the queue; they are skipped at the next start");
            }
        }
    }))
}

/// Records an audit `quarantined` event for every message the queue moved aside.
async fn audit_quarantined(queue: Queue, audit: AuditLog) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        for id in queue.take_quarantined() {
            let rec = Record::new(Event::Quarantined)
                .queue_id(id.to_string())
                .detail(
                    "reason",
                    "record failed authentication (AES-GCM); moved aside, never delivered",
                );
            if let Err(e) = audit.record(rec).await {
                tracing::error!(error = %e, queue_id = %id, "audit write failed");
            }
        }
    }
}

async fn reload(
    source: &ConfigSource,
    rt_tx: &watch::Sender<Arc<Runtime>>,
    engine: &sealpost_delivery::Engine,
    audit: &AuditLog,
) {
    // Build everything first; apply only if all of it is good (the delivery engine last, as
    // its reload is the only step that takes effect by itself).
    let result = source
        .load()
        .map_err(anyhow::Error::from)
        .and_then(|config| {
            let rt = runtime(config.clone())?;
            engine
                .reload(&config)
                .context("applying the delivery configuration")?;
            Ok(rt)
        });
    let rec = match result {
        Ok(rt) => {
            rt_tx.send_replace(Arc::new(rt));
            tracing::info!("configuration reloaded");
            Record::new(Event::ConfigReloaded).detail("result", "ok")
        }
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::error!(error = %msg, "configuration reload refused; the previous configuration stays in force");
            Record::new(Event::ConfigReloaded)
                .detail("result", "refused")
                .detail("error", msg)
        }
    };
    if let Err(e) = audit.record(rec).await {
        tracing::error!(error = %e, "audit log write failed");
    }
}
