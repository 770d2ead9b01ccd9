//! The `sealpost` binary: command-line parsing and wiring; the work is in the library crates.

mod admin;
mod certs;
mod http;
mod logging;
mod progress;
mod serve;
mod systemd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serve::ConfigSource;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

/// Sealpost: an outbound mail relay that only hands PHI to verified TLS peers.
#[derive(Parser, Debug)]
#[command(name = "sealpost", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the relay.
    Serve {
        /// Configuration file (default: the embedded config/sealpost.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log format.
        #[arg(long, value_enum, default_value = "human")]
        log_format: logging::LogFormat,
    },
    /// Check a configuration file and print every problem; exits 1 if there is one.
    CheckConfig {
        /// Configuration file (default: the embedded config/sealpost.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Manage SMTP credentials.
    User {
        #[command(subcommand)]
        command: UserCmd,
    },
    /// Inspect and manage the queue (through the admin socket while `serve` runs).
    Queue {
        #[command(subcommand)]
        command: QueueCmd,
        /// Configuration file (default: the embedded config/sealpost.toml).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCmd,
        /// Configuration file (default: the embedded config/sealpost.toml).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Read a password on stdin and print its argon2id PHC string for `password_hash`.
    HashPassword,
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// List queued messages.
    List,
    /// Show one message's metadata (never its body).
    Show {
        /// Queue id.
        id: String,
    },
    /// Make every pending recipient of a message due now.
    Retry {
        /// Queue id.
        id: String,
    },
    /// Hold a message until released.
    Hold {
        /// Queue id.
        id: String,
    },
    /// Release a held message.
    Release {
        /// Queue id.
        id: String,
    },
    /// Delete a message.
    Delete {
        /// Queue id.
        id: String,
    },
    /// Counts of messages and recipients by state.
    Stats,
    /// Re-encrypt every queued record under the primary key (after adding a new key_file).
    Rekey,
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Verify the hash chain of the audit log (rotated files included).
    Verify,
}

fn source(config: Option<PathBuf>) -> ConfigSource {
    config
        .map(ConfigSource::File)
        .unwrap_or(ConfigSource::Embedded)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sealpost: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Serve { config, log_format } => {
            let _log = logging::init(log_format);
            tokio_runtime()?.block_on(serve::run(source(config)))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckConfig { config } => {
            let src = source(config);
            match src.load() {
                Ok(c) => {
                    let n = |count: usize, one: &str, many: &str| {
                        format!("{count} {}", if count == 1 { one } else { many })
                    };
                    println!(
                        "configuration OK: {}, {}, {}",
                        n(c.listeners.len(), "listener", "listeners"),
                        n(c.users.len(), "user", "users"),
                        n(c.policies.len(), "policy", "policies")
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::User {
            command: UserCmd::HashPassword,
        } => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .context("reading the password from stdin")?;
            let password = input.strip_suffix('\n').unwrap_or(&input);
            let password = password.strip_suffix('\r').unwrap_or(password);
            if password.is_empty() {
                bail!("empty password on stdin");
            }
            println!("{}", hash_password(password)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Queue {
            command,
            config,
            json,
        } => {
            let (op, id) = match command {
                QueueCmd::List => (admin::Op::List, None),
                QueueCmd::Stats => (admin::Op::Stats, None),
                QueueCmd::Rekey => (admin::Op::Rekey, None),
                QueueCmd::Show { id } => (admin::Op::Show, Some(id)),
                QueueCmd::Retry { id } => (admin::Op::Retry, Some(id)),
                QueueCmd::Hold { id } => (admin::Op::Hold, Some(id)),
                QueueCmd::Release { id } => (admin::Op::Release, Some(id)),
                QueueCmd::Delete { id } => (admin::Op::Delete, Some(id)),
            };
            let req = admin::Request {
                op,
                id,
                json,
                who: std::env::var("USER").unwrap_or_else(|_| format!("uid {}", current_uid())),
                progress: false,
            };
            let config = source(config).load()?;
            tokio_runtime()?.block_on(queue_command(config, req))
        }
        Cmd::Audit {
            command: AuditCmd::Verify,
            config,
        } => {
            let config = source(config).load()?;
            let path = config.audit_path();
            match sealpost_audit::verify(&path) {
                Ok(report) => {
                    println!(
                        "audit log OK: {} record(s) in {} file(s), seq {}..{}, last hash {}",
                        report.records,
                        report.files,
                        report.first_seq,
                        report.last_seq,
                        report.last_hash
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("audit log BROKEN: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

async fn queue_command(config: sealpost_config::Config, req: admin::Request) -> Result<ExitCode> {
    // Listing or re-encrypting a large queue takes a while: show that something is happening.
    let _spinner = matches!(
        req.op,
        admin::Op::List | admin::Op::Stats | admin::Op::Rekey
    )
    .then(|| progress::Spinner::start("working on the queue…"));
    let response = match admin::call(&config.admin_socket(), &req).await? {
        Some(r) => r,
        None => {
            // No server running: open the store directly (redb locks it against a second opener).
            let queue = serve::open_queue(&config)?;
            let audit = serve::open_audit(&config)?;
            let req = admin::Request {
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                ..req
            };
            match admin::execute(&queue, &audit, &req).await {
                Ok(output) => admin::Response { ok: true, output },
                Err(e) => admin::Response {
                    ok: false,
                    output: format!("{e:#}"),
                },
            }
        }
    };
    if response.ok {
        println!("{}", response.output);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("sealpost: error: {}", response.output);
        Ok(ExitCode::FAILURE)
    }
}

fn hash_password(password: &str) -> Result<String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    Ok(hash.to_string())
}
