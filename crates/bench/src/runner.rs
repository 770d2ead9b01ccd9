//! `sealpost-bench run`: one invocation that sets up the bench CA, the sink and DNS, runs the
//! same load through Sealpost and Postfix, the scale rows, and prints one table.

use crate::ca::{roots, BenchCa};
use crate::client::{Client, Security};
use crate::error::BenchError;
use crate::load::{self, LoadOptions, LoadReport};
use crate::mix::{human_size, SizeMix};
use crate::postfix::{self, Postfix, PostfixOptions};
use crate::procfs::{group_cpu_secs, status_kb, PeakSampler};
use crate::relay::{hash_password, Relay, RelaySetup, BENCH_USER, RELAY_HOSTNAME};
use crate::report::{IdleReport, Report, Row, StartReport, OPEN_50K_TAG, POSTFIX_50K_TAG};
use crate::sink::Sink;
use sealpost_tests::dns::DnsServer;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Name of the sink's certificate and MX host.
pub const SINK_NAME: &str = "mx.bench.test";
/// The recipient domain (MX → the sink).
pub const RCPT_DOMAIN: &str = "bench.test";
/// Envelope sender and From.
pub const SENDER: &str = "bench@clinic.bench.test";
const PASSWORD: &str = "bench-password-not-secret";

/// Whether to run the Postfix rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostfixMode {
    /// Run them if Postfix is installed.
    Auto,
    /// Fail if Postfix is not installed.
    Require,
    /// Do not run them.
    Skip,
}

/// Options of a full run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The `sealpost` binary to benchmark.
    pub sealpost_bin: PathBuf,
    /// Where to put state, configs and logs (a temp dir if `None`, removed at the end).
    pub work_dir: Option<PathBuf>,
    /// Messages per comparison row.
    pub messages: u64,
    /// Concurrent sessions of every load.
    pub sessions: usize,
    /// Sessions of the STARTTLS+AUTH row.
    pub auth_sessions: usize,
    /// Size mix of the comparison rows.
    pub mix: SizeMix,
    /// Open-loop rate (messages/s) or closed loop.
    pub rate: Option<f64>,
    /// Messages of the 50 KB row (0 skips it).
    pub fifty_kb_messages: u64,
    /// Open-loop rates of the 50 KB rows after the closed-loop one (messages/s).
    pub fifty_kb_rates: Vec<f64>,
    /// Messages of each acceptance-only scale row.
    pub accept_messages: u64,
    /// Runs of each acceptance-only row, alternating empty and queued; the median is reported.
    pub accept_repeats: usize,
    /// Messages already queued for the scale rows (0 skips them).
    pub queued: u64,
    /// Body size of the queued messages.
    pub queued_size: usize,
    /// Idle sessions for the memory row (0 skips it).
    pub idle_sessions: usize,
    /// Postfix rows.
    pub postfix: PostfixMode,
    /// Also run Postfix with `smtp_tls_connection_reuse = yes`.
    pub postfix_tls_reuse: bool,
    /// `delivery.max_connections_per_domain` for Sealpost.
    pub per_domain: usize,
    /// Longest wait for the sink to receive a row's messages.
    pub delivery_timeout: Duration,
    /// Longest wait for Sealpost to greet after starting.
    pub start_timeout: Duration,
    /// Progress lines on stderr.
    pub progress: bool,
}

struct Env {
    work: PathBuf,
    ca: BenchCa,
    relay_cert: crate::ca::Leaf,
    sink: Sink,
    dns: DnsServer,
    hash: String,
    opts: RunOptions,
}

fn say(msg: &str) {
    eprintln!("== {msg}");
}

impl Env {
    fn relay_setup(&self, name: &str, paused: bool) -> RelaySetup {
        RelaySetup {
            bin: self.opts.sealpost_bin.clone(),
            dir: self.work.join(name),
            cert: self.relay_cert.chain_pem.clone(),
            key: self.relay_cert.key_pem.clone(),
            ca: self.ca.root_pem().to_path_buf(),
            dns: self.dns.addr,
            sink_port: self.sink.addr.port(),
            password_hash: self.hash.clone(),
            paused,
            per_domain: self.opts.per_domain,
        }
    }

