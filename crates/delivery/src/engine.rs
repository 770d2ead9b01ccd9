//! The queue manager: leases due messages, delivers each recipient domain under its policy,
//! reports outcomes to the queue and the audit log, and applies the fallback chain.

mod handoff;
mod notices;
mod relay;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sealpost_audit::{AuditLog, Event, Json, Record};
use sealpost_config::{Config, FallbackStep, Policy};
use sealpost_policy::{Evidence, PolicySpec, TlsRequirement, TrustStore, Verdict};
use sealpost_queue::{DueNow, Lease, LeasedRecipient, Outcome, Queue, QueueId};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::client::{
    open, ClientSettings, OpenError, RcptResult, Session, SessionError, Transaction, TxnRecipient,
};
use crate::dns::{HostAddrs, MxAnswer, MxResolver};
use crate::error::DeliveryError;
use crate::fallback::{decide_from, step_name, FallbackAction};
use crate::pool::{Pool, PoolKey};
use crate::smarthost::{resolve_smarthosts, SmarthostTarget};
use notices::Failure;

/// How long a verified session may sit idle before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest sleep of the scheduler when nothing is due.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Why a recipient stays queued when the audit log failed before its message was sent.
const AUDIT_DOWN: &str =
    "4.3.0 the audit log has failed: nothing is sent without its audit record; retried after a restart";
/// How long a stopping engine waits for hand-offs whose commits are still running.
const HANDOFF_DRAIN: Duration = Duration::from_secs(30);

/// How a delivery came to start (the `via` label of `sealpost_deliveries_started_total`).
#[derive(Clone, Copy, Debug)]
enum Via {
    /// Handed over by the queue right after the commit.
    Handoff,
    /// Leased from the due index (retries, and new messages when delivery was busy).
    Lease,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Handoff => "handoff",
            Via::Lease => "lease",
        }
    }
}

/// A policy resolved from the configuration: what TLS it requires and its fallback chain.
#[derive(Debug, Clone)]
pub struct ResolvedPolicy {
    /// The TLS requirement and pins.
    pub spec: PolicySpec,
    /// The `on_failure` chain.
    pub on_failure: Vec<FallbackStep>,
}

/// The delivery engine; start it with [`Engine::run`], swap its configuration with
/// [`Engine::reload`].
#[derive(Clone)]
pub struct Engine {
    current: Arc<std::sync::RwLock<Arc<Inner>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Inner {
    queue: Queue,
    audit: AuditLog,
    resolver: MxResolver,
    trust: TrustStore,
    settings: ClientSettings,
    /// Shared by every configuration version: connection limits hold across reloads.
    pool: Arc<Pool>,
    /// Audit records submitted per message and not yet known durable; awaited before the
    /// message's outcomes go to the queue, so one message's records share an fsync.
    unsynced: Arc<std::sync::Mutex<HashMap<String, Vec<sealpost_audit::Durable>>>>,
    hostname: String,
    listeners: Vec<SocketAddr>,
    retry: Vec<Duration>,
    policies: HashMap<String, ResolvedPolicy>,
    domains: HashMap<String, String>,
    smarthosts: HashMap<String, SmarthostTarget>,
    delay_notice: Option<Duration>,
    max_messages: usize,
}

/// The slots of messages delivered and waiting for their outcome to be recorded.
#[derive(Clone)]
struct Recording {
    /// One permit per delivered message whose outcome is being recorded (twice the delivery
    /// slots): a crash loses at most these records and the deliveries in progress, and those
    /// messages are delivered again after the restart.
    permits: Arc<Semaphore>,
    /// Signalled when a delivery gives its delivery slot back for one of these.
    freed: Arc<Notify>,
}

/// What a delivery round decided for a message, to be recorded in the queue.
struct Completion {
    id: QueueId,
    results: Vec<(usize, Outcome)>,
}

/// A recipient's result after a round, before reports go to the sender.
enum Fate {
    /// An outcome to record as is, with the evidence of the last rejected MX if any.
    Done(Outcome, Option<Box<Evidence>>),
    /// Failed for good: reported to the sender (or dropped for a null sender).
    Bounce(Failure),
}

/// Builds the policy table from `[policies]` (plus the built-in `phi` if not configured).
pub fn resolve_policies(config: &Config) -> Result<HashMap<String, ResolvedPolicy>, DeliveryError> {
    let mut out = HashMap::new();
    let builtin = Policy::phi_default();
    let configured = config.policies.iter().map(|(n, p)| (n.as_str(), p));
    let all = std::iter::once(("phi", &builtin)).chain(configured);
    for (name, policy) in all {
        let requirement = match policy.tls {
            sealpost_config::TlsRequirement::Verified => TlsRequirement::Verified,
            sealpost_config::TlsRequirement::Encrypted => TlsRequirement::Encrypted,
        };
        let mut spec = PolicySpec::new(name, requirement);
        for pin in &policy.pins {
            let bytes = hex::decode(pin)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok());
            let Some(bytes) = bytes else {
                return Err(DeliveryError::BadPin {
                    policy: name.to_owned(),
                    pin: pin.clone(),
                });
            };
            spec.pins.push(bytes);
        }
        out.insert(
            name.to_owned(),
            ResolvedPolicy {
                spec,
                on_failure: policy.on_failure.clone(),
            },
        );
    }
    Ok(out)
}

