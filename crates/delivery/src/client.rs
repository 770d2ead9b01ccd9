//! Outbound SMTP over verified TLS: connect, EHLO, STARTTLS (required), handshake, judge,
//! EHLO again, then MAIL/RCPT/DATA with per-recipient results.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sealpost_policy::{connector, judge, AcceptedPeer, Evidence, PolicySpec, TrustStore, Verdict};
use sealpost_smtp::{
    mail_from_line, rcpt_to_line, read_reply, write_data, BodyType, EhloInfo, LineReader,
    MailParams, Mailbox, Notify, RcptParams, Reply, ReplyError, Ret, ReversePath,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

/// Connection settings and the RFC 5321 §4.5.3.2 client timeouts (shortened in tests).
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Name sent in EHLO (`server.hostname`).
    pub helo_name: String,
    /// TCP port of MX hosts (`delivery.port`).
    pub port: u16,
    /// Time allowed to open the TCP connection (`delivery.connect_timeout`).
    pub connect_timeout: Duration,
    /// Time allowed for the 220 greeting (RFC 5321: 5 minutes).
    pub greeting_timeout: Duration,
    /// Time allowed for replies to EHLO, STARTTLS, RSET and QUIT (5 minutes).
    pub command_timeout: Duration,
    /// Time allowed for the TLS handshake.
    pub tls_timeout: Duration,
    /// Time allowed for the reply to MAIL FROM (5 minutes).
    pub mail_timeout: Duration,
    /// Time allowed for the reply to each RCPT TO (5 minutes).
    pub rcpt_timeout: Duration,
    /// Time allowed for the 354 reply to DATA (2 minutes).
    pub data_init_timeout: Duration,
    /// Time allowed to send each 64 KiB block of message data (3 minutes).
    pub data_block_timeout: Duration,
    /// Time allowed for the reply to the final dot (10 minutes).
    pub data_end_timeout: Duration,
}

impl ClientSettings {
    /// The RFC 5321 timeouts with the given EHLO name, port and connect timeout.
    pub fn new(helo_name: impl Into<String>, port: u16, connect_timeout: Duration) -> Self {
        let minutes = |m: u64| Duration::from_secs(60 * m);
        ClientSettings {
            helo_name: helo_name.into(),
            port,
            connect_timeout,
            greeting_timeout: minutes(5),
            command_timeout: minutes(5),
            tls_timeout: minutes(2),
            mail_timeout: minutes(5),
            rcpt_timeout: minutes(5),
            data_init_timeout: minutes(2),
            data_block_timeout: minutes(3),
            data_end_timeout: minutes(10),
        }
    }
}

/// One recipient of a transaction with its DSN parameters as stored in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnRecipient {
    /// Forward-path address.
    pub address: String,
    /// DSN `NOTIFY=` value ("NEVER" or a comma list of SUCCESS, FAILURE, DELAY).
    pub notify: Option<String>,
    /// DSN `ORCPT=` value (`rfc822;addr`).
    pub orcpt: Option<String>,
}

/// One message to send over an open session: envelope and body.
#[derive(Debug, Clone, Copy)]
pub struct Transaction<'a> {
    /// Reverse-path, "" for the null sender.
    pub sender: &'a str,
    /// The recipients, all of one destination.
    pub recipients: &'a [TxnRecipient],
    /// The message, CRLF line endings, not dot-stuffed.
    pub body: &'a [u8],
    /// BODY=8BITMIME was requested at submission.
    pub eight_bit: bool,
    /// SMTPUTF8 was requested at submission.
    pub smtputf8: bool,
    /// DSN `RET=` ("FULL" or "HDRS").
    pub ret: Option<&'a str>,
    /// DSN `ENVID=`.
    pub envid: Option<&'a str>,
}

/// What happened to one recipient of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// The final reply accepted the message for this recipient (the remote reply).
    Delivered(String),
    /// A 4xx reply: try again later (the remote reply, kept for the queue and the DSN).
    Deferred(String),
    /// A 5xx reply: permanent failure (the remote reply).
    Failed(String),
}

/// Why an attempt on one MX address ended before a transaction could start.
#[derive(Debug)]
pub enum OpenError {
    /// No connection passed the policy; the evidence says why (never `verified`).
    Rejected(Box<Evidence>),
    /// The peer passed the policy but the session failed right after (EHLO over TLS).
    Session {
        /// The accepting evidence of the handshake.
        evidence: Box<Evidence>,
        /// What went wrong afterwards.
        detail: String,
    },
}

