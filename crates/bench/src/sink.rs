//! The sink: a fast SMTP receiver with STARTTLS that counts messages per run tag and measures
//! end-to-end latency from the `X-Bench-Sent` header.

use crate::ca::{load_certs, load_key};
use crate::error::BenchError;
use crate::load::unix_ns;
use crate::mix::bench_headers;
use crate::stats::{summarize, Summary};
use crate::stream::Stream;
use sealpost_smtp::{read_data, DataLimits, LineReader};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Default)]
struct TagStats {
    messages: u64,
    recipients: u64,
    over_tls: u64,
    bytes: u64,
    first_ns: u128,
    last_ns: u128,
    latencies_us: Vec<u64>,
    missing_stamp: u64,
    tls: BTreeMap<String, u64>,
}

struct State {
    hostname: String,
    acceptor: TlsAcceptor,
    tags: Mutex<HashMap<String, TagStats>>,
    total: AtomicU64,
    session_errors: AtomicU64,
    handshakes: AtomicU64,
    reply_writes: AtomicU64,
}

/// A running sink; its tasks live as long as the runtime.
#[derive(Clone)]
pub struct Sink {
    /// The listening address.
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("addr", &self.addr).finish()
    }
}

/// What the sink received for one run tag.
#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    /// The run tag (`X-Bench-Run`), or "" for messages without one.
    pub tag: String,
    /// Messages received.
    pub messages: u64,
    /// Recipients over all messages.
    pub recipients: u64,
    /// Messages received over TLS.
    pub over_tls: u64,
    /// Message bytes received.
    pub bytes: u64,
    /// First message received, Unix nanoseconds.
    pub first_unix_ns: u128,
    /// Last message received, Unix nanoseconds.
    pub last_unix_ns: u128,
    /// End-to-end latency: `X-Bench-Sent` to the end of DATA at the sink.
    pub end_to_end: Summary,
    /// Messages without a usable `X-Bench-Sent`.
    pub missing_stamp: u64,
    /// Messages per negotiated TLS version and cipher suite.
    pub tls: BTreeMap<String, u64>,
}