impl Engine {
    /// An engine for `config`, delivering from `queue` and auditing to `audit`.
    pub fn new(config: &Config, queue: Queue, audit: AuditLog) -> Result<Engine, DeliveryError> {
        let max = config.delivery.max_connections.max(1);
        let pool = Arc::new(Pool::new(
            max,
            config.delivery.max_connections_per_domain,
            IDLE_TIMEOUT,
        ));
        let inner = Inner::build(config, queue, audit, pool)?;
        Ok(Engine {
            current: Arc::new(std::sync::RwLock::new(Arc::new(inner))),
        })
    }

    /// Delivers `lease` in a task of its own, holding its message slot until it is done.
    fn start(
        &self,
        tasks: &mut JoinSet<()>,
        recording: &Recording,
        lease: Lease,
        permit: tokio::sync::OwnedSemaphorePermit,
        via: Via,
    ) {
        metrics::counter!("sealpost_deliveries_started_total", "via" => via.as_str()).increment(1);
        let inner = self.inner();
        let recording = recording.clone();
        tasks.spawn(async move {
            let done = inner.clone().deliver_message(lease).await;
            // Recording the outcome waits for the audit log's fsync and then the queue's commit,
            // and needs no connection: the delivery slot is given back as soon as a recording
            // slot is held, so that messages delivered and not yet recorded stay bounded.
            let held = recording.permits.clone().acquire_owned().await;
            drop(permit);
            recording.freed.notify_one();
            inner.complete(done).await;
            drop(held);
        });
    }

    /// The configuration in force now (deliveries already running keep the one they started with).
    fn inner(&self) -> Arc<Inner> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Applies a new configuration (SIGHUP): policies, domain overrides, smarthosts, trust
    /// anchors, DNS, retry schedule, delay notices. Connection limits
    /// (`delivery.max_connections*`) keep their start-up values. On error nothing changes.
    pub fn reload(&self, config: &Config) -> Result<(), DeliveryError> {
        let old = self.inner();
        let mut next = Inner::build(
            config,
            old.queue.clone(),
            old.audit.clone(),
            old.pool.clone(),
        )?;
        next.settings.greeting_timeout = old.settings.greeting_timeout;
        next.settings.command_timeout = old.settings.command_timeout;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        // Verified sessions were judged under the old policies: do not reuse them.
        for session in old.pool.drain(true) {
            tokio::spawn(session.quit());
        }
        Ok(())
    }

    /// The same engine with other client settings (tests shorten the RFC 5321 timeouts).
    /// Call before [`Engine::run`].
    pub fn with_settings(self, settings: ClientSettings) -> Engine {
        {
            let mut current = self
                .current
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut inner = Inner::clone(&current);
            inner.settings = settings;
            *current = Arc::new(inner);
        }
        self
    }

