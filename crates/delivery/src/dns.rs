//! MX resolution (RFC 5321 §5.1, RFC 7505 null MX) and MX host address lookup.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use rand::seq::SliceRandom;

use crate::error::DeliveryError;

/// One mail exchanger of a domain, in the order it should be tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Host name without the trailing dot, lower case.
    pub name: String,
    /// MX preference (0 for an implicit MX).
    pub preference: u16,
    /// Whether this is the implicit MX (the domain itself, no MX record published).
    pub implicit: bool,
}

/// What the DNS says about where a domain's mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxAnswer {
    /// Mail exchangers in preference order (random among equal preferences).
    Hosts(Vec<MxHost>),
    /// The domain publishes a null MX (`0 .`, RFC 7505): it accepts no mail (5.1.10).
    NullMx,
    /// The domain does not exist, or has neither MX nor address records (5.1.2).
    NoSuchDomain(String),
    /// The lookup failed temporarily (SERVFAIL, timeout, no nameserver reachable).
    Temporary(String),
}

/// The addresses of one MX host, or why there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAddrs {
    /// A and AAAA addresses (possibly private or loopback: those are valid MX targets).
    Found(Vec<IpAddr>),
    /// The host name has no address records or does not exist.
    None(String),
    /// The lookup failed temporarily.
    Temporary(String),
}

/// The resolver used for delivery: configured nameservers or /etc/resolv.conf.
#[derive(Clone)]
pub struct MxResolver {
    inner: TokioResolver,
    /// MX records by domain, until their TTL runs out.
    mx_memo: Arc<Memo<String, Vec<(u16, String)>>>,
    /// Addresses by host, until their TTL runs out.
    ip_memo: Arc<Memo<String, Vec<IpAddr>>>,
}

/// Most names each memo holds; past it, expired entries go, and if none had, all go.
const MEMO_ENTRIES: usize = 4096;

/// Positive answers kept until their TTL runs out. hickory caches them too, but a cached
/// lookup still copies the whole DNS message and goes through the resolver's machinery, which
/// cost ~3% of the relay's CPU with every message to a busy domain looking up its MX and its
/// addresses. Failures and negative answers are not kept (hickory's cache has those).
#[derive(Debug)]
struct Memo<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
    max: usize,
}

impl<K: Eq + Hash, V: Clone> Memo<K, V> {
    fn new(max: usize) -> Memo<K, V> {
        Memo {
            entries: Mutex::new(HashMap::new()),
            max,
        }
    }

    /// The value of `key` if it is still valid at `now`.
    fn get(&self, key: &K, now: Instant) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(value, _)| value.clone())
    }

    /// Keeps `value` for `key` until `until` (nothing if that is not after `now`).
    fn put(&self, key: K, value: V, until: Instant, now: Instant) {
        if until <= now {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.max && !entries.contains_key(&key) {
            entries.retain(|_, (_, u)| *u > now);
            if entries.len() >= self.max {
                entries.clear();
            }
        }
        entries.insert(key, (value, until));
    }
}

impl std::fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MxResolver").finish_non_exhaustive()
    }
}

