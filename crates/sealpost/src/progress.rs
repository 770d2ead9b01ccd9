//! A progress line on stderr for long CLI operations, shown only on a terminal and only once the
//! operation has taken longer than a moment.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Shows `label … Ns` on stderr while alive (after the first second); erased on drop.
pub struct Spinner {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Spinner {
    /// Starts the spinner (a no-op when stderr is not a terminal).
    pub fn start(label: &'static str) -> Spinner {
        if !std::io::stderr().is_terminal() {
            return Spinner { task: None };
        }
        let started = Instant::now();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let frames = ['|', '/', '-', '\\'];
            let mut i = 0;
            loop {
                {
                    let mut err = std::io::stderr().lock();
                    let _ = write!(
                        err,
                        "\r{} {label} {}s",
                        frames[i % 4],
                        started.elapsed().as_secs()
                    );
                    let _ = err.flush();
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Spinner { task: Some(task) }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}
