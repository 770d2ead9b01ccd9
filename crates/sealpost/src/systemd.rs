//! systemd integration: `READY=1` once listeners are bound and the queue is open, `WATCHDOG=1`
//! pings at half the watchdog interval, `RELOADING=1`/`STOPPING=1` around reloads and shutdown.
//! Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Tells systemd the service is ready, and starts the watchdog pings if systemd asked for them.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let period = interval / 2;
        tracing::info!(?period, "systemd watchdog enabled");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                send(&[NotifyState::Watchdog]);
            }
        });
    }
}

/// Tells systemd a configuration reload has begun.
pub fn reloading() {
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        send(&[NotifyState::Reloading, now]);
    } else {
        send(&[NotifyState::Reloading]);
    }
}

/// Tells systemd the reload is over.
pub fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining sessions"),
    ]);
}