impl Sink {
    /// Binds `bind` and serves SMTP with STARTTLS using the given certificate.
    pub async fn start(
        bind: SocketAddr,
        hostname: &str,
        cert_chain: &Path,
        key: &Path,
    ) -> Result<Sink, BenchError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(load_certs(cert_chain)?, load_key(key)?)?;
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|e| BenchError::io("binding the sink", bind.to_string(), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::net("sink address", e))?;
        let state = Arc::new(State {
            hostname: hostname.to_string(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
            tags: Mutex::default(),
            total: AtomicU64::new(0),
            session_errors: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            reply_writes: AtomicU64::new(0),
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let s = s.clone();
                tokio::spawn(async move {
                    if serve(s.clone(), Stream::Plain(tcp)).await.is_err() {
                        s.session_errors.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        Ok(Sink { addr, state })
    }

    /// Messages received in total.
    pub fn total(&self) -> u64 {
        self.state.total.load(Ordering::Relaxed)
    }

    /// Sessions that ended with an error (not counting clean QUITs or closes).
    pub fn session_errors(&self) -> u64 {
        self.state.session_errors.load(Ordering::Relaxed)
    }

    /// Writes of replies so far (pipelined replies share one).
    pub fn reply_writes(&self) -> u64 {
        self.state.reply_writes.load(Ordering::Relaxed)
    }

    /// Completed TLS handshakes so far.
    pub fn handshakes(&self) -> u64 {
        self.state.handshakes.load(Ordering::Relaxed)
    }

    /// Messages received for `tag`.
    pub fn count(&self, tag: &str) -> u64 {
        let tags = self.state.tags.lock().unwrap_or_else(|p| p.into_inner());
        tags.get(tag).map_or(0, |t| t.messages)
    }

    /// The report for `tag`.
    pub fn report(&self, tag: &str) -> SinkReport {
        let mut tags = self.state.tags.lock().unwrap_or_else(|p| p.into_inner());
        let t = tags.entry(tag.to_string()).or_default();
        build_report(tag, t)
    }

    /// Reports for every tag seen.
    pub fn reports(&self) -> Vec<SinkReport> {
        let mut tags = self.state.tags.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<SinkReport> = tags.iter_mut().map(|(k, t)| build_report(k, t)).collect();
        out.sort_by(|a, b| a.tag.cmp(&b.tag));
        out
    }
}

fn build_report(tag: &str, t: &mut TagStats) -> SinkReport {
    SinkReport {
        tag: tag.to_string(),
        messages: t.messages,
        recipients: t.recipients,
        over_tls: t.over_tls,
        bytes: t.bytes,
        first_unix_ns: t.first_ns,
        last_unix_ns: t.last_ns,
        end_to_end: summarize(&mut t.latencies_us),
        missing_stamp: t.missing_stamp,
        tls: t.tls.clone(),
    }
}

/// Queues a reply and sends everything queued once no more input is waiting, as Postfix's
/// smtpd does: a pipelined MAIL, RCPT and DATA get their three replies in one write.
async fn reply(
    state: &State,
    r: &mut LineReader<Stream>,
    out: &mut Vec<u8>,
    text: &[u8],
) -> Result<(), BenchError> {
    out.extend_from_slice(text);
    if r.buffered() > 0 {
        return Ok(());
    }
    flush(state, r, out).await
}

/// Sends every queued reply now.
async fn flush(
    state: &State,
    r: &mut LineReader<Stream>,
    out: &mut Vec<u8>,
) -> Result<(), BenchError> {
    state.reply_writes.fetch_add(1, Ordering::Relaxed);
    let w = r.get_mut();
    w.write_all(out)
        .await
        .map_err(|e| BenchError::net("sink reply", e))?;
    out.clear();
    w.flush()
        .await
        .map_err(|e| BenchError::net("sink reply", e))
}

async fn serve(state: Arc<State>, stream: Stream) -> Result<(), BenchError> {
    let mut r = LineReader::new(stream);
    let mut tls: Option<String> = None;
    let mut recipients = 0u64;
    let mut out = Vec::new();
    reply(
        &state,
        &mut r,
        &mut out,
        format!("220 {} ESMTP sealpost-bench sink\r\n", state.hostname).as_bytes(),
    )
    .await?;
    loop {
        let line = match r.read_line(4096).await {
            Ok(l) => l,
            Err(sealpost_smtp::LineError::Eof) => {
                // answer what came before the end, as far as the client still listens
                if !out.is_empty() {
                    let _ = flush(&state, &mut r, &mut out).await;
                }
                return Ok(());
            }
            Err(e) => {
                return Err(BenchError::Unexpected {
                    command: "line",
                    code: 0,
                    text: e.to_string(),
                })
            }
        };
        let verb: Vec<u8> = line
            .iter()
            .take_while(|b| **b != b' ')
            .map(u8::to_ascii_uppercase)
            .collect();
        match verb.as_slice() {
            b"EHLO" | b"HELO" => {
                let starttls = if tls.is_none() {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                };
                let text = format!(
                    "250-{}\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n{starttls}250 ENHANCEDSTATUSCODES\r\n",
                    state.hostname
                );
                reply(&state, &mut r, &mut out, text.as_bytes()).await?;
            }
            b"STARTTLS" if tls.is_none() => {
                out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
                flush(&state, &mut r, &mut out).await?;
                let (stream, _ahead) = r.into_inner();
                let Stream::Plain(tcp) = stream else {
                    return Ok(());
                };
                let t = state
                    .acceptor
                    .accept(tcp)
                    .await
                    .map_err(|e| BenchError::net("sink TLS handshake", e))?;
                state.handshakes.fetch_add(1, Ordering::Relaxed);
                let conn = t.get_ref().1;
                tls = Some(format!(
                    "{:?} {:?}",
                    conn.protocol_version()
                        .unwrap_or(rustls::ProtocolVersion::Unknown(0)),
                    conn.negotiated_cipher_suite()
                        .map(|s| s.suite())
                        .unwrap_or(rustls::CipherSuite::Unknown(0))
                ));
                r = LineReader::new(Stream::Server(Box::new(t)));
            }
            b"MAIL" => {
                recipients = 0;
                reply(&state, &mut r, &mut out, b"250 2.1.0 Ok\r\n").await?;
            }
            b"RCPT" => {
                recipients += 1;
                reply(&state, &mut r, &mut out, b"250 2.1.5 Ok\r\n").await?;
            }
            b"DATA" => {
                reply(
                    &state,
                    &mut r,
                    &mut out,
                    b"354 End data with <CR><LF>.<CR><LF>\r\n",
                )
                .await?;
                let limits = DataLimits {
                    max_size: 200 * 1024 * 1024,
                    max_line: 1000,
                };
                let msg = read_data(&mut r, limits).await?;
                let now = unix_ns();
                let (run, sent) = bench_headers(&msg);
                {
                    let mut tags = state.tags.lock().unwrap_or_else(|p| p.into_inner());
                    let t = tags.entry(run.unwrap_or_default()).or_default();
                    t.messages += 1;
                    t.recipients += recipients;
                    t.bytes += msg.len() as u64;
                    if t.first_ns == 0 {
                        t.first_ns = now;
                    }
                    t.last_ns = now;
                    match sent {
                        Some(s) if s <= now => t
                            .latencies_us
                            .push(u64::try_from((now - s) / 1000).unwrap_or(u64::MAX)),
                        _ => t.missing_stamp += 1,
                    }
                    if let Some(v) = &tls {
                        t.over_tls += 1;
                        *t.tls.entry(v.clone()).or_default() += 1;
                    }
                }
                let n = state.total.fetch_add(1, Ordering::Relaxed) + 1;
                reply(
                    &state,
                    &mut r,
                    &mut out,
                    format!("250 2.0.0 Ok: queued as sink-{n}\r\n").as_bytes(),
                )
                .await?;
            }
            b"RSET" | b"NOOP" => reply(&state, &mut r, &mut out, b"250 2.0.0 Ok\r\n").await?,
            b"QUIT" => {
                out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                flush(&state, &mut r, &mut out).await?;
                return Ok(());
            }
            _ => {
                reply(
                    &state,
                    &mut r,
                    &mut out,
                    b"502 5.5.1 Command not implemented\r\n",
                )
                .await?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{roots, BenchCa};
    use crate::client::{Client, Security};
    use crate::mix::{body, message};

    /// A bench CA under `dir` and a sink on loopback with a certificate for `mx.bench.test`.
    async fn bench_sink(dir: &std::path::Path) -> (BenchCa, Sink) {
        let ca = BenchCa::create(dir).unwrap();
        let leaf = ca.issue("sink", &["mx.bench.test"]).unwrap();
        let sink = Sink::start(
            "127.0.0.1:0".parse().unwrap(),
            "mx.bench.test",
            &leaf.chain_pem,
            &leaf.key_pem,
        )
        .await
        .unwrap();
        (ca, sink)
    }

    /// A real STARTTLS session from the bench client: the sink counts it under its tag, over
    /// TLS, with a latency from the stamp; a plain message is counted as not over TLS.
    #[tokio::test]
    async fn counts_messages_per_tag_with_tls_and_latency() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, sink) = bench_sink(dir.path()).await;
        let sec =
            Security::starttls(roots(ca.root_pem()).unwrap(), "mx.bench.test", "u", "p").unwrap();
        // The sink does not offer AUTH: the client fails at AUTH after a verified handshake.
        let err = Client::connect(sink.addr, "t", &sec).await.unwrap_err();
        assert!(err.to_string().contains("AUTH"), "{err}");
        let wrong =
            Security::starttls(roots(ca.root_pem()).unwrap(), "other.test", "u", "p").unwrap();
        let err = Client::connect(sink.addr, "t", &wrong).await.unwrap_err();
        assert!(err.to_string().contains("TLS handshake"), "{err}");

        let anon =
            Security::starttls(roots(ca.root_pem()).unwrap(), "mx.bench.test", "", "").unwrap();
        let mut c = Client::connect(sink.addr, "t", &anon).await.unwrap();
        let m = message(
            "tag-tls",
            1,
            "a@x.test",
            "b@bench.test",
            unix_ns(),
            &body(100),
        );
        assert!(
            c.send("a@x.test", "b@bench.test", &m)
                .await
                .unwrap()
                .accepted
        );
        c.quit().await;
        let rep = sink.report("tag-tls");
        assert_eq!((rep.messages, rep.over_tls), (1, 1));
        assert_eq!(sink.handshakes(), 2, "the AUTH attempt and this session");
        assert_eq!(rep.tls.keys().count(), 1);
        assert!(
            rep.tls.keys().all(|k| k.starts_with("TLSv1_3")),
            "{:?}",
            rep.tls
        );

        let mut c = Client::connect(sink.addr, "t", &Security::Plain)
            .await
            .unwrap();
        let sent_at = unix_ns() - 5_000_000; // 5 ms ago
        let m = message("tag-a", 1, "a@x.test", "b@bench.test", sent_at, &body(2000));
        let s = c.send("a@x.test", "b@bench.test", &m).await.unwrap();
        assert!(s.accepted);
        c.quit().await;
        let rep = sink.report("tag-a");
        assert_eq!(rep.messages, 1);
        assert_eq!(rep.recipients, 1);
        assert_eq!(rep.over_tls, 0);
        assert!(rep.end_to_end.p50_ms >= 5.0, "{rep:?}");
        assert_eq!(sink.count("tag-b"), 0);
        assert_eq!(sink.total(), 2);
    }

    /// Pipelined commands get their replies in one write, as from Postfix's smtpd; a command
    /// sent alone is answered at once.
    #[tokio::test]
    async fn pipelined_replies_go_out_together() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let (_ca, sink) = bench_sink(dir.path()).await;
        let mut tcp = tokio::net::TcpStream::connect(sink.addr).await.unwrap();
        let mut buf = vec![0u8; 4096];
        async fn read_until(tcp: &mut tokio::net::TcpStream, buf: &mut [u8], end: &str) -> String {
            let mut got = String::new();
            while !got.ends_with(end) {
                let n = tcp.read(buf).await.unwrap();
                assert!(n > 0, "closed after {got:?}");
                got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
            }
            got
        }
        read_until(&mut tcp, &mut buf, "ESMTP sealpost-bench sink\r\n").await;
        tcp.write_all(b"EHLO t\r\n").await.unwrap();
        read_until(&mut tcp, &mut buf, "250 ENHANCEDSTATUSCODES\r\n").await;
        let before = sink.reply_writes();
        tcp.write_all(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@bench.test>\r\nDATA\r\n")
            .await
            .unwrap();
        let n = tcp.read(&mut buf).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
            "the three replies did not come in order"
        );
        assert_eq!(sink.reply_writes() - before, 1, "three replies, one write");
        tcp.write_all(b"Subject: x\r\n\r\nhi\r\n.\r\n")
            .await
            .unwrap();
        read_until(&mut tcp, &mut buf, "\r\n").await;
        tcp.write_all(b"NOOP\r\n").await.unwrap();
        assert_eq!(
            read_until(&mut tcp, &mut buf, "\r\n").await,
            "250 2.0.0 Ok\r\n"
        );
        assert_eq!(sink.total(), 1);
    }
}