    /// Delivers due messages until `shutdown` turns true, then finishes deliveries in flight
    /// and closes idle connections.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let first = self.inner();
        let notify = first.queue.notify();
        let slots = Arc::new(Semaphore::new(first.max_messages));
        // Just-committed messages come straight from the queue while a slot is free; the
        // registration ends with this function, however it ends.
        let (handed_tx, mut handed) = tokio::sync::mpsc::unbounded_channel::<handoff::Handed>();
        let registration = handoff::Registration::new(
            first.queue.clone(),
            handoff::EngineHandoff {
                slots: slots.clone(),
                keep: (first.max_messages / 4).max(1),
                tx: handed_tx,
            },
        );
        let recording = Recording {
            permits: Arc::new(Semaphore::new(first.max_messages.saturating_mul(2))),
            freed: Arc::new(Notify::new()),
        };
        drop(first);
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut audit_down = false;
        tracing::info!("delivery engine started");
        loop {
            if *shutdown.borrow() {
                break;
            }
            while tasks.try_join_next().is_some() {}
            let inner = self.inner();
            if inner.audit.failed() {
                // Nothing leaves without its audit record (fail-closed, as submission refuses
                // new mail): nothing is leased, and hand-offs are given back (each message is
                // due again when its lease ends, or at the next start). A failed log stays
                // failed until the relay restarts.
                if !audit_down {
                    audit_down = true;
                    tracing::error!(
                        in_flight = tasks.len(),
                        "AUDIT LOG FAILED: delivery paused; queued mail waits until sealpost restarts with a working audit log"
                    );
                }
                tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = tokio::time::sleep(MAX_SLEEP) => {}
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    Some(handed) = handed.recv() => drop(handed),
                }
                continue;
            }
            while let Ok((lease, permit)) = handed.try_recv() {
                self.start(&mut tasks, &recording, lease, permit, Via::Handoff);
            }
            // Slots for as many messages as are due are taken before asking, so every lease
            // returned has one and the loop never waits for a slot. Only that many: hand-offs
            // keep the rest while the lease is committed.
            let free = slots.available_permits();
            let now = SystemTime::now();
            // What is due, and when the next is: `None` if the index could not be read.
            let due_now = if free == 0 {
                None
            } else {
                match inner.queue.due_now(now, free).await {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the due index");
                        None
                    }
                }
            };
            let due = due_now.map_or(0, |d| d.count);
            let mut permits = Vec::with_capacity(due);
            while permits.len() < due {
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let taken = permits.len();
            let mut leased = 0;
            if taken > 0 {
                match inner.queue.lease_due(now, taken).await {
                    Ok(leases) => {
                        for lease in leases {
                            let Some(permit) = permits.pop() else {
                                // cannot happen: at most `taken` leases; due again when it ends
                                tracing::error!(queue_id = %lease.id, "a lease without a slot");
                                continue;
                            };
                            leased += 1;
                            self.start(&mut tasks, &recording, lease, permit, Via::Lease);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot lease due messages"),
                }
            }
            drop(permits);
            if leased > 0 {
                continue;
            }
            for session in inner.pool.drain(false) {
                session.quit().await;
            }
            inner.queue.forget_stale_bodies();
            let wait = match due_now {
                _ if free == 0 => MAX_SLEEP,
                Some(DueNow {
                    next: Some(next), ..
                }) => next
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .clamp(Duration::from_millis(20), MAX_SLEEP),
                Some(DueNow { next: None, .. }) => MAX_SLEEP,
                // the index could not be read
                None => Duration::from_secs(5),
            };
            let until = tokio::time::Instant::now() + wait;
            // Nothing is due now (or no slot was free). A handed-over message starts at once; a
            // finished delivery matters only if messages wait for its slot (an outcome that
            // makes a message due again signals `notify`). So the wait goes on through those.
            let slot_limited = free == 0 || taken < due;
            loop {
                tokio::select! {
                    _ = notify.notified() => break,
                    _ = tokio::time::sleep_until(until) => break,
                    _ = shutdown.changed() => break,
                    _ = recording.freed.notified(), if slot_limited => break,
                    Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                        // A task that panicked gave its slot back without saying so.
                        if let Err(e) = joined {
                            tracing::error!(error = %e, "a delivery task failed; its message is due again when its lease ends");
                            if slot_limited {
                                break;
                            }
                        }
                    }
                    Some((lease, permit)) = handed.recv() => {
                        self.start(&mut tasks, &recording, lease, permit, Via::Handoff);
                    }
                }
            }
        }
        // No new hand-offs. Those already reserved are handed over (or given back) once their
        // commits return, which closes the channel; they are in flight and finished too.
        drop(registration);
        let drain = async {
            while let Some((lease, permit)) = handed.recv().await {
                if self.inner().audit.failed() {
                    // given back, as in the loop: due again when its lease ends
                    continue;
                }
                self.start(&mut tasks, &recording, lease, permit, Via::Handoff);
            }
        };
        if tokio::time::timeout(HANDOFF_DRAIN, drain).await.is_err() {
            tracing::warn!("a hand-off did not arrive while stopping; its message is due again after its lease");
        }
        tracing::info!(
            in_flight = tasks.len(),
            "delivery engine stopping; finishing deliveries in flight"
        );
        while tasks.join_next().await.is_some() {}
        for session in self.inner().pool.drain(true) {
            session.quit().await;
        }
        tracing::info!("delivery engine stopped");
    }
}

/// Counts what an audit record says happened (`/metrics`): recipient outcomes and TLS verdicts
/// (`verdict` is the one of the evidence an attempt record carries; none counts as unknown).
fn count(rec: &Record, verdict: Option<Verdict>) {
    use sealpost_audit::Event as E;
    match rec.event {
        E::Delivered | E::Deferred | E::Diverted | E::Bounced | E::Expired | E::Dropped => {
            metrics::counter!("sealpost_recipients_total", "outcome" => rec.event.as_str())
                .increment(1);
        }
        E::Attempt => {
            let verdict = verdict.map_or("unknown", Verdict::as_str);
            metrics::counter!("sealpost_tls_verdicts_total", "verdict" => verdict).increment(1);
        }
        _ => {}
    }
}

/// Records the time from acceptance to delivery of one recipient.
pub(crate) fn delivery_latency(arrival: SystemTime) {
    let seconds = SystemTime::now()
        .duration_since(arrival)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::histogram!("sealpost_delivery_seconds").record(seconds);
}

/// A recipient's domain in lower case, or `None` for an address without one.
fn domain_of(address: &str) -> Option<String> {
    let (_, domain) = address.rsplit_once('@')?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    (!domain.is_empty()).then_some(domain)
}

impl Inner {
    /// The reloadable part of the engine, built from a configuration.
    fn build(
        config: &Config,
        queue: Queue,
        audit: AuditLog,
        pool: Arc<Pool>,
    ) -> Result<Inner, DeliveryError> {
        let trust = TrustStore::new(&config.delivery.trust_anchors)?;
        let resolver = MxResolver::new(&config.dns.nameservers, config.dns.timeout.0)?;
        let settings = ClientSettings::new(
            config.server.hostname.clone(),
            config.delivery.port,
            config.delivery.connect_timeout.0,
        );
        let policies = resolve_policies(config)?;
        Ok(Inner {
            queue,
            audit,
            resolver,
            trust,
            settings,
            pool,
            unsynced: Arc::default(),
            hostname: config.server.hostname.to_ascii_lowercase(),
            listeners: config.listeners.iter().map(|l| l.address).collect(),
            retry: config.queue.retry.iter().map(|d| d.0).collect(),
            smarthosts: resolve_smarthosts(config, &policies),
            delay_notice: config.queue.delay_notice.map(|d| d.0),
            policies,
            domains: config
                .domains
                .iter()
                .map(|(d, o)| {
                    (
                        d.trim_end_matches('.').to_ascii_lowercase(),
                        o.policy.clone(),
                    )
                })
                .collect(),
            max_messages: config.delivery.max_connections.max(1).saturating_mul(2),
        })
    }