/// The connection broke, timed out or spoke nonsense in the middle of a transaction.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The server did not answer in time.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// Reading or writing failed.
    #[error("connection failed during {step}: {source}")]
    Io {
        /// The step (e.g. "RCPT").
        step: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The reply could not be read.
    #[error("bad reply to {step}: {source}")]
    Reply {
        /// The step.
        step: &'static str,
        /// The reader's error.
        source: ReplyError,
    },
    /// The message has a bare CR or LF and cannot be sent safely.
    #[error("message has bare CR or LF line endings; refusing to send it")]
    BareLineEnding,
}

/// Why SMTP AUTH at a smarthost did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The server announces no mechanism Sealpost speaks (PLAIN, LOGIN).
    #[error(
        "the server offers no AUTH mechanism Sealpost speaks (PLAIN, LOGIN); it offers: [{0}]"
    )]
    NoMechanism(String),
    /// The server refused the credentials or the exchange.
    #[error("authentication refused: {0}")]
    Refused(String),
    /// The connection failed during the exchange.
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// An open, policy-approved SMTP session to one MX address.
pub struct Session {
    reader: LineReader<TlsStream<TcpStream>>,
    ehlo: EhloInfo,
    peer: AcceptedPeer,
    ip: IpAddr,
    settings: ClientSettings,
    /// Transactions completed on this session (for logging reuse).
    transactions: u32,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("mx", &self.peer.evidence().mx)
            .field("ip", &self.ip)
            .field("transactions", &self.transactions)
            .finish_non_exhaustive()
    }
}

fn rejected(spec: &PolicySpec, mx: &str, ip: IpAddr, v: Verdict, detail: String) -> OpenError {
    OpenError::Rejected(Box::new(Evidence::without_tls(
        spec,
        mx,
        Some(ip),
        v,
        Some(detail),
    )))
}

fn step_verdict(err: &SessionError) -> Verdict {
    match err {
        SessionError::Timeout(_) => Verdict::Timeout,
        _ => Verdict::ConnectionLost,
    }
}

/// How a connection gets to TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsStart {
    /// Plaintext greeting and EHLO, then STARTTLS (required).
    Starttls,
    /// TLS from the first byte (SMTPS); the greeting comes over TLS.
    Implicit,
}

/// Connects to `ip` (MX `mx`) on the delivery port, requires STARTTLS and lets only a peer
/// accepted by `judge` through. Every outcome carries the evidence for the audit log.
pub async fn open(
    settings: &ClientSettings,
    trust: &TrustStore,
    spec: &PolicySpec,
    mx: &str,
    ip: IpAddr,
) -> Result<Session, OpenError> {
    open_at(
        settings,
        trust,
        spec,
        mx,
        SocketAddr::new(ip, settings.port),
        TlsStart::Starttls,
    )
    .await
}

