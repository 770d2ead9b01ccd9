//! Connection limits (global and per destination domain) and idle verified sessions kept for
//! the next message to the same MX.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client::Session;

/// Which idle sessions may serve a new transaction: same MX name, address and policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// MX host name (the name the certificate was verified against).
    pub mx: String,
    /// Address connected to.
    pub ip: IpAddr,
    /// Name of the policy the session was judged under.
    pub policy: String,
}

/// Permits held while delivering to one domain: one global, one for the domain.
#[derive(Debug)]
pub struct Permits {
    _global: OwnedSemaphorePermit,
    _domain: OwnedSemaphorePermit,
}

/// Connection limits and idle sessions.
pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<(Session, Instant)>>>,
    idle_timeout: Duration,
    global: Arc<Semaphore>,
    per_domain: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_domain_limit: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle_timeout", &self.idle_timeout)
            .field("per_domain_limit", &self.per_domain_limit)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    /// A pool allowing `global` connections in all and `per_domain` to one domain.
    pub fn new(global: usize, per_domain: usize, idle_timeout: Duration) -> Pool {
        Pool {
            idle: Mutex::default(),
            idle_timeout,
            global: Arc::new(Semaphore::new(global.max(1))),
            per_domain: Mutex::default(),
            per_domain_limit: per_domain.max(1),
        }
    }

    /// Waits for a connection slot for `domain` (per-domain first, then global).
    pub async fn permits(&self, domain: &str) -> Option<Permits> {
        let sem = lock(&self.per_domain)
            .entry(domain.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_domain_limit)))
            .clone();
        let domain = sem.acquire_owned().await.ok()?;
        let global = self.global.clone().acquire_owned().await.ok()?;
        Some(Permits {
            _global: global,
            _domain: domain,
        })
    }

    /// An idle session for `key` that has not outlived the idle timeout, if any.
    pub fn take(&self, key: &PoolKey) -> Option<Session> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some((session, since)) = list.pop() {
            if now.duration_since(since) < self.idle_timeout {
                return Some(session);
            }
            drop(session);
        }
        None
    }

    /// Keeps a session for reuse.
    pub fn put(&self, key: PoolKey, session: Session) {
        lock(&self.idle)
            .entry(key)
            .or_default()
            .push((session, Instant::now()));
    }

    /// Removes and returns the sessions idle for longer than the idle timeout (or all).
    pub fn drain(&self, all: bool) -> Vec<Session> {
        let mut idle = lock(&self.idle);
        let now = Instant::now();
        let mut out = Vec::new();
        for list in idle.values_mut() {
            let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|(_, since)| all || now.duration_since(*since) >= self.idle_timeout);
            *list = keep;
            out.extend(old.into_iter().map(|(s, _)| s));
        }
        idle.retain(|_, list| !list.is_empty());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn per_domain_limit_blocks_only_that_domain() {
        let pool = Pool::new(3, 1, Duration::from_secs(5));
        let a = pool.permits("a.test").await.unwrap();
        // A second slot for a.test must wait; b.test still gets one.
        let second = tokio::time::timeout(Duration::from_millis(50), pool.permits("a.test")).await;
        assert!(second.is_err(), "per-domain limit of 1 not enforced");
        let _b = pool.permits("b.test").await.unwrap();
        drop(a);
        let again = tokio::time::timeout(Duration::from_millis(200), pool.permits("a.test")).await;
        assert!(again.is_ok(), "slot not released");
    }

    #[tokio::test]
    async fn global_limit_blocks_every_domain() {
        let pool = Pool::new(1, 5, Duration::from_secs(5));
        let _a = pool.permits("a.test").await.unwrap();
        let b = tokio::time::timeout(Duration::from_millis(50), pool.permits("b.test")).await;
        assert!(b.is_err(), "global limit of 1 not enforced");
    }
}