impl MxResolver {
    /// A resolver asking `nameservers` (UDP and TCP) or, when empty, those of /etc/resolv.conf.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<MxResolver, DeliveryError> {
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| DeliveryError::Resolver(e.to_string()))?
        } else {
            let servers = nameservers
                .iter()
                .map(|addr| {
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for conn in &mut ns.connections {
                        conn.port = addr.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.try_tcp_on_error = true;
        // Recipient names are absolute: never append a search domain.
        opts.ndots = 0;
        let inner = builder
            .build()
            .map_err(|e| DeliveryError::Resolver(e.to_string()))?;
        Ok(MxResolver {
            inner,
            mx_memo: Arc::new(Memo::new(MEMO_ENTRIES)),
            ip_memo: Arc::new(Memo::new(MEMO_ENTRIES)),
        })
    }

    /// The mail exchangers of `domain`.
    pub async fn mx(&self, domain: &str) -> MxAnswer {
        let key = host_name(domain);
        if let Some(records) = self.mx_memo.get(&key, Instant::now()) {
            return order_mx(records, &mut rand::rng());
        }
        let fqdn = absolute(domain);
        match self.inner.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let records: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, host_name(&mx.exchange.to_ascii()))),
                        _ => None,
                    })
                    .collect();
                if !records.is_empty() {
                    let until = lookup.valid_until();
                    self.mx_memo
                        .put(key, records.clone(), until, Instant::now());
                }
                order_mx(records, &mut rand::rng())
            }
            Err(e) if e.is_nx_domain() => MxAnswer::NoSuchDomain(format!("{domain}: NXDOMAIN")),
            Err(e) if e.is_no_records_found() => self.implicit_mx(domain).await,
            Err(e) => MxAnswer::Temporary(describe(domain, "MX", &e)),
        }
    }

    /// RFC 5321 §5.1: no MX records, so the domain itself is the MX if it has an address.
    async fn implicit_mx(&self, domain: &str) -> MxAnswer {
        match self.addresses(domain).await {
            HostAddrs::Found(_) => MxAnswer::Hosts(vec![MxHost {
                name: host_name(domain),
                preference: 0,
                implicit: true,
            }]),
            HostAddrs::None(why) => MxAnswer::NoSuchDomain(format!("no MX and no address: {why}")),
            HostAddrs::Temporary(why) => MxAnswer::Temporary(why),
        }
    }

    /// The A and AAAA addresses of an MX host.
    pub async fn addresses(&self, host: &str) -> HostAddrs {
        let key = host_name(host);
        if let Some(ips) = self.ip_memo.get(&key, Instant::now()) {
            return HostAddrs::Found(ips);
        }
        let fqdn = absolute(host);
        match self.inner.lookup_ip(fqdn.as_str()).await {
            Ok(found) => {
                let mut ips: Vec<IpAddr> = found.iter().collect();
                ips.dedup();
                if ips.is_empty() {
                    HostAddrs::None(format!("{host}: no A/AAAA records"))
                } else {
                    self.ip_memo
                        .put(key, ips.clone(), found.valid_until(), Instant::now());
                    HostAddrs::Found(ips)
                }
            }
            Err(e) if e.is_nx_domain() => HostAddrs::None(format!("{host}: NXDOMAIN")),
            Err(e) if e.is_no_records_found() => {
                HostAddrs::None(format!("{host}: no A/AAAA records"))
            }
            Err(e) => HostAddrs::Temporary(describe(host, "A/AAAA", &e)),
        }
    }
}

