//! Binding listeners and admitting connections: limits, allow lists, implicit TLS.

use crate::replies;
use crate::session::{ListenerInfo, Session};
use crate::stream::Transport;
use crate::{Shared, SubmissionError};
use sealpost_config::{Config, ListenerMode};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A bound listening socket and what it serves.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    mode: ListenerMode,
    local: SocketAddr,
}

impl Bound {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Binds every configured listener; the error names the address that failed.
pub async fn bind(config: &Config) -> Result<Vec<Bound>, SubmissionError> {
    let mut out = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let listener =
            TcpListener::bind(l.address)
                .await
                .map_err(|source| SubmissionError::Bind {
                    address: l.address,
                    source,
                })?;
        let local = listener
            .local_addr()
            .map_err(|source| SubmissionError::Bind {
                address: l.address,
                source,
            })?;
        out.push(Bound {
            listener,
            mode: l.mode,
            local,
        });
    }
    Ok(out)
}

/// Accepts connections on every listener until `shutdown` becomes true.
pub async fn serve(bound: Vec<Bound>, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let mut tasks = tokio::task::JoinSet::new();
    for b in bound {
        tasks.spawn(accept_loop(b, Arc::clone(&shared), shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

async fn accept_loop(b: Bound, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    tracing::info!(address = %b.local, mode = ?b.mode, "listening");
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    tracing::info!(address = %b.local, "listener closed");
                    return;
                }
            }
            accepted = b.listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = Arc::clone(&shared);
                    let (mode, local) = (b.mode, b.local);
                    tokio::spawn(async move { connection(stream, peer, mode, local, shared).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(address = %b.local, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Keeps `sealpost_sessions_open` up to date for one session.
struct SessionGauge;

impl SessionGauge {
    fn open() -> SessionGauge {
        metrics::gauge!("sealpost_sessions_open").increment(1.0);
        SessionGauge
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        metrics::gauge!("sealpost_sessions_open").decrement(1.0);
    }
}

/// With no allow list only loopback clients are served; an explicit list replaces that default.
fn allowed_plain(ip: IpAddr, allow: &[ipnet::IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    if allow.is_empty() {
        ip.is_loopback()
    } else {
        allow.iter().any(|n| n.contains(&ip))
    }
}

async fn refuse(mut stream: TcpStream, reply: sealpost_smtp::Reply) {
    let _ = stream.write_all(&reply.to_wire()).await;
    let _ = stream.shutdown().await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    mode: ListenerMode,
    local: SocketAddr,
    shared: Arc<Shared>,
) {
    let rt = shared.runtime.borrow().clone();
    let _ = stream.set_nodelay(true);
    let lconf = rt
        .config
        .listeners
        .iter()
        .find(|l| l.address == local || l.address.port() == local.port());
    let policy = lconf.and_then(|l| l.policy.clone());
    let sub = &rt.config.submission;
    let slot = match shared.connections.admit(
        peer.ip(),
        sub.max_connections,
        sub.max_connections_per_ip,
    ) {
        Ok(slot) => slot,
        Err(why) => {
            tracing::warn!(client = %peer, limit = ?why, "connection refused: too many connections");
            metrics::counter!("sealpost_connections_refused_total").increment(1);
            if mode == ListenerMode::Implicit {
                // The client expects TLS first; a plaintext reply would be garbage to it.
                return;
            }
            refuse(stream, replies::too_many_connections()).await;
            return;
        }
    };
    if mode == ListenerMode::Plain {
        let allow = lconf.map(|l| l.allow.as_slice()).unwrap_or(&[]);
        if !allowed_plain(peer.ip(), allow) {
            tracing::warn!(client = %peer, address = %local, "plain listener: client not in allow list");
            refuse(stream, replies::access_denied(&rt.config.server.hostname)).await;
            return;
        }
    }
    let transport = if mode == ListenerMode::Implicit {
        let Some(acceptor) = rt.tls.clone() else {
            return;
        };
        match tokio::time::timeout(sub.tls_handshake_timeout.0, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Transport::Tls(Box::new(tls)),
            Ok(Err(e)) => {
                tracing::info!(client = %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(client = %peer, "TLS handshake timed out");
                return;
            }
        }
    } else {
        Transport::Plain(stream)
    };
    let info = ListenerInfo {
        mode,
        policy,
        local,
    };
    // Counted by a guard so that a session ending in a panic or a cancelled task is uncounted too.
    let _gauge = SessionGauge::open();
    Session::new(Arc::clone(&shared), rt, info, peer, transport)
        .run()
        .await;
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes a session task may take in a test build: 3,760 when this was written (rustc 1.95),
    /// with room for small changes. A lease held inline across the audit write made it 4,048
    /// (~0.4 KB more per idle session). If this fails, find what grew before raising it.
    const SESSION_TASK_BUDGET: usize = 4_000;

    /// The size of the future `f` returns, without calling it.
    fn future_size<F, Fut>(_: F) -> usize
    where
        F: FnOnce(TcpStream, SocketAddr, ListenerMode, SocketAddr, Arc<Shared>) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every open session is one task of this future's size, whatever it is doing: anything
    /// large held across an await anywhere in a session (a lease, a buffer) makes every idle
    /// session that much larger (the idle-session memory target is 50 KB; we are at ~10).
    #[test]
    fn a_session_task_stays_small() {
        let size = future_size(connection);
        println!("session task: {size} bytes");
        assert!(
            size <= SESSION_TASK_BUDGET,
            "a session task is {size} bytes"
        );
    }

    #[test]
    fn plain_allow_list() {
        let nets: Vec<ipnet::IpNet> = vec!["10.1.0.0/16".parse().unwrap()];
        assert!(allowed_plain("127.0.0.5".parse().unwrap(), &[]));
        assert!(allowed_plain("::1".parse().unwrap(), &[]));
        assert!(allowed_plain("::ffff:127.0.0.1".parse().unwrap(), &[]));
        assert!(allowed_plain("10.1.2.3".parse().unwrap(), &nets));
        assert!(!allowed_plain("10.2.2.3".parse().unwrap(), &nets));
        // An explicit list replaces the loopback default.
        assert!(!allowed_plain("127.0.0.1".parse().unwrap(), &nets));
        assert!(!allowed_plain("192.0.2.1".parse().unwrap(), &[]));
    }
}