    /// Records an audit event. Events of a message are only submitted here; [`Inner::complete`]
    /// waits until they are on disk before it records the outcomes in the queue.
    async fn audit(&self, rec: Record) {
        self.audit_counted(rec, None, false).await;
    }

    /// Audits an attempt record with the TLS evidence (`tls`) whose verdict is `verdict`.
    async fn audit_tls(&self, rec: Record, tls: Json, verdict: Verdict) {
        self.audit_counted(rec.tls(tls), Some(verdict), false).await;
    }

    /// [`Inner::audit_tls`] for the attempt on a session that will carry the message: returns
    /// once the line is in the file, so a log that this record fails has failed by then and
    /// the transaction sees it (see `transact`).
    async fn audit_tls_before_sending(&self, rec: Record, tls: Json, verdict: Verdict) {
        self.audit_counted(rec.tls(tls), Some(verdict), true).await;
    }

    /// Hands `rec` to the audit log (waiting until its line is in the file if `written`).
    async fn audit_counted(&self, rec: Record, verdict: Option<Verdict>, written: bool) {
        count(&rec, verdict);
        let Some(id) = rec.queue_id.clone() else {
            if let Err(e) = self.audit.record(rec).await {
                tracing::error!(error = %e, "AUDIT LOG WRITE FAILED");
            }
            return;
        };
        // Nothing waits for these records but the queue's outcome (see `complete`), so their
        // fsync may wait a little for others to share it.
        let submitted = if written {
            self.audit.submit_soon_written(rec).await
        } else {
            self.audit.submit_soon(rec).await
        };
        match submitted {
            Ok(durable) => self
                .unsynced
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(id)
                .or_default()
                .push(durable),
            Err(e) => tracing::error!(error = %e, "AUDIT LOG WRITE FAILED"),
        }
    }