/// Like [`open`] for any address and either way to TLS (smarthosts); the certificate must
/// name `host`.
pub async fn open_at(
    settings: &ClientSettings,
    trust: &TrustStore,
    spec: &PolicySpec,
    mx: &str,
    addr: SocketAddr,
    start: TlsStart,
) -> Result<Session, OpenError> {
    let ip = addr.ip();
    let tcp = match timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            return Err(rejected(
                spec,
                mx,
                ip,
                Verdict::ConnectionLost,
                format!("connect to {addr}: {e}"),
            ))
        }
        Err(_) => {
            return Err(rejected(
                spec,
                mx,
                ip,
                Verdict::Timeout,
                format!("connect to {addr} timed out"),
            ))
        }
    };
    let _ = tcp.set_nodelay(true);
    let ehlo_line = format!("EHLO {}\r\n", settings.helo_name);
    let tcp = match start {
        TlsStart::Starttls => starttls(settings, spec, mx, ip, tcp, &ehlo_line).await?,
        TlsStart::Implicit => tcp,
    };
    let (tls_connector, recorder) = connector(spec, trust, mx)
        .map_err(|e| rejected(spec, mx, ip, Verdict::HandshakeFailed, e.to_string()))?;

    let evidence = match timeout(
        settings.tls_timeout,
        tls_connector.connect(recorder.server_name(), tcp),
    )
    .await
    {
        Ok(Ok(tls)) => {
            let evidence = Evidence::from_handshake(&recorder, Some(ip), tls.get_ref().1);
            (evidence, Some(tls))
        }
        Ok(Err(e)) => (
            Evidence::from_handshake_error(&recorder, Some(ip), &e),
            None,
        ),
        Err(_) => {
            let e = io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out");
            (
                Evidence::from_handshake_error(&recorder, Some(ip), &e),
                None,
            )
        }
    };
    let (evidence, tls) = evidence;
    let peer = judge(spec, evidence).map_err(|r| OpenError::Rejected(r.evidence))?;
    let Some(tls) = tls else {
        // judge only accepts evidence of a completed handshake; keep the type system honest.
        return Err(OpenError::Rejected(Box::new(peer.into_evidence())));
    };
    let mut reader = LineReader::new(tls);
    let session_fail = |peer: &AcceptedPeer, detail: String| OpenError::Session {
        evidence: Box::new(peer.evidence().clone()),
        detail,
    };
    if start == TlsStart::Implicit {
        match reply_within(&mut reader, settings.greeting_timeout, "greeting").await {
            Ok(g) if g.code == 220 => {}
            Ok(g) => return Err(session_fail(&peer, format!("greeting refused: {g}"))),
            Err(e) => return Err(session_fail(&peer, e.to_string())),
        }
    }
    let reply = match command(
        &mut reader,
        &ehlo_line,
        settings.command_timeout,
        "EHLO after STARTTLS",
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return Err(session_fail(&peer, e.to_string())),
    };
    if reply.code != 250 {
        return Err(session_fail(
            &peer,
            format!("EHLO after STARTTLS refused: {reply}"),
        ));
    }
    Ok(Session {
        reader,
        ehlo: EhloInfo::from_reply(&reply),
        peer,
        ip,
        settings: settings.clone(),
        transactions: 0,
    })
}

/// The plaintext part of a STARTTLS connection: greeting, EHLO, STARTTLS; returns the TCP
/// stream ready for the handshake.
async fn starttls(
    settings: &ClientSettings,
    spec: &PolicySpec,
    mx: &str,
    ip: IpAddr,
    tcp: TcpStream,
    ehlo_line: &str,
) -> Result<TcpStream, OpenError> {
    let mut plain = LineReader::new(tcp);
    let fail = |e: SessionError| rejected(spec, mx, ip, step_verdict(&e), e.to_string());
    let greeting = reply_within(&mut plain, settings.greeting_timeout, "greeting")
        .await
        .map_err(fail)?;
    if greeting.code != 220 {
        return Err(rejected(
            spec,
            mx,
            ip,
            Verdict::ConnectionLost,
            format!("greeting refused: {greeting}"),
        ));
    }
    let reply = command(&mut plain, ehlo_line, settings.command_timeout, "EHLO")
        .await
        .map_err(fail)?;
    if reply.code != 250 {
        return Err(rejected(
            spec,
            mx,
            ip,
            Verdict::StarttlsNotOffered,
            format!("EHLO refused: {reply}"),
        ));
    }
    if !EhloInfo::from_reply(&reply).starttls {
        return Err(rejected(
            spec,
            mx,
            ip,
            Verdict::StarttlsNotOffered,
            "EHLO reply has no STARTTLS".to_owned(),
        ));
    }
    let reply = command(
        &mut plain,
        "STARTTLS\r\n",
        settings.command_timeout,
        "STARTTLS",
    )
    .await
    .map_err(fail)?;
    if reply.code != 220 {
        return Err(rejected(
            spec,
            mx,
            ip,
            Verdict::StarttlsRefused,
            format!("STARTTLS answered: {reply}"),
        ));
    }
    // RFC 3207: anything the server sent after its 220 is discarded, never read as a reply.
    let (tcp, buffered) = plain.into_inner();
    if !buffered.is_empty() {
        tracing::debug!(
            mx,
            bytes = buffered.len(),
            "discarding plaintext sent after STARTTLS 220"
        );
    }
    Ok(tcp)
}

impl Session {
    /// The evidence of the handshake that authorised this session.
    pub fn evidence(&self) -> &Evidence {
        self.peer.evidence()
    }

    /// The MX host name.
    pub fn mx(&self) -> &str {
        &self.peer.evidence().mx
    }

    /// The address connected to.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// What the server announced in its EHLO reply after STARTTLS.
    pub fn extensions(&self) -> &EhloInfo {
        &self.ehlo
    }

    /// How many transactions this session has completed.
    pub fn transactions(&self) -> u32 {
        self.transactions
    }

