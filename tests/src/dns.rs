//! An in-process authoritative DNS server for delivery tests: UDP and TCP on one loopback port,
//! with MX, null MX, A/AAAA records, NXDOMAIN for unknown names and SERVFAIL on demand.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

#[derive(Default)]
struct Zone {
    records: HashMap<(String, RecordType), Vec<RData>>,
    names: HashSet<String>,
    servfail: HashSet<String>,
}

/// A running DNS server; its tasks stop when the test's runtime ends.
#[derive(Clone)]
pub struct DnsServer {
    /// UDP and TCP address (same port).
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    queries: Arc<Mutex<Vec<(String, RecordType)>>>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn name(text: &str) -> Name {
    Name::from_ascii(format!("{}.", text.trim_end_matches('.')))
        .unwrap_or_else(|e| panic!("bad DNS name {text:?}: {e}"))
}

impl DnsServer {
    /// Binds UDP and TCP on the same free port of 127.0.0.1 and starts answering.
    pub async fn start() -> DnsServer {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("binding DNS UDP: {e}"));
            let addr = udp.local_addr().unwrap_or_else(|e| panic!("{e}"));
            if let Ok(tcp) = TcpListener::bind(addr).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = DnsServer {
            addr,
            zone: Arc::default(),
            queries: Arc::default(),
        };
        let udp = Arc::new(udp);
        let s = server.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                if let Some(answer) = s.answer(&buf[..n]) {
                    let _ = udp.send_to(&answer, peer).await;
                }
            }
        });
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = tcp.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    loop {
                        let mut len = [0u8; 2];
                        if conn.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if conn.read_exact(&mut msg).await.is_err() {
                            return;
                        }
                        let Some(answer) = s.answer(&msg) else { return };
                        let Ok(n) = u16::try_from(answer.len()) else {
                            return;
                        };
                        if conn.write_all(&n.to_be_bytes()).await.is_err()
                            || conn.write_all(&answer).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        server
    }

    /// The nameserver as a TOML list for `dns.nameservers`.
    pub fn nameservers_toml(&self) -> String {
        format!("[\"{}\"]", self.addr)
    }

    fn add(&self, owner: &str, rtype: RecordType, data: RData) {
        let mut zone = self.zone.lock().unwrap_or_else(|p| p.into_inner());
        zone.names.insert(key(owner));
        zone.records
            .entry((key(owner), rtype))
            .or_default()
            .push(data);
    }

    /// Publishes `domain MX preference host`.
    pub fn mx(&self, domain: &str, preference: u16, host: &str) {
        self.add(
            domain,
            RecordType::MX,
            RData::MX(MX::new(preference, name(host))),
        );
    }

    /// Publishes the null MX `domain MX 0 .` (RFC 7505).
    pub fn null_mx(&self, domain: &str) {
        self.add(domain, RecordType::MX, RData::MX(MX::new(0, Name::root())));
    }

    /// Publishes an A or AAAA record.
    pub fn address(&self, host: &str, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.add(host, RecordType::A, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add(host, RecordType::AAAA, RData::AAAA(AAAA(v6))),
        }
    }

    /// Publishes `domain MX 10 host` and `host A ip`.
    pub fn mx_at(&self, domain: &str, host: &str, ip: Ipv4Addr) {
        self.mx(domain, 10, host);
        self.address(host, IpAddr::V4(ip));
    }

    /// Makes every query for `name` answer SERVFAIL.
    pub fn servfail(&self, owner: &str) {
        let mut zone = self.zone.lock().unwrap_or_else(|p| p.into_inner());
        zone.servfail.insert(key(owner));
    }

    /// How many queries for `owner` of type `rtype` were answered.
    pub fn query_count(&self, owner: &str, rtype: RecordType) -> usize {
        let queries = self.queries.lock().unwrap_or_else(|p| p.into_inner());
        queries
            .iter()
            .filter(|(n, t)| *n == key(owner) && *t == rtype)
            .count()
    }

    fn answer(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(packet).ok()?;
        let query = request.queries.first()?.clone();
        let owner = key(&query.name().to_ascii());
        let rtype = query.query_type();
        self.queries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((owner.clone(), rtype));
        let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
        response.metadata.authoritative = true;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.add_query(query.clone());
        let zone = self.zone.lock().unwrap_or_else(|p| p.into_inner());
        if zone.servfail.contains(&owner) {
            response.metadata.response_code = ResponseCode::ServFail;
        } else if let Some(data) = zone.records.get(&(owner.clone(), rtype)) {
            for d in data {
                response.add_answer(Record::from_rdata(query.name().clone(), 60, d.clone()));
            }
        } else {
            if !zone.names.contains(&owner) {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            let soa = SOA::new(name("ns.test"), name("hostmaster.test"), 1, 60, 60, 60, 1);
            response.add_authority(Record::from_rdata(name("test"), 60, RData::SOA(soa)));
        }
        response.to_vec().ok()
    }
}