    /// Waits until every audit record submitted for message `id` is durable.
    async fn audit_synced(&self, id: QueueId) {
        let pending = self
            .unsynced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id.to_string())
            .unwrap_or_default();
        for durable in pending {
            if let Err(e) = durable.wait().await {
                tracing::error!(queue_id = %id, error = %e, "AUDIT LOG WRITE FAILED");
            }
        }
    }

    fn policy_for(&self, domain: &str, message_policy: &str) -> ResolvedPolicy {
        let name = self
            .domains
            .get(domain)
            .map(String::as_str)
            .unwrap_or(message_policy);
        match self.policies.get(name).or_else(|| self.policies.get("phi")) {
            Some(p) => p.clone(),
            None => ResolvedPolicy {
                spec: PolicySpec::new("phi", TlsRequirement::Verified),
                on_failure: Policy::phi_default().on_failure,
            },
        }
    }

    /// The retry interval after a recipient's `attempts` earlier attempts.
    fn retry_in(&self, attempts: u32) -> Duration {
        let index = usize::try_from(attempts).unwrap_or(usize::MAX);
        self.retry
            .get(index)
            .or(self.retry.last())
            .copied()
            .unwrap_or(Duration::from_secs(300))
    }

    /// Whether `ip` on the delivery port is one of our own listeners.
    fn is_self(&self, ip: IpAddr) -> bool {
        let target = SocketAddr::new(ip, self.settings.port);
        self.listeners.iter().any(|l| {
            *l == target
                || (l.ip().is_unspecified() && l.port() == target.port() && ip.is_loopback())
        })
    }

    /// Delivers a leased message; returns its outcomes, which [`Inner::complete`] records.
    async fn deliver_message(self: Arc<Self>, lease: Lease) -> Completion {
        let id = lease.id;
        let now = SystemTime::now();
        if self.queue.expired(&lease, now) {
            return self.expire(&lease).await;
        }
        let body = match self.queue.delivery_body(id).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot read message body; deferring");
                let results = lease
                    .recipients
                    .iter()
                    .map(|r| {
                        let reason = format!("4.3.0 cannot read the queued message: {e}");
                        (r.index, Outcome::Deferred { reason })
                    })
                    .collect();
                return Completion { id, results };
            }
        };
        let lease = Arc::new(lease);
        let mut by_domain: BTreeMap<String, Vec<LeasedRecipient>> = BTreeMap::new();
        let mut fates = Vec::new();
        for r in &lease.recipients {
            match domain_of(&r.address) {
                Some(d) => by_domain.entry(d).or_default().push(r.clone()),
                None => {
                    let reason = "5.1.3 recipient address has no domain".to_owned();
                    let words =
                        "the recipient address has no domain, so there is no server to deliver to"
                            .to_owned();
                    fates.push((r.index, Fate::Bounce(Failure::local(reason, words))));
                }
            }
        }
        let mut domains = JoinSet::new();
        for (domain, recipients) in by_domain {
            let (inner, lease, body) = (self.clone(), lease.clone(), body.clone());
            domains.spawn(async move {
                inner
                    .deliver_domain(&lease, &domain, recipients, &body)
                    .await
            });
        }
        while let Some(joined) = domains.join_next().await {
            match joined {
                Ok(r) => fates.extend(r),
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "a domain delivery task failed; its recipients return to the queue when the lease ends")
                }
            }
        }
        let mut results = Vec::new();
        let mut failures = Vec::new();
        let mut evidence = Vec::new();
        for (index, fate) in fates {
            match fate {
                Fate::Done(outcome, ev) => {
                    if let Some(ev) = ev {
                        evidence.push((index, *ev));
                    }
                    results.push((index, outcome));
                }
                Fate::Bounce(f) => failures.push((index, f)),
            }
        }
        self.delay_notices(&lease, &body, &results, &evidence).await;
        results.extend(self.bounce(&lease, &body, failures).await);
        Completion { id, results }
    }

    /// The queue lifetime is over: audit `expired`, then bounce every leased recipient.
    async fn expire(&self, lease: &Lease) -> Completion {
        let id = lease.id;
        let lifetime = sealpost_config::format_duration(self.queue.lifetime());
        let mut failures = Vec::new();
        for r in &lease.recipients {
            let last = r.last_error.clone().unwrap_or_else(|| "none".to_owned());
            let reason = format!(
                "5.4.7 expired: not delivered within the queue lifetime of {lifetime}; last error: {last}"
            );
            self.audit(
                Record::new(Event::Expired)
                    .queue_id(id.to_string())
                    .recipient(r.address.clone())
                    .detail("reason", reason.clone())
                    .detail("attempts", r.attempts),
            )
            .await;
            let words = format!(
                "Sealpost could not deliver the message within the queue lifetime of {lifetime} ({} attempts); the last attempt failed: {last}",
                r.attempts
            );
            failures.push((r.index, Failure::local(reason, words)));
        }
        tracing::warn!(queue_id = %id, recipients = failures.len(), "message expired");
        // The DSN carries the original headers; without a readable body it carries none.
        let original = match self.queue.body(id).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot read the expired message; its DSN carries no headers");
                Vec::new()
            }
        };
        let results = self.bounce(lease, &original, failures).await;
        Completion { id, results }
    }

    /// Records a delivered message's outcomes in the queue once their audit records are durable.
    async fn complete(&self, done: Completion) {
        let Completion { id, results } = done;
        // whatever happens next, the body is not needed in memory any more
        self.queue.forget_body(id);
        // The audit trail of what happened comes first (HIPAA 164.312(b)): outcomes are recorded
        // in the queue only once their audit records are on disk.
        self.audit_synced(id).await;
        if let Err(e) = self.queue.complete(id, results).await {
            tracing::error!(queue_id = %id, error = %e, "CANNOT RECORD DELIVERY OUTCOMES; the recipients become due again when the lease ends");
        }
    }

    async fn deliver_domain(
        &self,
        lease: &Lease,
        domain: &str,
        recipients: Vec<LeasedRecipient>,
        body: &[u8],
    ) -> Vec<(usize, Fate)> {
        let policy = self.policy_for(domain, &lease.envelope.policy);
        let Some(_permits) = self.pool.permits(domain).await else {
            return self
                .all_deferred(
                    lease,
                    &recipients,
                    "4.3.0 delivery is shutting down".to_owned(),
                )
                .await;
        };
        match self.resolver.mx(domain).await {
            MxAnswer::NullMx => {
                let reason =
                    format!("5.1.10 {domain} publishes a null MX (RFC 7505): it accepts no mail");
                let words = format!("the recipient's domain {domain} says it accepts no mail (it publishes a null MX record)");
                all_failed(&recipients, &reason, &words)
            }
            MxAnswer::NoSuchDomain(why) => {
                let reason = format!("5.1.2 recipient domain {domain} not found ({why})");
                let words = format!("the recipient's domain {domain} does not exist");
                all_failed(&recipients, &reason, &words)
            }
            MxAnswer::Temporary(why) => {
                let reason = format!("4.4.3 DNS lookup failed temporarily: {why}");
                self.all_deferred(lease, &recipients, reason).await
            }
            MxAnswer::Hosts(hosts) => {
                let mut failures = Vec::new();
                let mut looped = Vec::new();
                let mut connected_any = false;
                let mut last_evidence = None;
                for host in hosts {
                    if host.name == self.hostname {
                        looped.push(host.name.clone());
                        self.report_loop(lease, &host.name, None).await;
                        continue;
                    }
                    let ips = match self.resolver.addresses(&host.name).await {
                        HostAddrs::Found(ips) => ips,
                        HostAddrs::None(why) | HostAddrs::Temporary(why) => {
                            self.audit(
                                Record::new(Event::Attempt)
                                    .queue_id(lease.id.to_string())
                                    .mx(host.name.clone())
                                    .detail("policy", policy.spec.name.clone())
                                    .detail("error", why.clone()),
                            )
                            .await;
                            failures.push(why);
                            continue;
                        }
                    };
                    for ip in ips {
                        if self.is_self(ip) {
                            looped.push(format!("{} [{ip}]", host.name));
                            self.report_loop(lease, &host.name, Some(ip)).await;
                            continue;
                        }
                        connected_any = true;
                        // a stale cached session is dropped and the next one (in the end a new
                        // connection, which is never stale) takes the transaction
                        loop {
                            match self.session(lease, &policy, &host.name, ip).await {
                                Ok(session) => {
                                    if let Some(fates) = self
                                        .transact(lease, &policy, session, &recipients, body)
                                        .await
                                    {
                                        return fates;
                                    }
                                }
                                Err((why, evidence)) => {
                                    failures.push(why);
                                    last_evidence = Some(evidence);
                                    break;
                                }
                            }
                        }
                    }
                }
                if failures.is_empty() && !looped.is_empty() {
                    let reason = format!(
                        "4.4.6 mail loop: the MX for {domain} is this relay ({})",
                        looped.join(", ")
                    );
                    return self.all_deferred(lease, &recipients, reason).await;
                }
                if !connected_any {
                    // Only DNS trouble with the MX hosts' addresses: no server was judged.
                    let reason = format!(
                        "4.4.3 no address for any MX of {domain}: {}",
                        failures.join("; ")
                    );
                    return self.all_deferred(lease, &recipients, reason).await;
                }
                let failures = failures.join("; ");
                self.fallback(lease, &policy, &recipients, body, &failures, last_evidence)
                    .await
            }
        }
    }

    async fn report_loop(&self, lease: &Lease, mx: &str, ip: Option<IpAddr>) {
        tracing::error!(queue_id = %lease.id, mx, ip = ?ip, "MAIL LOOP: the MX is this relay itself; not connecting");
        let mut rec = Record::new(Event::Attempt)
            .queue_id(lease.id.to_string())
            .mx(mx.to_owned())
            .detail("error", "mail loop: the MX is this relay");
        if let Some(ip) = ip {
            rec = rec.ip(ip);
        }
        self.audit(rec).await;
    }

    /// A session to `mx` at `ip` that passed the policy (reused or new); audits the attempt.
    /// `Err` is a one-line summary of why this address failed, with the evidence.
    async fn session(
        &self,
        lease: &Lease,
        policy: &ResolvedPolicy,
        mx: &str,
        ip: IpAddr,
    ) -> Result<(Session, PoolKey), (String, Box<Evidence>)> {
        let key = PoolKey {
            mx: mx.to_owned(),
            ip,
            policy: policy.spec.name.clone(),
        };
        if let Some(session) = self.pool.take(&key) {
            tracing::debug!(queue_id = %lease.id, mx, transactions = session.transactions(), "reusing verified connection");
            let verdict = session.evidence().reason;
            self.audit_tls_before_sending(
                reused_attempt(lease, mx, ip),
                session.evidence_json(),
                verdict,
            )
            .await;
            return Ok((session, key));
        }
        match open(&self.settings, &self.trust, &policy.spec, mx, ip).await {
            Ok(session) => {
                self.audit_tls_before_sending(
                    Record::new(Event::Attempt)
                        .queue_id(lease.id.to_string())
                        .mx(mx.to_owned())
                        .ip(ip),
                    session.evidence_json(),
                    session.evidence().reason,
                )
                .await;
                Ok((session, key))
            }
            Err(OpenError::Rejected(evidence)) => {
                tracing::warn!(queue_id = %lease.id, mx, %ip, verdict = %evidence.reason, detail = evidence.detail.as_deref().unwrap_or(""), "MX did not pass the policy");
                let summary = format!(
                    "{mx} [{ip}]: {}{}",
                    evidence.reason,
                    evidence
                        .detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                );
                self.audit_tls(
                    Record::new(Event::Attempt)
                        .queue_id(lease.id.to_string())
                        .mx(mx.to_owned())
                        .ip(ip),
                    Json::of(&*evidence),
                    evidence.reason,
                )
                .await;
                Err((summary, evidence))
            }
            Err(OpenError::Session { evidence, detail }) => {
                tracing::warn!(queue_id = %lease.id, mx, %ip, detail, "session failed after a verified handshake");
                self.audit_tls(
                    Record::new(Event::Attempt)
                        .queue_id(lease.id.to_string())
                        .mx(mx.to_owned())
                        .ip(ip)
                        .detail("error", detail.clone()),
                    Json::of(&*evidence),
                    evidence.reason,
                )
                .await;
                Err((format!("{mx} [{ip}]: {detail}"), evidence))
            }
        }
    }

    /// Runs the transaction on `session`; `None` if the session was a stale cached one (audited),
    /// so the caller retries on another.
    async fn transact(
        &self,
        lease: &Lease,
        policy: &ResolvedPolicy,
        (mut session, key): (Session, PoolKey),
        recipients: &[LeasedRecipient],
        body: &[u8],
    ) -> Option<Vec<(usize, Fate)>> {
        let env = &lease.envelope;
        let rcpts: Vec<TxnRecipient> = recipients
            .iter()
            .map(|r| TxnRecipient {
                address: r.address.clone(),
                notify: r.notify.clone(),
                orcpt: r.orcpt.clone(),
            })
            .collect();
        let txn = Transaction {
            sender: &env.sender,
            recipients: &rcpts,
            body,
            eight_bit: env.eight_bit,
            smtputf8: env.smtputf8,
            ret: env.ret.as_deref(),
            envid: env.envid.as_deref(),
        };
        let mx = session.mx().to_owned();
        let ip = session.ip();
        let remote = format!("{mx} [{ip}]");
        if self.audit.failed() {
            // it failed since the message was leased, at the latest with this attempt's record:
            // not even MAIL FROM
            tracing::error!(queue_id = %lease.id, mx, "AUDIT LOG FAILED: the message is not sent");
            session.quit().await;
            return Some(
                self.all_deferred(lease, recipients, AUDIT_DOWN.to_owned())
                    .await,
            );
        }
        match session.send(&txn).await {
            Ok(results) => {
                if session.in_step() {
                    self.pool.put(key, session);
                }
                let mut out = Vec::new();
                for (r, result) in recipients.iter().zip(results) {
                    let base = Record::new(Event::Delivered)
                        .queue_id(lease.id.to_string())
                        .recipient(r.address.clone())
                        .mx(mx.clone())
                        .ip(ip)
                        .detail("policy", policy.spec.name.clone());
                    let fate = match result {
                        RcptResult::Delivered(reply) => {
                            delivery_latency(lease.arrival);
                            self.audit(base.detail("reply", reply)).await;
                            Fate::Done(
                                Outcome::Delivered {
                                    remote: remote.clone(),
                                },
                                None,
                            )
                        }
                        RcptResult::Deferred(reason) => {
                            let mut rec = base.detail("reason", reason.clone());
                            rec.event = Event::Deferred;
                            self.audit(rec).await;
                            Fate::Done(Outcome::Deferred { reason }, None)
                        }
                        // audited as bounced (or dropped) once the DSN is queued
                        RcptResult::Failed(reason) => {
                            Fate::Bounce(Failure::from_reply(&mx, &reason))
                        }
                    };
                    out.push((r.index, fate));
                }
                tracing::info!(queue_id = %lease.id, mx, recipients = out.len(), "transaction finished");
                Some(out)
            }
            Err(e @ SessionError::Stale(_)) => {
                tracing::info!(queue_id = %lease.id, mx, error = %e, "cached connection no longer usable; trying another");
                self.audit(reused_attempt(lease, &mx, ip).detail("error", e.to_string()))
                    .await;
                None
            }
            Err(e) => {
                tracing::warn!(queue_id = %lease.id, mx, error = %e, "session failed during the transaction");
                let reason = format!("4.4.2 {remote}: {e}");
                Some(self.all_deferred(lease, recipients, reason).await)
            }
        }
    }

    /// Applies the policy's fallback chain to recipients no MX accepted: hold, bounce, or relay
    /// through a smarthost (a failed smarthost continues the chain at the next step).
    async fn fallback(
        &self,
        lease: &Lease,
        policy: &ResolvedPolicy,
        recipients: &[LeasedRecipient],
        body: &[u8],
        failures: &str,
        evidence: Option<Box<Evidence>>,
    ) -> Vec<(usize, Fate)> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        let mut pending: Vec<(LeasedRecipient, usize, String)> = recipients
            .iter()
            .map(|r| (r.clone(), 0, failures.to_owned()))
            .collect();
        while !pending.is_empty() {
            if self.audit.failed() {
                // nothing is decided (or relayed) without its audit record
                for (r, _, _) in std::mem::take(&mut pending) {
                    let outcome = Outcome::Deferred {
                        reason: AUDIT_DOWN.to_owned(),
                    };
                    out.push((r.index, Fate::Done(outcome, None)));
                }
                break;
            }
            let mut relays: BTreeMap<(usize, String), (Vec<LeasedRecipient>, String)> =
                BTreeMap::new();
            for (r, from, failures) in std::mem::take(&mut pending) {
                let retry_in = self.retry_in(r.attempts);
                let base = Record::new(Event::Diverted)
                    .queue_id(lease.id.to_string())
                    .recipient(r.address.clone())
                    .detail("policy", policy.spec.name.clone())
                    .detail("failures", failures.clone());
                let action = decide_from(&policy.on_failure, from, lease.arrival, now, retry_in);
                let name = match &action {
                    FallbackAction::Hold { step, .. }
                    | FallbackAction::Bounce { step }
                    | FallbackAction::Smarthost { step, .. } => policy
                        .on_failure
                        .get(*step)
                        .map(step_name)
                        .unwrap_or_default(),
                    FallbackAction::Unavailable { name, .. } => name.clone(),
                    FallbackAction::Exhausted => String::new(),
                };
                let policy_name = &policy.spec.name;
                let fate = match action {
                    FallbackAction::Hold {
                        step,
                        retry_at,
                        ends,
                    } => {
                        let reason = format!(
                            "4.7.5 no MX passed policy {policy_name}: {failures}; held ({name}), retrying the secure path"
                        );
                        let rec = base
                            .detail("step", name)
                            .detail("reason", reason.clone())
                            .detail("hold_ends", rfc3339(ends))
                            .detail("retry_at", rfc3339(retry_at));
                        self.audit(rec).await;
                        let step = u32::try_from(step).unwrap_or(u32::MAX);
                        let outcome = Outcome::Held {
                            until: retry_at,
                            step,
                            reason,
                        };
                        Fate::Done(outcome, evidence.clone())
                    }
                    FallbackAction::Bounce { .. } => {
                        let reason = format!(
                            "no MX passed policy {policy_name}: {failures}; bounced (fallback step `{name}`)"
                        );
                        self.audit(base.detail("step", name).detail("reason", reason.clone()))
                            .await;
                        let failure = match &evidence {
                            Some(ev) => {
                                let f = Failure::from_evidence(ev, String::new());
                                Failure {
                                    reason: format!("{} {reason}", f.status),
                                    ..f
                                }
                            }
                            None => Failure::local(format!("5.7.5 {reason}"), reason.clone()),
                        };
                        Fate::Bounce(failure)
                    }
                    FallbackAction::Smarthost { step, name: host } => {
                        let reason = format!(
                            "no MX passed policy {policy_name}: {failures}; relaying through smarthost `{host}`"
                        );
                        self.audit(base.detail("step", name).detail("reason", reason))
                            .await;
                        relays
                            .entry((step, host))
                            .or_insert_with(|| (Vec::new(), failures.clone()))
                            .0
                            .push(r);
                        continue;
                    }
                    FallbackAction::Unavailable { .. } => {
                        let reason = format!(
                            "4.7.5 no MX passed policy {policy_name}: {failures}; fallback step `{name}` is not available in this version, so the recipient stays queued and the secure path is retried"
                        );
                        let mut rec = base.detail("step", name).detail("reason", reason.clone());
                        rec.event = Event::Deferred;
                        self.audit(rec).await;
                        Fate::Done(Outcome::Deferred { reason }, evidence.clone())
                    }
                    FallbackAction::Exhausted => {
                        let reason = format!(
                            "4.7.5 no MX passed policy {policy_name}: {failures}; fallback chain used up, retrying the secure path"
                        );
                        let mut rec = base.detail("reason", reason.clone());
                        rec.event = Event::Deferred;
                        self.audit(rec).await;
                        Fate::Done(Outcome::Deferred { reason }, evidence.clone())
                    }
                };
                out.push((r.index, fate));
            }
            for ((step, host), (rs, failures)) in relays {
                let relayed = self.relay(lease, &host, rs, body).await;
                out.extend(
                    relayed
                        .delivered
                        .into_iter()
                        .map(|(i, o)| (i, Fate::Done(o, None))),
                );
                let why = format!("{failures}; {}", relayed.why);
                pending.extend(relayed.rest.into_iter().map(|r| (r, step + 1, why.clone())));
            }
        }
        tracing::warn!(queue_id = %lease.id, recipients = out.len(), policy = %policy.spec.name, "no MX passed the policy; fallback applied");
        out
    }

    async fn all_deferred(
        &self,
        lease: &Lease,
        recipients: &[LeasedRecipient],
        reason: String,
    ) -> Vec<(usize, Fate)> {
        let mut out = Vec::new();
        for r in recipients {
            self.audit(
                Record::new(Event::Deferred)
                    .queue_id(lease.id.to_string())
                    .recipient(r.address.clone())
                    .detail("reason", reason.clone()),
            )
            .await;
            let outcome = Outcome::Deferred {
                reason: reason.clone(),
            };
            out.push((r.index, Fate::Done(outcome, None)));
        }
        out
    }
}

