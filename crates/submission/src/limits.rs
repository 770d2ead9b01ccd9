//! Connection counting (total and per client IP) and per-user send-rate buckets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// Counts open sessions in total and per client address.
#[derive(Debug, Default)]
pub struct Connections {
    inner: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `submission.max_connections` reached.
    Total,
    /// `submission.max_connections_per_ip` reached for this address.
    PerIp,
}

/// Releases a session's slot when dropped.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<Connections>,
    ip: IpAddr,
}

impl Connections {
    /// Admits a session from `ip` if both limits allow it.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<Slot, Refusal> {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if g.0 >= max_total {
            return Err(Refusal::Total);
        }
        let per = g.1.entry(ip).or_insert(0);
        if *per >= max_per_ip {
            return Err(Refusal::PerIp);
        }
        *per += 1;
        g.0 += 1;
        Ok(Slot {
            owner: Arc::clone(self),
            ip,
        })
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self
            .owner
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        g.0 = g.0.saturating_sub(1);
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// Token buckets of recipients per second, one per user (SES's "maximum send rate").
#[derive(Debug, Default)]
pub struct SendRates {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl SendRates {
    /// Takes `count` recipients from `user`'s bucket; false if the bucket is empty.
    ///
    /// A message is let through while any token is left, and may drive the bucket into debt,
    /// so a 50-recipient message is never refused forever at a rate below 50/s.
    pub fn take(&self, user: &str, rate: f64, count: usize) -> bool {
        let now = Instant::now();
        let burst = rate.max(1.0);
        let mut g = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = g.entry(user.to_string()).or_insert((burst, now));
        let elapsed = now.duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * rate).min(burst);
        *last = now;
        if *tokens <= 0.0 {
            return false;
        }
        *tokens -= count as f64;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits() {
        let c = Arc::new(Connections::default());
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = c.admit(a, 3, 2).unwrap();
        let _s2 = c.admit(a, 3, 2).unwrap();
        assert_eq!(c.admit(a, 3, 2).unwrap_err(), Refusal::PerIp);
        let _s3 = c.admit(b, 3, 2).unwrap();
        assert_eq!(c.admit(b, 3, 2).unwrap_err(), Refusal::Total);
        drop(s1);
        assert!(c.admit(a, 3, 2).is_ok());
    }

    #[test]
    fn send_rate_buckets() {
        let r = SendRates::default();
        assert!(r.take("u", 2.0, 1));
        assert!(r.take("u", 2.0, 5)); // goes into debt
        assert!(!r.take("u", 2.0, 1));
        assert!(r.take("other", 2.0, 1));
    }
}
