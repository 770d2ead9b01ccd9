//! MX resolution (RFC 5321 §5.1, RFC 7505 null MX) and MX host address lookup.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

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
        Ok(MxResolver { inner })
    }

    /// The mail exchangers of `domain`.
    pub async fn mx(&self, domain: &str) -> MxAnswer {
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
        let fqdn = absolute(host);
        match self.inner.lookup_ip(fqdn.as_str()).await {
            Ok(found) => {
                let mut ips: Vec<IpAddr> = found.iter().collect();
                ips.dedup();
                if ips.is_empty() {
                    HostAddrs::None(format!("{host}: no A/AAAA records"))
                } else {
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
    fn names_are_normalised() {
        assert_eq!(absolute("example.org"), "example.org.");
        assert_eq!(absolute("example.org."), "example.org.");
        assert_eq!(host_name("MX.Example.ORG."), "mx.example.org");
    }
}