    /// Sends one message; returns one result per recipient, in order.
    ///
    /// A 550 for one recipient does not affect the others. An `Err` means the connection is
    /// unusable and nothing about the recipients is known for sure (treat as temporary).
    pub async fn send(&mut self, txn: &Transaction<'_>) -> Result<Vec<RcptResult>, SessionError> {
        let s = self.settings.clone();
        let mx = self.mx().to_owned();
        let said = |r: &Reply| format!("{mx} said: {r}");
        let n = txn.recipients.len();
        let needs_utf8 = txn.smtputf8
            && (!txn.sender.is_ascii() || txn.recipients.iter().any(|r| !r.address.is_ascii()));
        if needs_utf8 && !self.ehlo.smtputf8 {
            let why = format!("5.6.7 {mx} does not support SMTPUTF8 and the envelope needs it");
            return Ok(vec![RcptResult::Failed(why); n]);
        }
        let Some(from) = reverse_path(txn.sender) else {
            let why = format!("5.1.7 sender address {:?} cannot be sent", txn.sender);
            return Ok(vec![RcptResult::Failed(why); n]);
        };
        let params = self.mail_params(txn);
        let reply = command(
            &mut self.reader,
            &mail_from_line(&from, &params),
            s.mail_timeout,
            "MAIL",
        )
        .await?;
        if !reply.is_positive() {
            self.reset().await;
            let result = if reply.is_permanent() {
                RcptResult::Failed(said(&reply))
            } else {
                RcptResult::Deferred(said(&reply))
            };
            return Ok(vec![result; n]);
        }
        let mut results: Vec<Option<RcptResult>> = Vec::with_capacity(n);
        for rcpt in txn.recipients {
            let Ok(to) = Mailbox::parse(&rcpt.address, true) else {
                results.push(Some(RcptResult::Failed(format!(
                    "5.1.3 recipient address {:?} cannot be sent",
                    rcpt.address
                ))));
                continue;
            };
            let line = rcpt_to_line(&to, &self.rcpt_params(rcpt));
            let reply = command(&mut self.reader, &line, s.rcpt_timeout, "RCPT").await?;
            results.push(match reply.code {
                250 | 251 => None,
                c if c >= 500 => Some(RcptResult::Failed(said(&reply))),
                _ => Some(RcptResult::Deferred(said(&reply))),
            });
        }
        if results.iter().all(Option::is_some) {
            self.reset().await;
            return Ok(results.into_iter().flatten().collect());
        }
        let reply = command(&mut self.reader, "DATA\r\n", s.data_init_timeout, "DATA").await?;
        let final_result = if reply.code == 354 {
            let blocks = u32::try_from(txn.body.len() / 65_536 + 1).unwrap_or(u32::MAX);
            let budget = s.data_block_timeout.saturating_mul(blocks);
            match timeout(budget, write_data(self.reader.get_mut(), txn.body)).await {
                Err(_) => return Err(SessionError::Timeout("sending message data")),
                Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidInput => {
                    return Err(SessionError::BareLineEnding)
                }
                Ok(Err(source)) => {
                    return Err(SessionError::Io {
                        step: "message data",
                        source,
                    })
                }
                Ok(Ok(())) => {}
            }
            let reply = reply_within(&mut self.reader, s.data_end_timeout, "final dot").await?;
            match reply.code {
                250 => RcptResult::Delivered(said(&reply)),
                c if c >= 500 => RcptResult::Failed(said(&reply)),
                _ => RcptResult::Deferred(said(&reply)),
            }
        } else {
            self.reset().await;
            if reply.is_permanent() {
                RcptResult::Failed(said(&reply))
            } else {
                RcptResult::Deferred(said(&reply))
            }
        };
        self.transactions += 1;
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| final_result.clone()))
            .collect())
    }

    /// Authenticates with AUTH PLAIN (or LOGIN if PLAIN is not offered); the password is
    /// never logged.
    pub async fn authenticate(&mut self, user: &str, password: &str) -> Result<(), AuthError> {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let t = self.settings.command_timeout;
        let offers = |m: &str| self.ehlo.auth.iter().any(|a| a == m);
        let reply = if offers("PLAIN") {
            let token = b64(format!("\0{user}\0{password}").as_bytes());
            command(
                &mut self.reader,
                &format!("AUTH PLAIN {token}\r\n"),
                t,
                "AUTH",
            )
            .await?
        } else if offers("LOGIN") {
            let mut reply = command(&mut self.reader, "AUTH LOGIN\r\n", t, "AUTH").await?;
            for secret in [user, password] {
                if reply.code != 334 {
                    return Err(AuthError::Refused(reply.to_string()));
                }
                let line = format!("{}\r\n", b64(secret.as_bytes()));
                reply = command(&mut self.reader, &line, t, "AUTH").await?;
            }
            reply
        } else {
            return Err(AuthError::NoMechanism(self.ehlo.auth.join(" ")));
        };
        if reply.code == 235 {
            Ok(())
        } else {
            Err(AuthError::Refused(reply.to_string()))
        }
    }

    /// Sends RSET; false if the session is no longer usable.
    pub async fn reset(&mut self) -> bool {
        self.reset_within(self.settings.command_timeout).await
    }

    /// Sends RSET with a shorter limit (checking an idle session before reuse).
    pub async fn reset_within(&mut self, limit: Duration) -> bool {
        let limit = limit.min(self.settings.command_timeout);
        matches!(command(&mut self.reader, "RSET\r\n", limit, "RSET").await, Ok(r) if r.code == 250)
    }

    /// Says QUIT and closes (best effort, bounded by the command timeout).
    pub async fn quit(mut self) {
        let t = self.settings.command_timeout.min(Duration::from_secs(10));
        let _ = command(&mut self.reader, "QUIT\r\n", t, "QUIT").await;
        let _ = timeout(t, self.reader.get_mut().shutdown()).await;
    }

    fn mail_params(&self, txn: &Transaction<'_>) -> MailParams {
        let dsn = self.ehlo.dsn;
        MailParams {
            size: self.ehlo.size.map(|_| txn.body.len() as u64),
            body: (txn.eight_bit && self.ehlo.eight_bit_mime).then_some(BodyType::EightBitMime),
            smtputf8: txn.smtputf8 && self.ehlo.smtputf8,
            ret: txn
                .ret
                .filter(|_| dsn)
                .and_then(|r| match r.to_ascii_uppercase().as_str() {
                    "FULL" => Some(Ret::Full),
                    "HDRS" => Some(Ret::Hdrs),
                    _ => None,
                }),
            envid: txn.envid.filter(|_| dsn).map(str::to_owned),
            requiretls: false,
            auth: None,
        }
    }

    fn rcpt_params(&self, rcpt: &TxnRecipient) -> RcptParams {
        if !self.ehlo.dsn {
            return RcptParams::default();
        }
        RcptParams {
            notify: rcpt.notify.as_deref().and_then(parse_notify),
            orcpt: rcpt.orcpt.clone(),
        }
    }
}