/// `name` with exactly one trailing dot.
fn absolute(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

/// A host name without trailing dot, lower case.
fn host_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn describe(name: &str, kind: &str, err: &NetError) -> String {
    let what = match err {
        NetError::Timeout => "timed out".to_owned(),
        NetError::Dns(hickory_resolver::net::DnsError::ResponseCode(ResponseCode::ServFail)) => {
            "SERVFAIL".to_owned()
        }
        other => other.to_string(),
    };
    format!("{kind} lookup for {name}: {what}")
}

/// Sorts MX records by preference, shuffling equal preferences; recognises the null MX.
pub(crate) fn order_mx<R: rand::Rng + ?Sized>(
    records: Vec<(u16, String)>,
    rng: &mut R,
) -> MxAnswer {
    // RFC 7505: a single MX with an empty (root) exchange means "no mail". A null MX mixed
    // with real ones is a misconfiguration; the root entry is then just skipped.
    let (null, mut real): (Vec<_>, Vec<_>) = records.into_iter().partition(|(_, n)| n.is_empty());
    if real.is_empty() {
        return if null.is_empty() {
            MxAnswer::Temporary("MX answer held no MX records".to_owned())
        } else {
            MxAnswer::NullMx
        };
    }
    real.shuffle(rng);
    // A stable sort keeps the shuffled order within one preference.
    real.sort_by_key(|(pref, _)| *pref);
    real.dedup_by(|a, b| a.1 == b.1);
    MxAnswer::Hosts(
        real.into_iter()
            .map(|(preference, name)| MxHost {
                name,
                preference,
                implicit: false,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn names(answer: &MxAnswer) -> Vec<String> {
        match answer {
            MxAnswer::Hosts(h) => h.iter().map(|m| m.name.clone()).collect(),
            other => panic!("not hosts: {other:?}"),
        }
    }

    #[test]
    fn preference_order_and_null_mx() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let got = order_mx(
            vec![
                (20, "b.test".into()),
                (10, "a.test".into()),
                (30, "c.test".into()),
            ],
            &mut rng,
        );
        assert_eq!(names(&got), ["a.test", "b.test", "c.test"]);
        assert_eq!(
            order_mx(vec![(0, String::new())], &mut rng),
            MxAnswer::NullMx
        );
        // A root entry next to real MX hosts is ignored rather than treated as null MX.
        let mixed = order_mx(vec![(0, String::new()), (10, "a.test".into())], &mut rng);
        assert_eq!(names(&mixed), ["a.test"]);
    }

    #[test]
    fn equal_preferences_are_shuffled_but_stay_behind_better_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..64 {
            let got = names(&order_mx(
                vec![
                    (10, "x.test".into()),
                    (10, "y.test".into()),
                    (10, "z.test".into()),
                    (5, "best.test".into()),
                ],
                &mut rng,
            ));
            assert_eq!(got[0], "best.test");
            assert_eq!(got.len(), 4);
            firsts.insert(got[1].clone());
        }
        assert_eq!(
            firsts.len(),
            3,
            "every equal-preference MX should come first sometimes"
        );
    }

    #[test]
    fn memo_keeps_answers_until_their_ttl_runs_out() {
        let memo = Memo::new(3);
        let now = Instant::now();
        let later = |s| now + Duration::from_secs(s);
        memo.put("a".to_owned(), 1, later(10), now);
        assert_eq!(memo.get(&"a".to_owned(), now), Some(1));
        assert_eq!(memo.get(&"a".to_owned(), later(9)), Some(1));
        // valid *until*: gone at the deadline and after it
        assert_eq!(memo.get(&"a".to_owned(), later(10)), None);
        assert_eq!(memo.get(&"a".to_owned(), later(11)), None);
        // an answer already expired (TTL 0) is not kept
        memo.put("z".to_owned(), 9, now, now);
        assert_eq!(memo.get(&"z".to_owned(), now), None);
        assert_eq!(memo.get(&"b".to_owned(), now), None);
    }

    #[test]
    fn memo_stays_bounded() {
        let memo = Memo::new(3);
        let now = Instant::now();
        let later = |s| now + Duration::from_secs(s);
        memo.put("a".to_owned(), 1, later(5), now);
        memo.put("b".to_owned(), 2, later(50), now);
        memo.put("c".to_owned(), 3, later(50), now);
        // full: at t+6 the expired "a" makes room and the live ones stay
        memo.put("d".to_owned(), 4, later(50), later(6));
        let len = |m: &Memo<String, i32>| m.entries.lock().unwrap().len();
        assert_eq!(len(&memo), 3);
        assert_eq!(memo.get(&"b".to_owned(), later(6)), Some(2));
        assert_eq!(memo.get(&"d".to_owned(), later(6)), Some(4));
        // full of live entries: they all go, and the new one is kept
        memo.put("e".to_owned(), 5, later(50), later(6));
        assert_eq!(len(&memo), 1);
        assert_eq!(memo.get(&"e".to_owned(), later(6)), Some(5));
        // replacing a name does not evict
        memo.put("e".to_owned(), 6, later(50), later(6));
        assert_eq!(memo.get(&"e".to_owned(), later(6)), Some(6));
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(absolute("example.org"), "example.org.");
        assert_eq!(absolute("example.org."), "example.org.");
        assert_eq!(host_name("MX.Example.ORG."), "mx.example.org");
    }
}
