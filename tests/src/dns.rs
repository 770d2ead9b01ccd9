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
    /// TTL of every answer, seconds (`None`: 60).
    ttl: Option<u32>,
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

/// Answers DNS over UDP and TCP on one free port of 127.0.0.1 with `answer` (a wire-format
/// query in, a wire-format response or nothing out) until the runtime ends; returns the address.
async fn serve(
    answer: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> std::io::Result<SocketAddr> {
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await?;
        if let Ok(tcp) = TcpListener::bind(udp.local_addr()?).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr()?;
    let answer = Arc::new(answer);
    let udp = Arc::new(udp);
    let a = answer.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            if let Some(response) = buf.get(..n).and_then(|p| a(p)) {
                let _ = udp.send_to(&response, peer).await;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = tcp.accept().await {
            let a = answer.clone();
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
                    let Some(response) = a(&msg) else { return };
                    let Ok(n) = u16::try_from(response.len()) else {
                        return;
                    };
                    if conn.write_all(&n.to_be_bytes()).await.is_err()
                        || conn.write_all(&response).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

impl DnsServer {
    /// Binds UDP and TCP on the same free port of 127.0.0.1 and starts answering.
    pub async fn start() -> DnsServer {
        Self::try_start()
            .await
            .unwrap_or_else(|e| panic!("starting the test DNS server: {e}"))
    }

    /// Like [`DnsServer::start`], returning a bind failure instead of panicking.
    pub async fn try_start() -> std::io::Result<DnsServer> {
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let queries: Arc<Mutex<Vec<(String, RecordType)>>> = Arc::default();
        let (z, q) = (zone.clone(), queries.clone());
        let addr = serve(move |packet| answer(&z, &q, packet)).await?;
        Ok(DnsServer {
            addr,
            zone,
            queries,
        })
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

    /// Answers from now on carry a TTL of `secs` seconds (60 until set).
    pub fn set_ttl(&self, secs: u32) {
        let mut zone = self.zone.lock().unwrap_or_else(|p| p.into_inner());
        zone.ttl = Some(secs);
    }

    /// Withdraws every `rtype` record of `owner` (the name stays, so it answers NODATA).
    pub fn withdraw(&self, owner: &str, rtype: RecordType) {
        let mut zone = self.zone.lock().unwrap_or_else(|p| p.into_inner());
        zone.records.remove(&(key(owner), rtype));
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
}

/// The response to one query packet, recording the query.
fn answer(
    zone: &Mutex<Zone>,
    queries: &Mutex<Vec<(String, RecordType)>>,
    packet: &[u8],
) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    let query = request.queries.first()?.clone();
    let owner = key(&query.name().to_ascii());
    let rtype = query.query_type();
    queries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((owner.clone(), rtype));
    let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_query(query.clone());
    let zone = zone.lock().unwrap_or_else(|p| p.into_inner());
    if zone.servfail.contains(&owner) {
        response.metadata.response_code = ResponseCode::ServFail;
    } else if let Some(data) = zone.records.get(&(owner.clone(), rtype)) {
        let ttl = zone.ttl.unwrap_or(60);
        for d in data {
            response.add_answer(Record::from_rdata(query.name().clone(), ttl, d.clone()));
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