fn reverse_path(sender: &str) -> Option<ReversePath> {
    if sender.is_empty() {
        return Some(ReversePath::Null);
    }
    Mailbox::parse(sender, true).ok().map(ReversePath::Mailbox)
}

/// Parses a stored `NOTIFY=` value ("NEVER" or "SUCCESS,FAILURE,DELAY" in any combination).
fn parse_notify(text: &str) -> Option<Notify> {
    if text.eq_ignore_ascii_case("NEVER") {
        return Some(Notify::Never);
    }
    let (mut success, mut failure, mut delay) = (false, false, false);
    for item in text.split(',') {
        match item.trim().to_ascii_uppercase().as_str() {
            "SUCCESS" => success = true,
            "FAILURE" => failure = true,
            "DELAY" => delay = true,
            _ => return None,
        }
    }
    Some(Notify::On {
        success,
        failure,
        delay,
    })
}

/// Writes `line` and reads the reply, all within `limit`.
async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    reader: &mut LineReader<S>,
    line: &str,
    limit: Duration,
    step: &'static str,
) -> Result<Reply, SessionError> {
    let exchange = async {
        let stream = reader.get_mut();
        stream
            .write_all(line.as_bytes())
            .await
            .map_err(|source| SessionError::Io { step, source })?;
        stream
            .flush()
            .await
            .map_err(|source| SessionError::Io { step, source })?;
        read_reply(reader)
            .await
            .map_err(|source| SessionError::Reply { step, source })
    };
    timeout(limit, exchange)
        .await
        .map_err(|_| SessionError::Timeout(step))?
}

