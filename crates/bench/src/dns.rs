//! A tiny authoritative DNS server for the bench domains: `DOMAIN MX 10 mx-host`,
//! `mx-host A ip`, NXDOMAIN for everything else. UDP and TCP on one loopback port.

use crate::error::BenchError;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, MX, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

struct Zone {
    domains: Vec<String>,
    mx_host: String,
    mx_name: Name,
    ip: Ipv4Addr,
    soa_owner: Name,
    soa: SOA,
}

/// A running DNS server.
#[derive(Clone)]
pub struct BenchDns {
    /// UDP and TCP address.
    pub addr: SocketAddr,
    zone: Arc<Zone>,
}

impl std::fmt::Debug for BenchDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchDns")
            .field("addr", &self.addr)
            .finish()
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn name(text: &str) -> Result<Name, BenchError> {
    Ok(Name::from_ascii(format!(
        "{}.",
        text.trim_end_matches('.')
    ))?)
}

impl BenchDns {
    /// Serves MX records for `domains` pointing at `mx_host`, which resolves to `ip`.
    pub async fn start(
        domains: &[String],
        mx_host: &str,
        ip: Ipv4Addr,
    ) -> Result<BenchDns, BenchError> {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0")
                .await
                .map_err(|e| BenchError::net("binding DNS UDP", e))?;
            let addr = udp
                .local_addr()
                .map_err(|e| BenchError::net("DNS address", e))?;
            if let Ok(tcp) = TcpListener::bind(addr).await {
                break (udp, tcp);
            }
        };
        let addr = udp
            .local_addr()
            .map_err(|e| BenchError::net("DNS address", e))?;
        let zone = Arc::new(Zone {
            domains: domains.iter().map(|d| key(d)).collect(),
            mx_host: key(mx_host),
            mx_name: name(mx_host)?,
            ip,
            soa_owner: name("bench.test")?,
            soa: SOA::new(
                name("ns.bench.test")?,
                name("hostmaster.bench.test")?,
                1,
                60,
                60,
                60,
                1,
            ),
        });
        let server = BenchDns { addr, zone };
        let udp = Arc::new(udp);
        let s = server.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                if let Some(answer) = buf.get(..n).and_then(|p| s.answer(p)) {
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
        Ok(server)
    }

    fn answer(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(packet).ok()?;
        let query = request.queries.first()?.clone();
        let owner = key(&query.name().to_ascii());
        let rtype = query.query_type();
        let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
        response.metadata.authoritative = true;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.add_query(query.clone());
        let z = &self.zone;
        let data = if z.domains.contains(&owner) && rtype == RecordType::MX {
            Some(RData::MX(MX::new(10, z.mx_name.clone())))
        } else if owner == z.mx_host && rtype == RecordType::A {
            Some(RData::A(A(z.ip)))
        } else {
            None
        };
        match data {
            Some(d) => {
                response.add_answer(Record::from_rdata(query.name().clone(), 60, d));
            }
            None => {
                if !z.domains.contains(&owner) && owner != z.mx_host {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
                response.add_authority(Record::from_rdata(
                    z.soa_owner.clone(),
                    60,
                    RData::SOA(z.soa.clone()),
                ));
            }
        }
        response.to_vec().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, owner: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(hickory_proto::op::Query::query(name(owner).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    /// Real UDP queries: MX and A answers for the bench names, NXDOMAIN elsewhere.
    #[tokio::test]
    async fn answers_mx_a_and_nxdomain_over_udp() {
        let dns = BenchDns::start(
            &["bench.test".into()],
            "mx.bench.test",
            Ipv4Addr::new(127, 0, 0, 9),
        )
        .await
        .unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut ask = async |owner: &str, rtype| {
            sock.send_to(&query(7, owner, rtype), dns.addr)
                .await
                .unwrap();
            let n = sock.recv(&mut buf).await.unwrap();
            Message::from_vec(&buf[..n]).unwrap()
        };
        let mx = ask("bench.test", RecordType::MX).await;
        assert_eq!(mx.metadata.id, 7);
        match &mx.answers[0].data {
            RData::MX(m) => assert_eq!(m.exchange.to_ascii(), "mx.bench.test."),
            other => panic!("{other:?}"),
        }
        let a = ask("MX.bench.test.", RecordType::A).await;
        assert_eq!(
            &a.answers[0].data,
            &RData::A(A(Ipv4Addr::new(127, 0, 0, 9)))
        );
        let aaaa = ask("mx.bench.test", RecordType::AAAA).await;
        assert!(aaaa.answers.is_empty());
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        let nx = ask("other.test", RecordType::MX).await;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    }
}
