//! `sealpost-bench`: load generator, sink, and the Sealpost-vs-Postfix runner.

use clap::{Parser, Subcommand, ValueEnum};
use sealpost_bench::ca::{roots, BenchCa};
use sealpost_bench::client::Security;
use sealpost_bench::error::BenchError;
use sealpost_bench::load::{self, LoadOptions};
use sealpost_bench::mix::{SizeMix, DEFAULT_MIX};
use sealpost_bench::prefill::prefill;
use sealpost_bench::runner::{self, PostfixMode, RunOptions};
use sealpost_bench::sink::Sink;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "sealpost-bench",
    about = "Benchmark Sealpost (and Postfix) end to end"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum PostfixArg {
    Auto,
    Require,
    Skip,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send messages over N concurrent SMTP sessions and report acceptance latency.
    Load {
        /// Server address (ip:port).
        #[arg(long)]
        target: SocketAddr,
        /// Use STARTTLS and AUTH PLAIN (needs --user, --password, --ca, --server-name).
        #[arg(long)]
        starttls: bool,
        /// AUTH user.
        #[arg(long, default_value = "")]
        user: String,
        /// AUTH password.
        #[arg(long, default_value = "", env = "SEALPOST_BENCH_PASSWORD")]
        password: String,
        /// PEM file of the CA the server certificate must chain to.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Name the server certificate must carry.
        #[arg(long, default_value = "relay.bench.test")]
        server_name: String,
        /// Concurrent sessions.
        #[arg(long, default_value_t = 50)]
        sessions: usize,
        /// Messages per session (total = sessions × this) unless --total is given.
        #[arg(long, default_value_t = 20)]
        messages_per_session: u64,
        /// Messages in total.
        #[arg(long)]
        total: Option<u64>,
        /// Size mix as PERCENT:SIZE,...
        #[arg(long, default_value = DEFAULT_MIX)]
        mix: String,
        /// Open loop at this many messages per second (default: closed loop).
        #[arg(long)]
        rate: Option<f64>,
        /// Run tag (X-Bench-Run).
        #[arg(long, default_value = "load")]
        tag: String,
        /// Envelope sender and From.
        #[arg(long, default_value = runner::SENDER)]
        from: String,
        /// Recipient domain.
        #[arg(long, default_value = runner::RCPT_DOMAIN)]
        rcpt_domain: String,
        /// Write the report here as JSON (it is always printed on stdout).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Receive messages with STARTTLS, count them, and report end-to-end latency.
    Sink {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:2525")]
        listen: SocketAddr,
        /// Directory for the bench CA and the sink certificate.
        #[arg(long)]
        dir: PathBuf,
        /// Host name (greeting and certificate name).
        #[arg(long, default_value = runner::SINK_NAME)]
        hostname: String,
        /// Stop after this many messages (default: run until Ctrl-C).
        #[arg(long)]
        expect: Option<u64>,
        /// Write the report here as JSON (it is always printed on stdout).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Run the whole benchmark (Sealpost vs Postfix, scale rows) and print one table.
    Run {
        /// The sealpost binary (default: next to this one).
        #[arg(long)]
        sealpost_bin: Option<PathBuf>,
        /// Keep configs, state and logs here (default: a temp dir, removed).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Messages per comparison row.
        #[arg(long, default_value_t = 5000)]
        messages: u64,
        /// Concurrent sessions.
        #[arg(long, default_value_t = 50)]
        sessions: usize,
        /// Sessions of the STARTTLS + AUTH row (default: --sessions).
        #[arg(long)]
        auth_sessions: Option<usize>,
        /// Size mix of the comparison rows.
        #[arg(long, default_value = DEFAULT_MIX)]
        mix: String,
        /// Open loop at this many messages per second (default: closed loop).
        #[arg(long)]
        rate: Option<f64>,
        /// Messages of the 50 KB latency row (0 skips it).
        #[arg(long, default_value_t = 5000)]
        fifty_kb_messages: u64,
        /// Open-loop rates (msg/s, comma-separated) of the 50 KB rows after the closed-loop one;
        /// `0` skips them.
        #[arg(long, value_delimiter = ',', default_values_t = [200.0, 500.0, 700.0])]
        fifty_kb_rate: Vec<f64>,
        /// Messages of each acceptance-only row (0 skips them).
        #[arg(long, default_value_t = 5000)]
        accept_messages: u64,
        /// Runs of each acceptance-only row (alternating empty and queued; the median is reported).
        #[arg(long, default_value_t = 5)]
        accept_repeats: usize,
        /// Messages queued before the "N queued" rows (0 skips them).
        #[arg(long, default_value_t = 200_000)]
        queued: u64,
        /// Body size of the queued messages.
        #[arg(long, default_value = "5KB")]
        queued_size: String,
        /// Idle sessions for the memory row (0 skips it).
        #[arg(long, default_value_t = 1000)]
        idle_sessions: usize,
        /// Postfix rows: auto (if installed), require, skip.
        #[arg(long, value_enum, default_value = "auto")]
        postfix: PostfixArg,
        /// Skip the extra Postfix row with smtp_tls_connection_reuse = yes.
        #[arg(long)]
        no_postfix_tls_reuse: bool,
        /// Sealpost's delivery.max_connections_per_domain (Postfix's default is 20).
        #[arg(long, default_value_t = 20)]
        per_domain: usize,
        /// Seconds to wait for a row's deliveries.
        #[arg(long, default_value_t = 600)]
        delivery_timeout: u64,
        /// Seconds to wait for Sealpost to start.
        #[arg(long, default_value_t = 300)]
        start_timeout: u64,
        /// Write the full report here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// No progress lines.
        #[arg(long)]
        quiet: bool,
    },
    /// (Used by `run`.) Fill a queue directory with messages, print a JSON report.
    #[command(hide = true)]
    Prefill {
        /// The queue directory (state_dir/queue).
        #[arg(long)]
        queue_dir: PathBuf,
        /// The queue key file.
        #[arg(long)]
        key: PathBuf,
        /// Messages.
        #[arg(long)]
        count: u64,
        /// Body size.
        #[arg(long, default_value = "5KB")]
        size: String,
        /// Recipient domain.
        #[arg(long, default_value = runner::RCPT_DOMAIN)]
        rcpt_domain: String,
        /// Concurrent enqueues.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

fn write_json<T: serde::Serialize>(
    path: Option<&PathBuf>,
    value: &T,
) -> Result<String, BenchError> {
    let text = serde_json::to_string_pretty(value)?;
    if let Some(p) = path {
        std::fs::write(p, format!("{text}\n")).map_err(|e| BenchError::io("writing", p, e))?;
    }
    Ok(text)
}

/// The open-loop rates of the 50 KB rows: `0` entries dropped; each rate at most once, since a
/// row's tag (and so the sink's count for it) is derived from its rate.
fn open_rates(rates: Vec<f64>) -> Result<Vec<f64>, BenchError> {
    let mut out: Vec<f64> = Vec::new();
    for r in rates {
        if !r.is_finite() || r < 0.0 {
            return Err(BenchError::Option {
                option: "--fifty-kb-rate",
                detail: format!("{r} is not a rate in messages per second"),
            });
        }
        if r == 0.0 {
            continue;
        }
        if out.contains(&r) {
            return Err(BenchError::Option {
                option: "--fifty-kb-rate",
                detail: format!("{r} is given twice"),
            });
        }
        out.push(r);
    }
    Ok(out)
}

fn one_size(text: &str) -> Result<usize, BenchError> {
    let mix = SizeMix::parse(&format!("100:{text}"))?;
    Ok(mix.size_of(0))
}

async fn main_async(cli: Cli) -> Result<(), BenchError> {
    match cli.command {
        Cmd::Load {
            target,
            starttls,
            user,
            password,
            ca,
            server_name,
            sessions,
            messages_per_session,
            total,
            mix,
            rate,
            tag,
            from,
            rcpt_domain,
            json,
        } => {
            let security = if starttls {
                let ca = ca.ok_or(BenchError::Option {
                    option: "--ca",
                    detail: "needed with --starttls".into(),
                })?;
                Security::starttls(roots(&ca)?, &server_name, &user, &password)?
            } else {
                Security::Plain
            };
            let opts = LoadOptions {
                target,
                security,
                sessions,
                total: total.unwrap_or(messages_per_session.saturating_mul(sessions as u64)),
                mix: SizeMix::parse(&mix)?,
                rate,
                tag,
                from,
                rcpt_domain,
                progress: true,
            };
            let report = load::run(opts).await?;
            println!("{}", write_json(json.as_ref(), &report)?);
        }
        Cmd::Sink {
            listen,
            dir,
            hostname,
            expect,
            json,
        } => {
            let ca = BenchCa::create(&dir)?;
            let leaf = ca.issue("sink", &[&hostname])?;
            let sink = Sink::start(listen, &hostname, &leaf.chain_pem, &leaf.key_pem).await?;
            eprintln!(
                "sink listening on {} as {hostname}; CA {}",
                sink.addr,
                ca.root_pem().display()
            );
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        if expect.is_some_and(|n| sink.total() >= n) {
                            break;
                        }
                    }
                }
            }
            println!("{}", write_json(json.as_ref(), &sink.reports())?);
        }
        Cmd::Run {
            sealpost_bin,
            work_dir,
            messages,
            sessions,
            auth_sessions,
            mix,
            rate,
            fifty_kb_messages,
            fifty_kb_rate,
            accept_messages,
            accept_repeats,
            queued,
            queued_size,
            idle_sessions,
            postfix,
            no_postfix_tls_reuse,
            per_domain,
            delivery_timeout,
            start_timeout,
            json,
            quiet,
        } => {
            let opts = RunOptions {
                sealpost_bin: sealpost_bin.unwrap_or_else(runner::default_sealpost_bin),
                work_dir,
                messages,
                sessions,
                auth_sessions: auth_sessions.unwrap_or(sessions),
                mix: SizeMix::parse(&mix)?,
                rate,
                fifty_kb_messages,
                fifty_kb_rates: open_rates(fifty_kb_rate)?,
                accept_messages,
                accept_repeats: accept_repeats.max(1),
                queued,
                queued_size: one_size(&queued_size)?,
                idle_sessions,
                postfix: match postfix {
                    PostfixArg::Auto => PostfixMode::Auto,
                    PostfixArg::Require => PostfixMode::Require,
                    PostfixArg::Skip => PostfixMode::Skip,
                },
                postfix_tls_reuse: !no_postfix_tls_reuse,
                per_domain,
                delivery_timeout: Duration::from_secs(delivery_timeout),
                start_timeout: Duration::from_secs(start_timeout),
                progress: !quiet,
            };
            let report = runner::run(opts).await?;
            write_json(json.as_ref(), &report)?;
            print!("{}", report.table());
        }
        Cmd::Prefill {
            queue_dir,
            key,
            count,
            size,
            rcpt_domain,
            concurrency,
        } => {
            let rep = prefill(
                &queue_dir,
                &key,
                count,
                one_size(&size)?,
                &rcpt_domain,
                concurrency,
            )
            .await?;
            println!("{}", serde_json::to_string(&rep)?);
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sealpost-bench: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_async(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sealpost-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::open_rates;

    #[test]
    fn open_rates_drop_zero_and_refuse_repeats_and_nonsense() {
        assert_eq!(open_rates(vec![0.0]).ok(), Some(vec![]));
        assert_eq!(
            open_rates(vec![200.0, 0.0, 700.0]).ok(),
            Some(vec![200.0, 700.0])
        );
        let twice = open_rates(vec![200.0, 500.0, 200.0])
            .err()
            .map(|e| e.to_string());
        assert!(
            twice
                .as_deref()
                .is_some_and(|m| m.contains("200 is given twice")),
            "{twice:?}"
        );
        assert!(open_rates(vec![-5.0]).is_err());
        assert!(open_rates(vec![f64::NAN]).is_err());
    }
}
