//! tracing setup: human-readable or JSON lines on stderr, filtered by `RUST_LOG` (default `info`).
//!
//! Lines are written by a logging thread, not by the thread that logs: a slow stderr (journald
//! applying back-pressure, a full pipe) must not stall the tasks serving SMTP sessions, and
//! lines logged together leave in one write. None are dropped: when 128k lines are waiting,
//! the thread that logs waits too.

use std::io::{BufWriter, IsTerminal};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber; the lines still waiting are written when the guard drops.
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: journald, files and pipes get plain `key=value` text that grep
    // and log shippers can match. A non-empty `NO_COLOR` (no-color.org) turns it off on a terminal too.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let colour = std::io::stderr().is_terminal() && !no_color;
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("sealpost-log")
        .finish(BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(writer);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}