    fn load_opts(&self, tag: &str, target: SocketAddr, security: Security) -> LoadOptions {
        LoadOptions {
            target,
            security,
            sessions: self.opts.sessions,
            total: self.opts.messages,
            mix: self.opts.mix.clone(),
            rate: self.opts.rate,
            tag: tag.to_string(),
            from: SENDER.to_string(),
            rcpt_domain: RCPT_DOMAIN.to_string(),
            progress: self.opts.progress,
        }
    }

    fn auth_security(&self) -> Result<Security, BenchError> {
        Security::starttls(
            roots(self.ca.root_pem())?,
            RELAY_HOSTNAME,
            BENCH_USER,
            PASSWORD,
        )
    }

    async fn start_relay(&self, name: &str, paused: bool) -> Result<Relay, BenchError> {
        let setup = self.relay_setup(name, paused);
        let timeout = self.opts.start_timeout;
        tokio::task::spawn_blocking(move || Relay::start(&setup, timeout))
            .await
            .map_err(|_| BenchError::Option {
                option: "run",
                detail: "relay start task failed".into(),
            })?
    }

    async fn wait_delivered(&self, tag: &str, n: u64, what: &str) -> Result<(), BenchError> {
        let t0 = Instant::now();
        while self.sink.count(tag) < n {
            if t0.elapsed() > self.opts.delivery_timeout {
                return Err(BenchError::Timeout {
                    what: format!(
                        "{what}: the sink got {} of {n} messages",
                        self.sink.count(tag)
                    ),
                    secs: self.opts.delivery_timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Runs one end-to-end row against a system whose process (group) is `pid`.
    /// Starts a fresh Postfix, runs one end-to-end row through it and stops it again.
    async fn postfix_row(
        &self,
        tag: &str,
        label: &str,
        tls_reuse: bool,
        shape: impl FnOnce(&mut LoadOptions),
        report: &mut Report,
    ) -> Result<Row, BenchError> {
        let pf_addr = SocketAddr::new(
            Ipv4Addr::LOCALHOST.into(),
            crate::relay::free_addr()?.port(),
        );
        let po = PostfixOptions {
            listen: pf_addr,
            hostname: "postfix.bench.test".into(),
            relay: self.sink.addr,
            relay_name: SINK_NAME.into(),
            ca_file: self.ca.root_pem().to_path_buf(),
            tls_reuse,
        };
        say(&format!("starting Postfix ({tag})"));
        let pf = tokio::task::spawn_blocking(move || Postfix::start(&po))
            .await
            .map_err(|_| BenchError::Option {
                option: "run",
                detail: "postfix start task failed".into(),
            })??;
        let pid = pf.master_pid()?;
        let mut lo = self.load_opts(tag, pf.listen, Security::Plain);
        shape(&mut lo);
        let row = self.e2e_row(label, "postfix", lo, pid, true).await;
        let row = row.map_err(|e| with_log(e, &pf.log()))?;
        report.postfix_queue_left += pf.queued();
        Ok(row)
    }

    async fn e2e_row(
        &self,
        label: &str,
        system: &str,
        lo: LoadOptions,
        pid: u32,
        group_rss: bool,
    ) -> Result<Row, BenchError> {
        say(&format!(
            "{label}: {} messages, {} sessions",
            lo.total, lo.sessions
        ));
        let tag = lo.tag.clone();
        let load0 = crate::procfs::loadavg();
        let ticks0 = crate::procfs::machine_ticks();
        let cpu0 = group_cpu_secs(pid)?;
        let own0 = own_cpu_secs();
        let hs0 = self.sink.handshakes();
        // Only a process group needs sampling; a single process keeps its own peak (VmHWM).
        // Sampling costs the machine CPU: each `smaps_rollup` read walks the page tables.
        let sampler = group_rss.then(|| PeakSampler::start(pid));
        let report = load::run(lo).await?;
        self.wait_delivered(&tag, report.accepted, label).await?;
        let cpu1 = group_cpu_secs(pid)?;
        let (peak_kb, pss) = match sampler {
            Some(sampler) => {
                let (rss, pss) = sampler.finish();
                (rss, Some(pss))
            }
            None => (status_kb(pid, "VmHWM").unwrap_or(0), None),
        };
        let sink = self.sink.report(&tag);
        let mut row = Row::new(label, system, report, Some(sink), peak_kb, cpu1 - cpu0);
        row.peak_pss_kb = pss;
        row.bench_cpu_secs = own_cpu_secs() - own0;
        row.tls_handshakes = Some(self.sink.handshakes() - hs0);
        row.loadavg = (load0, crate::procfs::loadavg());
        row.steal_percent = crate::procfs::steal_percent(ticks0, crate::procfs::machine_ticks());
        Ok(row)
    }

    async fn accept_row(&self, label: &str, lo: LoadOptions, pid: u32) -> Result<Row, BenchError> {
        say(&format!(
            "{label}: {} messages, {} sessions",
            lo.total, lo.sessions
        ));
        let dropped = settle_memory().await;
        let load0 = crate::procfs::loadavg();
        let ticks0 = crate::procfs::machine_ticks();
        let cpu0 = group_cpu_secs(pid)?;
        let report: LoadReport = load::run(lo).await?;
        let cpu1 = group_cpu_secs(pid)?;
        let peak = status_kb(pid, "VmHWM").unwrap_or(0);
        let mut row = Row::new(label, "sealpost", report, None, peak, cpu1 - cpu0);
        row.loadavg = (load0, crate::procfs::loadavg());
        row.steal_percent = crate::procfs::steal_percent(ticks0, crate::procfs::machine_ticks());
        row.page_cache_dropped = Some(dropped);
        Ok(row)
    }
}

/// Opens `n` sessions (plain after EHLO, or after STARTTLS + EHLO) and reports the growth of
/// the relay's resident memory per session.
async fn idle_sessions(
    relay: &Relay,
    n: usize,
    tls: Option<&Security>,
) -> Result<IdleReport, BenchError> {
    let pid = relay.pid();
    let before = status_kb(pid, "VmRSS").unwrap_or(0);
    let mut clients = Vec::with_capacity(n);
    let (addr, tls_parts) = match tls {
        Some(Security::StartTls {
            connector,
            server_name,
            ..
        }) => (
            relay.starttls,
            Some((connector.clone(), server_name.clone())),
        ),
        _ => (relay.plain, None),
    };
    let mut pending = tokio::task::JoinSet::new();
    let mut opened = 0;
    while opened < n || !pending.is_empty() {
        while opened < n && pending.len() < 50 {
            let parts = tls_parts.clone();
            pending.spawn(async move {
                let t = parts.as_ref().map(|(c, s)| (c, s));
                Client::connect_idle(addr, "idle.bench.test", t).await
            });
            opened += 1;
        }
        if let Some(Ok(c)) = pending.join_next().await {
            clients.push(c?);
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = status_kb(pid, "VmRSS").unwrap_or(0);
    let open = clients.len();
    drop(clients);
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(IdleReport {
        kind: if tls.is_some() {
            "STARTTLS + EHLO"
        } else {
            "plain + EHLO"
        }
        .to_string(),
        sessions: open,
        rss_before_kb: before,
        rss_after_kb: after,
        per_session_kb: after.saturating_sub(before) as f64 / open.max(1) as f64,
    })
}

async fn prefill_subprocess(dir: &Path, count: u64, size: usize) -> Result<f64, BenchError> {
    let me = std::env::current_exe().map_err(|e| BenchError::io("locating", "current exe", e))?;
    let key = crate::relay::ensure_key(dir)?;
    let queue_dir = dir.join("state").join("queue");
    let out = tokio::process::Command::new(&me)
        .arg("prefill")
        .arg("--queue-dir")
        .arg(&queue_dir)
        .arg("--key")
        .arg(&key)
        .arg("--count")
        .arg(count.to_string())
        .arg("--size")
        .arg(format!("{size}B"))
        .output()
        .await
        .map_err(|e| BenchError::io("running", &me, e))?;
    if !out.status.success() {
        return Err(BenchError::Program {
            program: "sealpost-bench prefill".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let rep: crate::prefill::PrefillReport = serde_json::from_slice(&out.stdout)?;
    Ok(rep.secs)
}

/// Runs everything and returns the report (the caller prints and writes it).
pub async fn run(opts: RunOptions) -> Result<Report, BenchError> {
    let tmp;
    let work = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| BenchError::io("creating", d, e))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("sealpost-bench-")
                .tempdir()
                .map_err(|e| BenchError::io("creating", "temp dir", e))?;
            tmp.path().to_path_buf()
        }
    };
    let run_postfix = match opts.postfix {
        PostfixMode::Skip => false,
        PostfixMode::Auto => postfix::installed(),
        PostfixMode::Require => {
            if !postfix::installed() {
                return Err(BenchError::Program {
                    program: postfix::POSTFIX.into(),
                    detail: "not installed (apt-get install postfix)".into(),
                });
            }
            true
        }
    };
    say(&format!("work dir {}", work.display()));
    let ca = BenchCa::create(&work.join("ca"))?;
    let sink_cert = ca.issue("sink", &[SINK_NAME])?;
    let relay_cert = ca.issue("relay", &[RELAY_HOSTNAME, "127.0.0.1"])?;
    let sink = Sink::start(
        "127.0.0.1:0"
            .parse()
            .map_err(|_| BenchError::ServerName("127.0.0.1:0".into()))?,
        SINK_NAME,
        &sink_cert.chain_pem,
        &sink_cert.key_pem,
    )
    .await?;
    let dns = DnsServer::try_start()
        .await
        .map_err(|e| BenchError::net("starting the bench DNS server", e))?;
    dns.mx_at(RCPT_DOMAIN, SINK_NAME, Ipv4Addr::LOCALHOST);
    let hash = {
        let bin = opts.sealpost_bin.clone();
        tokio::task::spawn_blocking(move || hash_password(&bin, PASSWORD))
            .await
            .map_err(|_| BenchError::Option {
                option: "run",
                detail: "hash task failed".into(),
            })??
    };
    let env = Env {
        work: work.clone(),
        ca,
        relay_cert,
        sink,
        dns,
        hash,
        opts: opts.clone(),
    };
    let mut report = Report::new(&opts, run_postfix);

    // 1. Comparison: plain SMTP from loopback, the same load through each system.
    let relay = env.start_relay("sealpost-plain", false).await?;
    let lo = env.load_opts("sealpost-plain", relay.plain, Security::Plain);
    let row = env
        .e2e_row("Sealpost, plain SMTP", "sealpost", lo, relay.pid(), false)
        .await;
    let log = relay.log();
    relay.stop();
    report.rows.push(row.map_err(|e| with_log(e, &log))?);

    let mut postfix_rows = vec![("postfix-plain", "Postfix, plain SMTP", false)];
    if opts.postfix_tls_reuse {
        postfix_rows.push((
            "postfix-reuse",
            "Postfix, plain SMTP, smtp_tls_connection_reuse = yes",
            true,
        ));
    }
    for (tag, label, tls_reuse) in postfix_rows.into_iter().filter(|_| run_postfix) {
        let row = env
            .postfix_row(tag, label, tls_reuse, |_| {}, &mut report)
            .await?;
        report.rows.push(row);
    }

    // 2. Sealpost alone: STARTTLS + AUTH submission.
    let relay = env.start_relay("sealpost-auth", false).await?;
    let mut lo = env.load_opts("sealpost-auth", relay.starttls, env.auth_security()?);
    lo.sessions = opts.auth_sessions;
    let row = env
        .e2e_row(
            "Sealpost, STARTTLS + AUTH",
            "sealpost",
            lo,
            relay.pid(),
            false,
        )
        .await;
    let log = relay.log();
    relay.stop();
    report.rows.push(row.map_err(|e| with_log(e, &log))?);

    // 3. The latency target's load: 50 KB messages only, closed loop (saturation) and open
    //    loop at fixed rates (latency below saturation), each from a settled page cache.
    let loads = if opts.fifty_kb_messages == 0 {
        Vec::new()
    } else {
        std::iter::once(None)
            .chain(opts.fifty_kb_rates.iter().copied().map(Some))
            .collect()
    };
    for rate in loads {
        let tag = match rate {
            None => "sealpost-50k".to_string(),
            Some(r) => format!("{OPEN_50K_TAG}{r}"),
        };
        let tag = tag.as_str();
        let dropped = match rate {
            Some(_) => Some(settle_memory().await),
            None => None,
        };
        let relay = env.start_relay(tag, false).await?;
        let mut lo = env.load_opts(tag, relay.plain, Security::Plain);
        lo.total = opts.fifty_kb_messages;
        lo.mix = SizeMix::parse("100:50KB")?;
        lo.rate = rate;
        let label = match rate {
            None => format!(
                "Sealpost, plain, {} sessions × 50 KB, closed loop",
                lo.sessions
            ),
            Some(r) => format!(
                "Sealpost, plain, {} sessions × 50 KB, open loop {r} msg/s",
                lo.sessions
            ),
        };
        let row = env
            .e2e_row(&label, "sealpost", lo, relay.pid(), false)
            .await
            .map(|mut row| {
                row.page_cache_dropped = dropped;
                row
            });
        let log = relay.log();
        relay.stop();
        report.rows.push(row.map_err(|e| with_log(e, &log))?);
    }

    if run_postfix && opts.fifty_kb_messages > 0 {
        // Postfix at saturation on the closed-loop 50 KB load, for the latency target's
        // comparison. After the open-loop rows: Postfix deletes a queue file per message, and
        // rows right after that stall on this VM's disk (docs/benchmarks.md, "Stalls").
        let (n, mix) = (opts.fifty_kb_messages, SizeMix::parse("100:50KB")?);
        let row = env
            .postfix_row(
                POSTFIX_50K_TAG,
                "Postfix, plain, 50 sessions × 50 KB, closed loop",
                false,
                |lo| {
                    lo.total = n;
                    lo.mix = mix;
                },
                &mut report,
            )
            .await?;
        report.rows.push(row);
    }

    // 4. Scale rows (delivery paused): idle sessions, start time, acceptance with 0 and N queued.
    if opts.idle_sessions > 0 {
        // Each on a fresh process: after a load, freed memory would be reused and hide the cost.
        let sec = env.auth_security()?;
        for (name, tls) in [("idle-plain", None), ("idle-tls", Some(&sec))] {
            say(&format!("{} idle sessions ({name})", opts.idle_sessions));
            let relay = env.start_relay(name, true).await?;
            let idle = idle_sessions(&relay, opts.idle_sessions, tls).await;
            let log = relay.log();
            relay.stop();
            report.idle.push(idle.map_err(|e| with_log(e, &log))?);
        }
    }
    let queued_relay = if opts.queued > 0 {
        let dir = work.join("scale-queued");
        say(&format!(
            "prefilling {} messages of {}",
            opts.queued,
            human_size(opts.queued_size)
        ));
        let prefill_secs = prefill_subprocess(&dir, opts.queued, opts.queued_size).await?;
        let relay = env.start_relay("scale-queued", true).await?;
        report.start = Some(StartReport {
            queued: opts.queued,
            queued_size: opts.queued_size,
            prefill_secs,
            start_secs: relay.start_time.as_secs_f64(),
        });
        Some(relay)
    } else {
        None
    };
    if opts.accept_messages > 0 {
        // Empty and queued runs alternate so that both see the same machine; each starts from
        // the same memory state (see `settle_memory`).
        let queued_label = format!(
            "Sealpost accept only, {} queued (delivery paused)",
            crate::report::thousands(opts.queued)
        );
        let (mut empty_runs, mut queued_runs) = (Vec::new(), Vec::new());
        for i in 0..opts.accept_repeats {
            let relay = env.start_relay(&format!("scale-empty-{i}"), true).await?;
            let mut lo = env.load_opts("accept-empty", relay.plain, Security::Plain);
            lo.total = opts.accept_messages;
            let row = env
                .accept_row(
                    "Sealpost accept only, 0 queued (delivery paused)",
                    lo,
                    relay.pid(),
                )
                .await;
            let log = relay.log();
            relay.stop();
            empty_runs.push(row.map_err(|e| with_log(e, &log))?);
            if let Some(relay) = &queued_relay {
                let mut lo = env.load_opts("accept-queued", relay.plain, Security::Plain);
                lo.total = opts.accept_messages;
                let row = env.accept_row(&queued_label, lo, relay.pid()).await;
                queued_runs.push(row.map_err(|e| with_log(e, &relay.log()))?);
            }
        }
        report.rows.extend(median_row(empty_runs));
        report.rows.extend(median_row(queued_runs));
    }
    if let Some(relay) = queued_relay {
        relay.stop();
    }
    report.sink_session_errors = env.sink.session_errors();
    report.finish();
    Ok(report)
}

/// Writes dirty pages back and drops the kernel's page cache, so that every acceptance run
/// starts from the same memory state; false if that is not permitted (not root).
///
/// Why: on a VM whose balloon reports free pages to the host (Firecracker here), copying data
/// into new page-cache pages cost several times more in some runs, most likely because the
/// first write to a page the host has taken back faults on the host. Which runs paid it
/// depended on what the run before had freed, not on the queue: a fresh empty store measured
/// 1,312–1,392 msg/s after another run and 1,659–2,259 msg/s right after a state directory was
/// deleted. Dropping the cache frees recently used pages that every run then reuses alike.
async fn settle_memory() -> bool {
    let synced = tokio::process::Command::new("sync")
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false);
    synced
        && tokio::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .await
            .is_ok()
}

/// The run with the median acceptance rate, carrying every run's rate.
fn median_row(mut runs: Vec<Row>) -> Option<Row> {
    let rates: Vec<f64> = runs.iter().map(|r| r.load.accepted_per_s).collect();
    runs.sort_by(|a, b| a.load.accepted_per_s.total_cmp(&b.load.accepted_per_s));
    let dropped = runs.iter().all(|r| r.page_cache_dropped == Some(true));
    let mid = runs.len().checked_sub(1)? / 2;
    let mut row = runs.swap_remove(mid);
    row.repeats = rates;
    row.page_cache_dropped = Some(dropped);
    Some(row)
}

/// CPU seconds of this process (load generator, sink, DNS and sampler threads).
fn own_cpu_secs() -> f64 {
    crate::procfs::stat(std::process::id())
        .map(|s| (s.utime + s.stime) as f64 / crate::procfs::clk_tck() as f64)
        .unwrap_or(0.0)
}

fn with_log(e: BenchError, log: &str) -> BenchError {
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    BenchError::Program {
        program: "benchmark row".into(),
        detail: format!("{e}\n--- last log lines ---\n{}", tail.join("\n")),
    }
}

/// The default `sealpost` binary: next to this executable.
pub fn default_sealpost_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("sealpost")))
        .unwrap_or_else(|| PathBuf::from("sealpost"))
}