/// Every recipient failed for the same local reason (audited once the DSN is queued).
fn all_failed(recipients: &[LeasedRecipient], reason: &str, words: &str) -> Vec<(usize, Fate)> {
    recipients
        .iter()
        .map(|r| {
            let f = Failure::local(reason.to_owned(), words.to_owned());
            (r.index, Fate::Bounce(f))
        })
        .collect()
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()
}

/// The audit record of an attempt on a cached session.
fn reused_attempt(lease: &Lease, mx: &str, ip: IpAddr) -> Record {
    Record::new(Event::Attempt)
        .queue_id(lease.id.to_string())
        .mx(mx.to_owned())
        .ip(ip)
        .detail("reused", true)
}

#[cfg(test)]
mod audit_down_tests;
#[cfg(test)]
mod loop_tests;
#[cfg(test)]
mod test_engine;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealpost.toml");
        let text = format!(
            "[server]\nhostname = \"relay.unit.test\"\nstate_dir = \"{}\"\n\n\
             [[listeners]]\naddress = \"127.0.0.1:2587\"\nmode = \"starttls\"\n\n{extra}",
            dir.path().display()
        );
        std::fs::write(&path, text).unwrap();
        Config::load_with_env_prefix(&path, "SEALPOST_UNIT_TEST_NONE_").unwrap()
    }

    #[test]
    fn policies_resolve_with_pins_and_the_builtin_phi() {
        let (pin1, pin2) = ("ab".repeat(32), "CD".repeat(32));
        let cfg = config(&format!(
            "[policies.partner]\ntls = \"verified\"\npins = [\"{pin1}\", \"{pin2}\"]\non_failure = [\"hold:1h\"]\n\n\
             [policies.notices]\ntls = \"encrypted\"\n"
        ));
        let table = resolve_policies(&cfg).unwrap();
        let phi = &table["phi"];
        assert_eq!(phi.spec.requirement, TlsRequirement::Verified);
        assert_eq!(phi.on_failure, Policy::phi_default().on_failure);
        let partner = &table["partner"];
        assert_eq!(partner.spec.pins, vec![[0xab; 32], [0xcd; 32]]);
        assert_eq!(
            partner.on_failure,
            vec![FallbackStep::Hold(Duration::from_secs(3600))]
        );
        assert_eq!(table["notices"].spec.requirement, TlsRequirement::Encrypted);
    }

    #[test]
    fn a_malformed_pin_is_refused_naming_the_policy() {
        // Config validation refuses such pins too; the engine does not rely on it.
        let mut cfg = config("[policies.partner]\ntls = \"verified\"\n");
        if let Some(p) = cfg.policies.get_mut("partner") {
            p.pins = vec!["abcd".to_owned()];
        }
        let err = resolve_policies(&cfg).unwrap_err();
        assert!(
            matches!(err, DeliveryError::BadPin { ref policy, .. } if policy == "partner"),
            "{err}"
        );
    }

    #[test]
    fn domains_are_lower_case_without_trailing_dot() {
        assert_eq!(domain_of("a@Example.ORG."), Some("example.org".to_owned()));
        assert_eq!(domain_of("\"x@y\"@b.test"), Some("b.test".to_owned()));
        assert_eq!(domain_of("nodomain"), None);
        assert_eq!(domain_of("a@"), None);
    }
}