async fn reply_within<S: AsyncRead + Unpin>(
    reader: &mut LineReader<S>,
    limit: Duration,
    step: &'static str,
) -> Result<Reply, SessionError> {
    timeout(limit, read_reply(reader))
        .await
        .map_err(|_| SessionError::Timeout(step))?
        .map_err(|source| SessionError::Reply { step, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    const MX: &str = "mx.unit.test";

    /// A CA file the trust store can load, and a server config for `MX` signed by it.
    struct Pki {
        _dir: tempfile::TempDir,
        ca_file: std::path::PathBuf,
        server: Arc<rustls::ServerConfig>,
    }

    fn pki() -> Pki {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Unit Test Root");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf = rcgen::CertificateParams::new(vec![MX.to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        let server = Arc::new(sealpost_policy::server_config(chain, key).unwrap());
        Pki {
            _dir: dir,
            ca_file,
            server,
        }
    }

    #[derive(Default)]
    struct Seen {
        commands: Vec<String>,
        wire: Vec<u8>,
    }

    /// A one-connection SMTP server: STARTTLS if `tls` is given, 550 for `reject`.
    async fn server(
        tls: Option<Arc<rustls::ServerConfig>>,
        reject: &'static str,
        greet: bool,
    ) -> (u16, Arc<Mutex<Seen>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            if !greet {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            tcp.write_all(b"220 mx.unit.test ESMTP\r\n").await.unwrap();
            let mut plain = BufReader::new(tcp);
            let offer = tls.is_some();
            if !dialogue(&mut plain, &log, offer, reject).await {
                return;
            }
            let Some(cfg) = tls else { return };
            let stream = tokio_rustls::TlsAcceptor::from(cfg)
                .accept(plain.into_inner())
                .await;
            if let Ok(stream) = stream {
                dialogue(&mut BufReader::new(stream), &log, false, reject).await;
            }
        });
        (port, seen)
    }

    /// Serves commands; true when STARTTLS was accepted (the caller upgrades).
    async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
        s: &mut BufReader<S>,
        log: &Mutex<Seen>,
        offer: bool,
        reject: &str,
    ) -> bool {
        let mut in_data = false;
        loop {
            let mut line = Vec::new();
            if s.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                return false;
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            if in_data {
                log.lock().unwrap().wire.extend_from_slice(&line);
                if text == "." {
                    in_data = false;
                    s.get_mut()
                        .write_all(b"250 2.0.0 queued\r\n")
                        .await
                        .unwrap();
                }
                continue;
            }
            log.lock().unwrap().commands.push(text.clone());
            let out: &[u8] = match text.split([' ', ':']).next().unwrap_or("") {
                "EHLO" if offer => b"250-mx.unit.test\r\n250-STARTTLS\r\n250 SIZE 1000\r\n",
                "EHLO" => b"250-mx.unit.test\r\n250 DSN\r\n",
                "STARTTLS" => {
                    s.get_mut().write_all(b"220 2.0.0 go\r\n").await.unwrap();
                    return true;
                }
                "RCPT" if text.contains(reject) => b"550 5.1.1 unknown user\r\n",
                "DATA" => {
                    in_data = true;
                    b"354 go\r\n"
                }
                "QUIT" => b"221 bye\r\n",
                _ => b"250 ok\r\n",
            };
            s.get_mut().write_all(out).await.unwrap();
        }
    }

    /// An implicit-TLS server for one connection offering `mechs` and accepting `user`/`pw`.
    async fn implicit_auth_server(
        cfg: Arc<rustls::ServerConfig>,
        mechs: &'static str,
    ) -> (u16, Arc<Mutex<Seen>>) {
        use base64::Engine as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(cfg)
                .accept(tcp)
                .await
                .unwrap();
            let mut s = BufReader::new(tls);
            s.get_mut().write_all(b"220 smart ESMTP\r\n").await.unwrap();
            let mut login_step = 0;
            loop {
                let mut line = String::new();
                if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let text = line.trim_end().to_owned();
                log.lock().unwrap().commands.push(text.clone());
                let decode = |t: &str| {
                    base64::engine::general_purpose::STANDARD
                        .decode(t)
                        .unwrap_or_default()
                };
                let out = if text.starts_with("EHLO") {
                    format!("250-smart\r\n250 AUTH {mechs}\r\n")
                } else if let Some(t) = text.strip_prefix("AUTH PLAIN ") {
                    if decode(t) == b"\0u\0right" {
                        "235 ok\r\n"
                    } else {
                        "535 no\r\n"
                    }
                    .into()
                } else if text == "AUTH LOGIN" {
                    login_step = 1;
                    "334 VXNlcm5hbWU6\r\n".into()
                } else if login_step == 1 {
                    login_step = 2;
                    if decode(&text) == b"u" {
                        "334 UGFzc3dvcmQ6\r\n"
                    } else {
                        "535 no\r\n"
                    }
                    .into()
                } else if login_step == 2 {
                    login_step = 0;
                    if decode(&text) == b"right" {
                        "235 ok\r\n"
                    } else {
                        "535 no\r\n"
                    }
                    .into()
                } else {
                    "250 ok\r\n".to_owned()
                };
                s.get_mut().write_all(out.as_bytes()).await.unwrap();
            }
        });
        (port, seen)
    }

    #[tokio::test]
    async fn implicit_tls_is_verified_before_the_greeting_and_auth_plain_or_login_works() {
        let pki = pki();
        let trust = TrustStore::new(std::slice::from_ref(&pki.ca_file)).unwrap();
        let connect = |port: u16| {
            let trust = trust.clone();
            async move {
                let addr = SocketAddr::new(LOCAL, port);
                open_at(
                    &settings(port),
                    &trust,
                    &spec(),
                    MX,
                    addr,
                    TlsStart::Implicit,
                )
                .await
            }
        };
        // PLAIN with the right password.
        let (port, seen) = implicit_auth_server(pki.server.clone(), "LOGIN PLAIN").await;
        let mut session = connect(port).await.unwrap();
        assert_eq!(session.evidence().reason, Verdict::Verified);
        session.authenticate("u", "right").await.unwrap();
        session.quit().await;
        let commands = seen.lock().unwrap().commands.clone();
        assert!(
            commands[0].starts_with("EHLO"),
            "no plaintext exchange first: {commands:?}"
        );
        assert!(commands[1].starts_with("AUTH PLAIN "), "{commands:?}");
        // PLAIN with a wrong password is refused.
        let (port, _) = implicit_auth_server(pki.server.clone(), "PLAIN").await;
        let mut session = connect(port).await.unwrap();
        let err = session.authenticate("u", "wrong").await.unwrap_err();
        assert!(
            matches!(err, AuthError::Refused(ref r) if r.contains("535")),
            "{err}"
        );
        // LOGIN when PLAIN is not offered.
        let (port, _) = implicit_auth_server(pki.server.clone(), "LOGIN").await;
        let mut session = connect(port).await.unwrap();
        session.authenticate("u", "right").await.unwrap();
        // Nothing we speak.
        let (port, _) = implicit_auth_server(pki.server.clone(), "CRAM-MD5").await;
        let mut session = connect(port).await.unwrap();
        assert!(matches!(
            session.authenticate("u", "right").await,
            Err(AuthError::NoMechanism(m)) if m == "CRAM-MD5"
        ));
    }

    #[tokio::test]
    async fn implicit_tls_to_an_untrusted_certificate_is_rejected() {
        let trusted = pki();
        let other = pki();
        let trust = TrustStore::new(std::slice::from_ref(&trusted.ca_file)).unwrap();
        let (port, seen) = implicit_auth_server(other.server.clone(), "PLAIN").await;
        let addr = SocketAddr::new(LOCAL, port);
        let err = open_at(
            &settings(port),
            &trust,
            &spec(),
            MX,
            addr,
            TlsStart::Implicit,
        )
        .await
        .unwrap_err();
        assert!(
            // both test roots have the same name: the chain fails on the signature
            matches!(&err, OpenError::Rejected(e)
                if matches!(e.reason, Verdict::UnknownIssuer | Verdict::BadSignature)),
            "{err:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            seen.lock().unwrap().commands.is_empty(),
            "no command after a failed handshake"
        );
    }

    fn settings(port: u16) -> ClientSettings {
        let mut s = ClientSettings::new("relay.unit.test", port, Duration::from_secs(5));
        s.greeting_timeout = Duration::from_millis(300);
        s
    }

    fn spec() -> PolicySpec {
        PolicySpec::new("phi", sealpost_policy::TlsRequirement::Verified)
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn verified_session_gives_per_recipient_results_and_dot_stuffs() {
        let pki = pki();
        let trust = TrustStore::new(std::slice::from_ref(&pki.ca_file)).unwrap();
        let (port, seen) = server(Some(pki.server.clone()), "nobody@", true).await;
        let mut session = open(&settings(port), &trust, &spec(), MX, LOCAL)
            .await
            .unwrap();
        assert_eq!(session.evidence().reason, Verdict::Verified);
        // RFC 3207: only the EHLO after TLS counts (SIZE was announced only before it).
        assert_eq!(session.extensions().size, None);
        assert!(session.extensions().dsn);
        let rcpts = [
            TxnRecipient {
                address: "nobody@unit.test".into(),
                notify: None,
                orcpt: None,
            },
            TxnRecipient {
                address: "someone@unit.test".into(),
                notify: None,
                orcpt: None,
            },
        ];
        let body = b"Subject: x\r\n\r\n.dot line\r\nend\r\n";
        let txn = Transaction {
            sender: "app@clinic.test",
            recipients: &rcpts,
            body,
            eight_bit: false,
            smtputf8: false,
            ret: None,
            envid: None,
        };
        let results = session.send(&txn).await.unwrap();
        assert!(
            matches!(&results[0], RcptResult::Failed(r) if r.contains("550 5.1.1")),
            "{results:?}"
        );
        assert!(
            matches!(&results[1], RcptResult::Delivered(r) if r.contains("250")),
            "{results:?}"
        );
        assert!(session.reset().await);
        session.quit().await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.wire, b"Subject: x\r\n\r\n..dot line\r\nend\r\n.\r\n");
        // Nothing of the envelope went out before TLS; EHLO was repeated after it.
        let ehlos = seen
            .commands
            .iter()
            .filter(|c| c.starts_with("EHLO"))
            .count();
        assert_eq!(ehlos, 2, "{:?}", seen.commands);
        let starttls = seen.commands.iter().position(|c| c == "STARTTLS").unwrap();
        let mail = seen
            .commands
            .iter()
            .position(|c| c.starts_with("MAIL"))
            .unwrap();
        assert!(starttls < mail);
        assert!(
            seen.commands
                .iter()
                .any(|c| c == "MAIL FROM:<app@clinic.test>"),
            "{:?}",
            seen.commands
        );
    }

    #[tokio::test]
    async fn no_starttls_is_refused_before_any_envelope() {
        let pki = pki();
        let trust = TrustStore::new(std::slice::from_ref(&pki.ca_file)).unwrap();
        let (port, seen) = server(None, "", true).await;
        let Err(OpenError::Rejected(ev)) = open(&settings(port), &trust, &spec(), MX, LOCAL).await
        else {
            panic!("plaintext server accepted");
        };
        assert_eq!(ev.reason, Verdict::StarttlsNotOffered);
        assert_eq!(ev.ip, Some(LOCAL));
        assert!(ev.tls.is_none());
        let seen = seen.lock().unwrap();
        assert!(
            !seen.commands.iter().any(|c| c.starts_with("MAIL")),
            "{:?}",
            seen.commands
        );
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_judged_and_refused() {
        let pki = pki();
        let trust = TrustStore::new(&[]).unwrap(); // Mozilla roots only
        let (port, seen) = server(Some(pki.server.clone()), "", true).await;
        let Err(OpenError::Rejected(ev)) = open(&settings(port), &trust, &spec(), MX, LOCAL).await
        else {
            panic!("untrusted server accepted");
        };
        assert_eq!(ev.reason, Verdict::UnknownIssuer);
        assert_eq!(ev.tls.as_ref().unwrap().chain_sha256.len(), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!seen
            .lock()
            .unwrap()
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL")));
    }

    #[tokio::test]
    async fn a_silent_server_times_out_at_the_greeting() {
        let trust = TrustStore::new(&[]).unwrap();
        let (port, _) = server(None, "", false).await;
        let started = std::time::Instant::now();
        let Err(OpenError::Rejected(ev)) = open(&settings(port), &trust, &spec(), MX, LOCAL).await
        else {
            panic!("no greeting but accepted");
        };
        assert_eq!(ev.reason, Verdict::Timeout);
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn notify_values_parse() {
        assert_eq!(parse_notify("NEVER"), Some(Notify::Never));
        assert_eq!(
            parse_notify("SUCCESS,DELAY"),
            Some(Notify::On {
                success: true,
                failure: false,
                delay: true
            })
        );
        assert_eq!(parse_notify("bogus"), None);
    }

    #[test]
    fn null_and_mailbox_reverse_paths() {
        assert_eq!(reverse_path(""), Some(ReversePath::Null));
        assert!(matches!(
            reverse_path("a@b.test"),
            Some(ReversePath::Mailbox(_))
        ));
        assert_eq!(reverse_path("not an address"), None);
    }
}
