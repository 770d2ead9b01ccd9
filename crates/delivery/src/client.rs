//! Outbound SMTP over verified TLS: connect, EHLO, STARTTLS (required), handshake, judge,
//! EHLO again, then MAIL/RCPT/DATA with per-recipient results.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use sealpost_audit::Json;
use sealpost_policy::{connector, judge, AcceptedPeer, Evidence, PolicySpec, TrustStore, Verdict};
use sealpost_smtp::{
    mail_from_line, rcpt_to_line, read_reply, write_data, BodyType, EhloInfo, LineReader,
    MailParams, Mailbox, Notify, RcptParams, Reply, ReplyError, Ret, ReversePath,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

/// Longest wait for the first reply of a transaction on a reused session; past it the session
/// counts as stale and the transaction moves to a new connection.
pub const REUSED_FIRST_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// A reused session turned out to be closed (or closing) before this transaction began.
    #[error("the cached connection was no longer usable: {0}")]
    Stale(String),
    /// A reply that the command cannot have (e.g. 354 to MAIL): client and server are out of step.
    #[error("unexpected reply to {step}: {reply}")]
    OutOfStep {
        /// The step.
        step: &'static str,
        /// The reply as received.
        reply: String,
    },
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
    /// False once the session may be out of step with the server (a failed RSET, a reply
    /// that does not fit the command): it must not carry another transaction.
    in_step: bool,
    /// The evidence as audit records carry it, serialised on first use (once per connection,
    /// not once per message).
    evidence_json: OnceLock<Json>,
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
        in_step: true,
        evidence_json: OnceLock::new(),
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

    /// [`Session::evidence`] as audit records carry it.
    pub fn evidence_json(&self) -> Json {
        self.evidence_json
            .get_or_init(|| Json::of(self.peer.evidence()))
            .clone()
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

    /// Whether the session can carry another transaction (no failed RSET, no unexpected reply).
    pub fn in_step(&self) -> bool {
        self.in_step
    }

    /// Whether the server sent something (a goodbye, a late reply) or closed the connection
    /// while the session sat idle. SMTP servers speak only when spoken to, so such a session is
    /// closing or out of step. Checks without waiting.
    fn spoke_while_idle(&mut self) -> bool {
        if self.reader.buffered() > 0 {
            return true;
        }
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // data, end of file or an error are all "spoke"; only Pending means silence
        std::pin::Pin::new(self.reader.get_mut())
            .poll_read(&mut cx, &mut buf)
            .is_ready()
    }

    /// Sends one message; returns one result per recipient, in order.
    ///
    /// A 550 for one recipient does not affect the others. An `Err` means the connection is
    /// unusable and nothing about the recipients is known for sure (treat as temporary), except
    /// [`SessionError::Stale`]: a reused session the server had already closed, before any of
    /// this transaction was accepted, so it can be retried on a new connection at once.
    /// When the server offers PIPELINING (RFC 2920), MAIL, every RCPT and DATA go in one write.
    pub async fn send(&mut self, txn: &Transaction<'_>) -> Result<Vec<RcptResult>, SessionError> {
        let n = txn.recipients.len();
        let needs_utf8 = txn.smtputf8
            && (!txn.sender.is_ascii() || txn.recipients.iter().any(|r| !r.address.is_ascii()));
        if needs_utf8 && !self.ehlo.smtputf8 {
            let why = format!(
                "5.6.7 {} does not support SMTPUTF8 and the envelope needs it",
                self.mx()
            );
            return Ok(vec![RcptResult::Failed(why); n]);
        }
        let Some(from) = reverse_path(txn.sender) else {
            let why = format!("5.1.7 sender address {:?} cannot be sent", txn.sender);
            return Ok(vec![RcptResult::Failed(why); n]);
        };
        if !self.in_step {
            return Err(SessionError::Stale(
                "earlier replies were out of step".into(),
            ));
        }
        if self.transactions > 0 && self.spoke_while_idle() {
            return Err(SessionError::Stale(
                "the server spoke or closed the connection while it was idle".into(),
            ));
        }
        let mail = mail_from_line(&from, &self.mail_params(txn));
        // one entry per recipient: the RCPT line to send, or why it cannot be sent
        let rcpts: Vec<Result<String, RcptResult>> = txn
            .recipients
            .iter()
            .map(|rcpt| match Mailbox::parse(&rcpt.address, true) {
                Ok(to) => Ok(rcpt_to_line(&to, &self.rcpt_params(rcpt))),
                Err(_) => Err(RcptResult::Failed(format!(
                    "5.1.3 recipient address {:?} cannot be sent",
                    rcpt.address
                ))),
            })
            .collect();
        if rcpts.iter().all(Result::is_err) {
            // no recipient can be sent: no transaction is started
            return Ok(rcpts.into_iter().filter_map(Result::err).collect());
        }
        let sent = if self.ehlo.pipelining {
            self.send_pipelined(&mail, rcpts, txn.body).await
        } else {
            self.send_in_steps(&mail, rcpts, txn.body).await
        };
        match sent {
            Ok(results) => {
                self.transactions += 1;
                Ok(results)
            }
            Err(e) => {
                self.in_step = false;
                Err(e)
            }
        }
    }

    /// The MAIL, RCPT and DATA reply timeouts.
    fn step_timeouts(&self) -> (Duration, Duration, Duration) {
        let s = &self.settings;
        (s.mail_timeout, s.rcpt_timeout, s.data_init_timeout)
    }

    fn said(&self, r: &Reply) -> String {
        format!("{} said: {r}", self.mx())
    }

    /// The result of a refused MAIL or DATA, for every recipient it affects.
    fn refused(&self, reply: &Reply) -> RcptResult {
        if reply.is_permanent() {
            RcptResult::Failed(self.said(reply))
        } else {
            RcptResult::Deferred(self.said(reply))
        }
    }

    /// The result of one RCPT reply: `None` if accepted.
    fn rcpt_result(&self, reply: &Reply) -> Result<Option<RcptResult>, SessionError> {
        match reply.code {
            250 | 251 => Ok(None),
            400..=499 => Ok(Some(RcptResult::Deferred(self.said(reply)))),
            500..=599 => Ok(Some(RcptResult::Failed(self.said(reply)))),
            _ => Err(out_of_step("RCPT", reply)),
        }
    }

    /// Whether a failure before the first reply of a transaction means a reused session had
    /// been closed by the server (nothing of this transaction was accepted).
    fn stale(&self, e: &SessionError) -> bool {
        self.transactions > 0
            && matches!(
                e,
                SessionError::Io { .. }
                    | SessionError::Timeout(_)
                    | SessionError::Reply {
                        source: ReplyError::Eof | ReplyError::Io(_),
                        ..
                    }
            )
    }

    /// Writes `lines` (MAIL, or a pipelined group) and reads the transaction's first reply; on a
    /// reused session a closed connection, a timeout of [`REUSED_FIRST_REPLY_TIMEOUT`] or a 421
    /// becomes [`SessionError::Stale`].
    async fn first_reply(&mut self, limit: Duration, lines: &str) -> Result<Reply, SessionError> {
        let limit = if self.transactions > 0 {
            limit.min(REUSED_FIRST_REPLY_TIMEOUT)
        } else {
            limit
        };
        match command(&mut self.reader, lines, limit, "MAIL").await {
            Err(e) if self.stale(&e) => Err(SessionError::Stale(e.to_string())),
            Ok(r) if r.code == 421 && self.transactions > 0 => {
                Err(SessionError::Stale(r.to_string()))
            }
            other => other,
        }
    }

    /// MAIL, RCPT and DATA one at a time, each waiting for its reply.
    async fn send_in_steps(
        &mut self,
        mail: &str,
        rcpts: Vec<Result<String, RcptResult>>,
        body: &[u8],
    ) -> Result<Vec<RcptResult>, SessionError> {
        let (mail_t, rcpt_t, data_t) = self.step_timeouts();
        let n = rcpts.len();
        let reply = self.first_reply(mail_t, mail).await?;
        if !accepted("MAIL", &reply, 250)? {
            self.reset().await;
            return Ok(vec![self.refused(&reply); n]);
        }
        let mut results: Vec<Option<RcptResult>> = Vec::with_capacity(n);
        for rcpt in rcpts {
            match rcpt {
                Err(failed) => results.push(Some(failed)),
                Ok(line) => {
                    let reply = command(&mut self.reader, &line, rcpt_t, "RCPT").await?;
                    results.push(self.rcpt_result(&reply)?);
                }
            }
        }
        if results.iter().all(Option::is_some) {
            self.reset().await;
            return Ok(results.into_iter().flatten().collect());
        }
        let reply = command(&mut self.reader, "DATA\r\n", data_t, "DATA").await?;
        self.finish(&reply, body, results).await
    }

    /// MAIL, every RCPT and DATA in one write (RFC 2920), then their replies in order.
    async fn send_pipelined(
        &mut self,
        mail: &str,
        rcpts: Vec<Result<String, RcptResult>>,
        body: &[u8],
    ) -> Result<Vec<RcptResult>, SessionError> {
        let (mail_t, rcpt_t, data_t) = self.step_timeouts();
        let n = rcpts.len();
        let mut batch = String::from(mail);
        for line in rcpts.iter().flatten() {
            batch.push_str(line);
        }
        batch.push_str("DATA\r\n");
        let mail_reply = self.first_reply(mail_t, &batch).await?;
        let sent = rcpts.iter().filter(|r| r.is_ok()).count();
        if !accepted("MAIL", &mail_reply, 250)? {
            // refused: the answer is definite whatever happens to the rest of the group
            self.end_group(sent).await;
            return Ok(vec![self.refused(&mail_reply); n]);
        }
        let mut results: Vec<Option<RcptResult>> = Vec::with_capacity(n);
        for rcpt in rcpts {
            match rcpt {
                Err(failed) => results.push(Some(failed)),
                Ok(_) => {
                    let reply = reply_within(&mut self.reader, rcpt_t, "RCPT").await?;
                    results.push(self.rcpt_result(&reply)?);
                }
            }
        }
        if results.iter().all(Option::is_some) {
            // every recipient refused: definite answers, whatever happens to DATA
            self.end_group(0).await;
            return Ok(results.into_iter().flatten().collect());
        }
        let data_reply = reply_within(&mut self.reader, data_t, "DATA").await?;
        self.finish(&data_reply, body, results).await
    }

    /// Ends a pipelined group that will send no message: reads the `rcpt_replies` RCPT replies
    /// still due and the DATA reply, ends an accepted DATA with a lone dot (RFC 2920 3.1), and
    /// sends RSET. Anything that fails or does not fit takes the session out of reuse.
    async fn end_group(&mut self, rcpt_replies: usize) {
        let (_, rcpt_t, data_t) = self.step_timeouts();
        let end_t = self.settings.data_end_timeout;
        let ended = async {
            for _ in 0..rcpt_replies {
                reply_within(&mut self.reader, rcpt_t, "RCPT").await?;
            }
            let data = reply_within(&mut self.reader, data_t, "DATA").await?;
            if accepted("DATA", &data, 354)? {
                command(&mut self.reader, ".\r\n", end_t, "final dot").await?;
            }
            Ok::<(), SessionError>(())
        }
        .await;
        if ended.is_err() {
            self.in_step = false;
        } else {
            self.reset().await;
        }
    }

    /// After the reply to DATA: sends the data if it was 354; every accepted recipient (`None`
    /// in `results`) gets the final result.
    async fn finish(
        &mut self,
        data_reply: &Reply,
        body: &[u8],
        results: Vec<Option<RcptResult>>,
    ) -> Result<Vec<RcptResult>, SessionError> {
        let final_result = if accepted("DATA", data_reply, 354)? {
            self.data(body).await?
        } else {
            self.reset().await;
            self.refused(data_reply)
        };
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| final_result.clone()))
            .collect())
    }

    /// Sends the message data after a 354 and reads the final reply.
    async fn data(&mut self, body: &[u8]) -> Result<RcptResult, SessionError> {
        let s = &self.settings;
        let blocks = u32::try_from(body.len() / 65_536 + 1).unwrap_or(u32::MAX);
        let budget = s.data_block_timeout.saturating_mul(blocks);
        let data_end = s.data_end_timeout;
        match timeout(budget, write_data(self.reader.get_mut(), body)).await {
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
        let reply = reply_within(&mut self.reader, data_end, "final dot").await?;
        Ok(match reply.code {
            250 => RcptResult::Delivered(self.said(&reply)),
            500..=599 => RcptResult::Failed(self.said(&reply)),
            400..=499 => RcptResult::Deferred(self.said(&reply)),
            _ => {
                // not a reply the final dot can have: retry later (a possible duplicate,
                // never a loss) and do not reuse the session
                self.in_step = false;
                RcptResult::Deferred(self.said(&reply))
            }
        })
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

    /// Sends RSET with a shorter limit; false (and the session leaves reuse) if it failed.
    pub async fn reset_within(&mut self, limit: Duration) -> bool {
        let limit = limit.min(self.settings.command_timeout);
        let ok = matches!(command(&mut self.reader, "RSET\r\n", limit, "RSET").await, Ok(r) if r.code == 250);
        if !ok {
            // a late or missing reply would be read as the next command's
            self.in_step = false;
        }
        ok
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

/// Whether `reply` accepts `step` (`want`, e.g. 250 for MAIL) or refuses it (4xx, 5xx); any
/// other code cannot answer that command, so client and server are out of step.
fn accepted(step: &'static str, reply: &Reply, want: u16) -> Result<bool, SessionError> {
    match reply.code {
        c if c == want => Ok(true),
        400..=599 => Ok(false),
        _ => Err(out_of_step(step, reply)),
    }
}

fn out_of_step(step: &'static str, reply: &Reply) -> SessionError {
    SessionError::OutOfStep {
        step,
        reply: reply.to_string(),
    }
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
        /// Pipelined groups as the pipelining server answered them.
        groups: Vec<Vec<String>>,
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

    /// How the pipelining server answers.
    struct Script {
        mail: &'static str,
        /// RCPT addresses containing this get 550.
        reject: &'static str,
        data: &'static str,
        /// After this many transactions (0: right after the EHLO that follows STARTTLS), write
        /// the text (may be empty) and close without QUIT, like an idle timeout.
        hang_up: Option<(usize, &'static str)>,
        /// The reply to RSET.
        rset: &'static str,
        /// Answer only MAIL of a pipelined group, then close.
        close_after_mail: bool,
    }

    const ACCEPTING: Script = Script {
        mail: "250 2.1.0 ok\r\n",
        reject: "nobody@",
        data: "354 go\r\n",
        hang_up: None,
        rset: "250 2.0.0 ok\r\n",
        close_after_mail: false,
    };

    /// A one-connection server offering PIPELINING after STARTTLS. It answers MAIL and RCPT only
    /// when DATA arrives, so a client that waited for each reply would stall.
    async fn pipelining_server(
        cfg: Arc<rustls::ServerConfig>,
        script: Script,
    ) -> (u16, Arc<Mutex<Seen>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tcp.write_all(b"220 mx.unit.test ESMTP\r\n").await.unwrap();
            let mut plain = BufReader::new(tcp);
            for answer in [
                &b"250-mx.unit.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"[..],
                b"220 go\r\n",
            ] {
                let mut line = String::new();
                plain.read_line(&mut line).await.unwrap();
                plain.get_mut().write_all(answer).await.unwrap();
            }
            let tls = tokio_rustls::TlsAcceptor::from(cfg)
                .accept(plain.into_inner())
                .await
                .unwrap();
            let mut s = BufReader::new(tls);
            let (mut pending, mut group) = (String::new(), Vec::new());
            let (mut in_data, mut done) = (false, 0usize);
            loop {
                let mut line = Vec::new();
                if s.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                let mut out = String::new();
                if in_data {
                    log.lock().unwrap().wire.extend_from_slice(&line);
                    if text == "." {
                        in_data = false;
                        done += 1;
                        out.push_str("250 2.0.0 queued\r\n");
                    }
                } else {
                    log.lock().unwrap().commands.push(text.clone());
                    match text.split([' ', ':']).next().unwrap_or("") {
                        "EHLO" => out.push_str("250-mx.unit.test\r\n250 PIPELINING\r\n"),
                        "MAIL" => {
                            group.push(text.clone());
                            pending.push_str(script.mail);
                        }
                        "RCPT" => {
                            group.push(text.clone());
                            pending.push_str(if text.contains(script.reject) {
                                "550 5.1.1 unknown user\r\n"
                            } else {
                                "250 2.1.5 ok\r\n"
                            });
                        }
                        "DATA" if script.close_after_mail => {
                            let first = pending.split_inclusive("\r\n").next().unwrap_or("");
                            s.get_mut().write_all(first.as_bytes()).await.unwrap();
                            return;
                        }
                        "DATA" => {
                            group.push(text.clone());
                            log.lock().unwrap().groups.push(std::mem::take(&mut group));
                            out = std::mem::take(&mut pending);
                            out.push_str(script.data);
                            in_data = script.data.starts_with("354");
                        }
                        "QUIT" => out.push_str("221 bye\r\n"),
                        "RSET" => out.push_str(script.rset),
                        _ => out.push_str("250 ok\r\n"),
                    }
                }
                s.get_mut().write_all(out.as_bytes()).await.unwrap();
                let idle = !in_data && pending.is_empty();
                if let Some((after, text)) = script.hang_up {
                    if idle && done == after && !out.is_empty() {
                        s.get_mut().write_all(text.as_bytes()).await.unwrap();
                        return;
                    }
                }
            }
        });
        (port, seen)
    }

    fn recipients(addresses: &[&str]) -> Vec<TxnRecipient> {
        addresses
            .iter()
            .map(|a| TxnRecipient {
                address: (*a).into(),
                notify: None,
                orcpt: None,
            })
            .collect()
    }

    fn message<'a>(rcpts: &'a [TxnRecipient], body: &'a [u8]) -> Transaction<'a> {
        Transaction {
            sender: "app@clinic.test",
            recipients: rcpts,
            body,
            eight_bit: false,
            smtputf8: false,
            ret: None,
            envid: None,
        }
    }

    async fn pipelined_session(script: Script) -> (Session, Arc<Mutex<Seen>>, Pki) {
        let pki = pki();
        let trust = TrustStore::new(std::slice::from_ref(&pki.ca_file)).unwrap();
        let (port, seen) = pipelining_server(pki.server.clone(), script).await;
        let session = open(&settings(port), &trust, &spec(), MX, LOCAL)
            .await
            .unwrap();
        assert!(session.extensions().pipelining);
        (session, seen, pki)
    }

    fn assert_all_failed(results: &[RcptResult], reply: &str) {
        assert!(
            results
                .iter()
                .all(|r| matches!(r, RcptResult::Failed(w) if w.contains(reply))),
            "every recipient should fail with {reply}: {results:?}"
        );
    }

    /// `send`, failing the test instead of waiting out a 5-minute SMTP timeout.
    async fn send_within(
        session: &mut Session,
        txn: &Transaction<'_>,
    ) -> Result<Vec<RcptResult>, SessionError> {
        tokio::time::timeout(Duration::from_secs(10), session.send(txn))
            .await
            .expect("the client waited for a reply the server holds until DATA")
    }

    #[tokio::test]
    async fn with_pipelining_mail_rcpts_and_data_go_as_one_group() {
        let (mut session, seen, _pki) = pipelined_session(ACCEPTING).await;
        let rcpts = recipients(&["nobody@unit.test", "someone@unit.test"]);
        let results = send_within(&mut session, &message(&rcpts, b"Hi\r\n.dot\r\n"))
            .await
            .unwrap();
        assert!(
            matches!(&results[0], RcptResult::Failed(r) if r.contains("550 5.1.1")),
            "{results:?}"
        );
        assert!(
            matches!(&results[1], RcptResult::Delivered(r) if r.contains("250 2.0.0")),
            "{results:?}"
        );
        session.quit().await;
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.groups,
            vec![vec![
                "MAIL FROM:<app@clinic.test>".to_owned(),
                "RCPT TO:<nobody@unit.test>".to_owned(),
                "RCPT TO:<someone@unit.test>".to_owned(),
                "DATA".to_owned(),
            ]]
        );
        assert_eq!(seen.wire, b"Hi\r\n..dot\r\n.\r\n");
    }

    #[tokio::test]
    async fn with_pipelining_and_every_recipient_refused_an_accepted_data_ends_empty() {
        let (mut session, seen, _pki) = pipelined_session(ACCEPTING).await;
        let rcpts = recipients(&["nobody@unit.test", "nobody@other.test"]);
        let results = send_within(&mut session, &message(&rcpts, b"PHI\r\n"))
            .await
            .unwrap();
        assert_all_failed(&results, "550 5.1.1");
        // the session is still in step: a second transaction works
        let ok = recipients(&["someone@unit.test"]);
        let results = send_within(&mut session, &message(&ok, b"Two\r\n"))
            .await
            .unwrap();
        assert!(
            matches!(&results[0], RcptResult::Delivered(_)),
            "{results:?}"
        );
        let seen = seen.lock().unwrap();
        // RFC 2920 3.1: a lone dot, never the body, then RSET
        assert_eq!(seen.wire, b".\r\nTwo\r\n.\r\n");
        assert!(
            seen.commands.iter().any(|c| c == "RSET"),
            "{:?}",
            seen.commands
        );
    }

    #[tokio::test]
    async fn with_pipelining_a_refused_mail_fails_every_recipient_and_sends_no_data() {
        let (mut session, seen, _pki) = pipelined_session(Script {
            mail: "550 5.7.1 sender blocked\r\n",
            data: "503 5.5.1 no valid recipients\r\n",
            ..ACCEPTING
        })
        .await;
        let rcpts = recipients(&["a@unit.test", "b@unit.test"]);
        let results = send_within(&mut session, &message(&rcpts, b"PHI\r\n"))
            .await
            .unwrap();
        assert_all_failed(&results, "550 5.7.1");
        assert!(seen.lock().unwrap().wire.is_empty());
    }

    #[tokio::test]
    async fn a_reply_that_does_not_fit_its_command_stops_the_transaction_before_any_data() {
        let (mut session, seen, _pki) = pipelined_session(Script {
            mail: "354 go ahead\r\n",
            ..ACCEPTING
        })
        .await;
        let rcpts = recipients(&["someone@unit.test"]);
        let err = send_within(&mut session, &message(&rcpts, b"PHI\r\n"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SessionError::OutOfStep { step: "MAIL", reply } if reply.contains("354")),
            "{err}"
        );
        assert!(!session.in_step());
        assert!(
            seen.lock().unwrap().wire.is_empty(),
            "no data without a 354 to DATA"
        );
    }

    #[tokio::test]
    async fn with_pipelining_a_refused_mail_counts_even_if_the_server_then_hangs_up() {
        let (mut session, seen, _pki) = pipelined_session(Script {
            mail: "554 5.7.1 no mail from you\r\n",
            close_after_mail: true,
            ..ACCEPTING
        })
        .await;
        let rcpts = recipients(&["a@unit.test", "b@unit.test"]);
        let results = send_within(&mut session, &message(&rcpts, b"PHI\r\n"))
            .await
            .unwrap();
        assert_all_failed(&results, "554 5.7.1");
        assert!(!session.in_step(), "the server hung up: not reused");
        assert!(seen.lock().unwrap().wire.is_empty());
    }

    #[tokio::test]
    async fn a_failed_rset_takes_the_session_out_of_reuse() {
        let (mut session, _seen, _pki) = pipelined_session(Script {
            rset: "500 5.5.1 what?\r\n",
            ..ACCEPTING
        })
        .await;
        // every recipient refused: the transaction ends with RSET, which fails
        let rcpts = recipients(&["nobody@unit.test"]);
        let results = send_within(&mut session, &message(&rcpts, b"PHI\r\n"))
            .await
            .unwrap();
        assert!(matches!(&results[0], RcptResult::Failed(_)), "{results:?}");
        assert!(
            !session.in_step(),
            "a session whose RSET failed is not reused"
        );
        let again = send_within(&mut session, &message(&rcpts, b"PHI\r\n")).await;
        assert!(matches!(again, Err(SessionError::Stale(_))), "{again:?}");
    }

    #[tokio::test]
    async fn a_reused_session_the_server_closed_is_stale_but_a_new_one_fails_normally() {
        for goodbye in [
            "",
            "421 4.4.2 mx.unit.test idle too long\r\n",
            "451 4.7.0 Timeout waiting for client input\r\n",
        ] {
            let (mut session, seen, _pki) = pipelined_session(Script {
                hang_up: Some((1, goodbye)),
                ..ACCEPTING
            })
            .await;
            let rcpts = recipients(&["someone@unit.test"]);
            let first = send_within(&mut session, &message(&rcpts, b"One\r\n"))
                .await
                .unwrap();
            assert!(matches!(&first[0], RcptResult::Delivered(_)), "{first:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let err = send_within(&mut session, &message(&rcpts, b"Two\r\n"))
                .await
                .unwrap_err();
            assert!(matches!(err, SessionError::Stale(_)), "{goodbye:?}: {err}");
            let seen = seen.lock().unwrap();
            assert_eq!(seen.wire, b"One\r\n.\r\n");
            assert_eq!(
                seen.groups.len(),
                1,
                "nothing sent once the server had spoken"
            );
        }
        // A new session the server drops before its first reply: an ordinary failure, since
        // nothing says the server did not act on it.
        let (mut session, _seen, _pki) = pipelined_session(Script {
            hang_up: Some((0, "")),
            ..ACCEPTING
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rcpts = recipients(&["someone@unit.test"]);
        let err = send_within(&mut session, &message(&rcpts, b"One\r\n"))
            .await
            .unwrap_err();
        assert!(!matches!(err, SessionError::Stale(_)), "{err}");
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
