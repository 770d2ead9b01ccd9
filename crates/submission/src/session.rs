//! One inbound ESMTP session (RFC 5321, RFC 6409 submission, RFC 3207 STARTTLS, RFC 4954 AUTH).

use crate::auth::{self, UserEntry};
use crate::message::{self, Trace};
use crate::replies as r;
use crate::stream::{Conn, Transport};
use crate::{Runtime, Shared};
use sealpost_audit::{Event, Record};
use sealpost_config::ListenerMode;
use sealpost_queue::{Envelope, QueueError, QueueId, RecipientSpec};
use sealpost_smtp::{
    read_data, Command, DataError, DataLimits, EnhancedStatus as S, LineError, LineReader,
    MailParams, Mailbox, Notify, ParseOptions, RcptParams, Reply, Ret, ReversePath,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
const MAX_COMMAND_LINE: usize = 512;
/// Longest SASL response line (RFC 4954 §4).
const MAX_AUTH_LINE: usize = 12_288;

/// Facts about the listener a session came in on.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// Listener mode.
    pub mode: ListenerMode,
    /// Policy for unauthenticated mail on a plain listener.
    pub policy: Option<String>,
    /// Local address.
    pub local: SocketAddr,
}

struct Transaction {
    from: ReversePath,
    params: MailParams,
    rcpts: Vec<(Mailbox, RcptParams)>,
}

/// Whether the session goes on after a command.
enum Flow {
    Continue,
    Close,
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    rt: Arc<Runtime>,
    listener: ListenerInfo,
    peer: SocketAddr,
    reader: LineReader<Conn>,
    out: Vec<u8>,
    tls: Option<String>,
    helo: Option<String>,
    esmtp: bool,
    user: Option<UserEntry>,
    auth_failures: u32,
    errors: u32,
    txn: Option<Transaction>,
}

impl Session {
    pub(crate) fn new(
        shared: Arc<Shared>,
        rt: Arc<Runtime>,
        listener: ListenerInfo,
        peer: SocketAddr,
        transport: Transport,
    ) -> Session {
        let idle = rt.config.submission.command_timeout.0;
        let conn = Conn::new(transport, idle);
        let tls = conn.tls().map(describe_tls);
        Session {
            shared,
            rt,
            listener,
            peer,
            reader: LineReader::new(conn),
            out: Vec::with_capacity(1024),
            tls,
            helo: None,
            esmtp: false,
            user: None,
            auth_failures: 0,
            errors: 0,
            txn: None,
        }
    }

    fn hostname(&self) -> &str {
        &self.rt.config.server.hostname
    }

    fn reply(&mut self, reply: Reply) {
        self.out.extend_from_slice(&reply.to_wire());
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let conn = self.reader.get_mut();
            conn.write_all(&self.out).await?;
            conn.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Sends the greeting and serves commands until QUIT, an error or a timeout.
    pub(crate) async fn run(mut self) {
        let greeting = format!("{} {}", self.hostname(), self.rt.config.submission.banner);
        self.reply(Reply::new(220, None, &greeting));
        loop {
            // Pipelining (RFC 2920): answer a batch at once, flush when the client waits.
            if self.reader.buffered() == 0 && self.flush().await.is_err() {
                return;
            }
            let stop_now = self.txn.is_none() && *self.shared.stopping.borrow();
            if stop_now {
                return self.shutting_down().await;
            }
            let mut stopping = self.shared.stopping.clone();
            let read = tokio::select! {
                r = self.reader.read_line(MAX_COMMAND_LINE) => r,
                // An idle session between transactions is closed at shutdown; one in the middle of
                // a transaction may finish it (the check above catches it afterwards).
                _ = async { stopping.wait_for(|s| *s).await.map(|_| ()) }, if self.txn.is_none() => {
                    return self.shutting_down().await;
                }
            };
            let line = match read {
                Ok(line) => line,
                Err(LineError::TooLong) => {
                    self.error(Reply::new(500, Some(S::LINE_TOO_LONG), "Line too long"));
                    if self.too_many_errors().await {
                        return;
                    }
                    continue;
                }
                Err(LineError::BareLf | LineError::BareCr) => {
                    self.error(Reply::new(
                        500,
                        Some(S::SYNTAX),
                        "Syntax error: bare CR or LF; lines must end with CRLF",
                    ));
                    if self.too_many_errors().await {
                        return;
                    }
                    continue;
                }
                Err(LineError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    let text = format!("{} Timeout: closing connection", self.hostname());
                    self.reply(Reply::new(421, Some(S::BAD_CONNECTION), &text));
                    let _ = self.flush().await;
                    return;
                }
                Err(LineError::Eof | LineError::Io(_)) => return,
            };
            let opts = ParseOptions {
                smtputf8: self.txn.as_ref().is_some_and(|t| t.params.smtputf8),
            };
            let flow = match Command::parse(&line, opts) {
                Ok(cmd) => self.dispatch(cmd).await,
                Err(e) => {
                    self.error(e.reply());
                    Flow::Continue
                }
            };
            if matches!(flow, Flow::Close) || self.too_many_errors().await {
                let _ = self.flush().await;
                let _ = self.reader.get_mut().shutdown().await;
                return;
            }
        }
    }

    async fn shutting_down(&mut self) {
        let text = format!("{} Service shutting down; try again later", self.hostname());
        self.reply(Reply::new(421, Some(S::new(4, 3, 2)), &text));
        let _ = self.flush().await;
        let _ = self.reader.get_mut().shutdown().await;
    }

    fn error(&mut self, reply: Reply) {
        self.errors += 1;
        self.reply(reply);
    }

    async fn too_many_errors(&mut self) -> bool {
        if self.errors >= self.rt.config.submission.max_errors {
            self.reply(Reply::new(
                421,
                Some(S::TEMP_SECURITY),
                "Too many errors; closing connection",
            ));
            let _ = self.flush().await;
            return true;
        }
        false
    }

    async fn dispatch(&mut self, cmd: Command) -> Flow {
        match cmd {
            Command::Ehlo(name) => self.ehlo(name, true),
            Command::Helo(name) => self.ehlo(name, false),
            Command::StartTls => return self.starttls().await,
            Command::Auth { mechanism, initial } => return self.auth(mechanism, initial).await,
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to, params } => self.rcpt(to, params),
            Command::Data => return self.data().await,
            Command::Rset => {
                self.txn = None;
                self.reply(r::ok());
            }
            Command::Noop => self.reply(r::ok()),
            Command::Quit => {
                self.reply(Reply::new(221, Some(S::OK), "Bye"));
                return Flow::Close;
            }
            Command::Vrfy(_) => self.reply(Reply::new(
                252,
                Some(S::new(2, 5, 0)),
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn(_) => self.error(Reply::new(
                502,
                Some(S::INVALID_COMMAND),
                "EXPN is not available",
            )),
            Command::Bdat => self.error(Reply::new(
                502,
                Some(S::INVALID_COMMAND),
                "BDAT is not available (CHUNKING is not offered); use DATA",
            )),
            Command::Help(_) => self.reply(Reply::new(
                214,
                Some(S::OK),
                "Sealpost: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
            )),
        }
        Flow::Continue
    }

    fn ehlo(&mut self, name: String, esmtp: bool) {
        self.txn = None;
        self.helo = Some(name);
        self.esmtp = esmtp;
        if !esmtp {
            let text = self.hostname().to_string();
            self.reply(Reply::new(250, None, &text));
            return;
        }
        let mut lines = vec![self.hostname().to_string()];
        lines.push("PIPELINING".into());
        lines.push(format!("SIZE {}", self.rt.config.queue.max_message_size.0));
        lines.push("8BITMIME".into());
        lines.push("SMTPUTF8".into());
        lines.push("ENHANCEDSTATUSCODES".into());
        if self.tls.is_none() && self.listener.mode == ListenerMode::Starttls {
            lines.push("STARTTLS".into());
        }
        if self.tls.is_some() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        // The greeting line of an EHLO reply carries no enhanced status code.
        self.reply(Reply::new(250, None, &lines.join("\n")));
    }

    async fn starttls(&mut self) -> Flow {
        if self.tls.is_some() {
            self.error(Reply::new(
                503,
                Some(S::INVALID_COMMAND),
                "TLS is already active",
            ));
            return Flow::Continue;
        }
        if self.listener.mode != ListenerMode::Starttls {
            self.error(Reply::new(
                502,
                Some(S::INVALID_COMMAND),
                "STARTTLS is not offered on this port",
            ));
            return Flow::Continue;
        }
        let Some(acceptor) = self.rt.tls.clone() else {
            self.reply(Reply::new(
                454,
                Some(S::TEMP_SECURITY),
                "TLS not available due to temporary reason",
            ));
            return Flow::Continue;
        };
        self.reply(Reply::new(220, Some(S::OK), "Ready to start TLS"));
        if self.flush().await.is_err() {
            return Flow::Close;
        }
        // RFC 3207 §4.2 / CVE-2011-0411: anything pipelined behind STARTTLS is discarded.
        let dropped = self.reader.discard_buffered();
        if dropped > 0 {
            tracing::warn!(client = %self.peer, bytes = dropped, "discarded plaintext pipelined after STARTTLS");
        }
        let placeholder = LineReader::new(Conn::new(Transport::Closed, Duration::from_secs(1)));
        let (conn, _leftover) = std::mem::replace(&mut self.reader, placeholder).into_inner();
        let Transport::Plain(tcp) = conn.into_inner() else {
            return Flow::Close;
        };
        let timeout = self.rt.config.submission.tls_handshake_timeout.0;
        match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                let conn = Conn::new(
                    Transport::Tls(Box::new(tls)),
                    self.rt.config.submission.command_timeout.0,
                );
                self.tls = conn.tls().map(describe_tls);
                self.reader = LineReader::new(conn);
                // RFC 3207 §4.2: forget everything learned before TLS.
                self.helo = None;
                self.esmtp = false;
                self.user = None;
                self.txn = None;
                Flow::Continue
            }
            Ok(Err(e)) => {
                tracing::info!(client = %self.peer, error = %e, "STARTTLS handshake failed");
                Flow::Close
            }
            Err(_) => {
                tracing::info!(client = %self.peer, "STARTTLS handshake timed out");
                Flow::Close
            }
        }
    }

    async fn read_sasl_line(&mut self, challenge: &str) -> Result<String, Flow> {
        self.reply(Reply::new(334, None, challenge));
        if self.flush().await.is_err() {
            return Err(Flow::Close);
        }
        match self.reader.read_line(MAX_AUTH_LINE).await {
            Ok(line) => match String::from_utf8(line) {
                Ok(s) if s.trim() == "*" => {
                    self.error(Reply::new(
                        501,
                        Some(S::new(5, 0, 0)),
                        "Authentication cancelled",
                    ));
                    Err(Flow::Continue)
                }
                Ok(s) => Ok(s),
                Err(_) => {
                    self.error(Reply::new(501, Some(S::SYNTAX), "Cannot decode response"));
                    Err(Flow::Continue)
                }
            },
            Err(LineError::TooLong | LineError::BareCr | LineError::BareLf) => {
                self.error(Reply::new(
                    500,
                    Some(S::LINE_TOO_LONG),
                    "Authentication line too long or malformed",
                ));
                Err(Flow::Continue)
            }
            Err(_) => Err(Flow::Close),
        }
    }

    async fn auth(&mut self, mechanism: String, initial: Option<String>) -> Flow {
        if self.tls.is_none() {
            // Never accept credentials in plaintext (RFC 4954 §4; HIPAA 164.312(d)).
            self.error(Reply::new(
                538,
                Some(S::new(5, 7, 11)),
                "Encryption required for requested authentication mechanism",
            ));
            return Flow::Continue;
        }
        if self.helo.is_none() || !self.esmtp {
            self.error(Reply::new(503, Some(S::INVALID_COMMAND), "Send EHLO first"));
            return Flow::Continue;
        }
        if self.user.is_some() {
            self.error(Reply::new(
                503,
                Some(S::INVALID_COMMAND),
                "Already authenticated",
            ));
            return Flow::Continue;
        }
        if self.txn.is_some() {
            self.error(Reply::new(
                503,
                Some(S::INVALID_COMMAND),
                "AUTH not permitted during a mail transaction",
            ));
            return Flow::Continue;
        }
        let creds = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(i) => i,
                    None => match self.read_sasl_line("").await {
                        Ok(l) => l,
                        Err(flow) => return flow,
                    },
                };
                auth::decode_plain(if response == "=" { "" } else { &response })
            }
            "LOGIN" => {
                let user_b64 = match initial {
                    Some(i) => i,
                    None => match self.read_sasl_line("VXNlcm5hbWU6").await {
                        Ok(l) => l,
                        Err(flow) => return flow,
                    },
                };
                let pass_b64 = match self.read_sasl_line("UGFzc3dvcmQ6").await {
                    Ok(l) => l,
                    Err(flow) => return flow,
                };
                auth::decode_b64(&user_b64).and_then(|u| {
                    let p = auth::decode_b64(&pass_b64)?;
                    Ok((
                        String::from_utf8(u).map_err(|_| auth::AuthDecodeError::Utf8)?,
                        String::from_utf8(p).map_err(|_| auth::AuthDecodeError::Utf8)?,
                    ))
                })
            }
            _ => {
                self.error(Reply::new(
                    504,
                    Some(S::INVALID_ARGUMENTS),
                    "Unrecognized authentication type",
                ));
                return Flow::Continue;
            }
        };
        let (name, password) = match creds {
            Ok(c) => c,
            Err(auth::AuthDecodeError::Base64) => {
                self.error(Reply::new(501, Some(S::SYNTAX), "Cannot decode response"));
                return Flow::Continue;
            }
            Err(_) => (String::new(), String::new()),
        };
        let users = self.rt.users.clone();
        let verify_name = name.clone();
        // argon2id takes ~19 MiB and a core for a moment: bound how many run at once.
        let shared = Arc::clone(&self.shared);
        let verified = {
            let Ok(_slot) = shared.auth_slots.acquire().await else {
                return Flow::Close;
            };
            tokio::task::spawn_blocking(move || users.verify(&verify_name, &password))
                .await
                .ok()
                .flatten()
        };
        match verified {
            Some(user) => {
                tracing::info!(client = %self.peer, user = %user.name, "authenticated");
                self.user = Some(user);
                self.reply(Reply::new(
                    235,
                    Some(S::SECURITY_OK),
                    "Authentication successful",
                ));
                Flow::Continue
            }
            None => self.auth_failed(name).await,
        }
    }

    async fn auth_failed(&mut self, name: String) -> Flow {
        self.auth_failures += 1;
        let sub = &self.rt.config.submission;
        let max = sub.max_auth_failures;
        let delay = sub
            .auth_failure_delay
            .0
            .saturating_mul(1 << (self.auth_failures - 1).min(6));
        tracing::warn!(client = %self.peer, failures = self.auth_failures, "authentication failed");
        metrics::counter!("sealpost_auth_failures_total").increment(1);
        let rec = Record::new(Event::AuthFailed)
            .user(printable(&name, 64))
            .client_ip(self.peer.ip())
            .detail("failures", self.auth_failures);
        if let Err(e) = self.shared.audit.record(rec).await {
            tracing::error!(error = %e, "audit log write failed");
        }
        tokio::time::sleep(delay).await;
        if self.auth_failures >= max {
            self.reply(Reply::new(
                421,
                Some(S::TEMP_SECURITY),
                "Too many authentication failures; closing connection",
            ));
            return Flow::Close;
        }
        self.reply(Reply::new(
            535,
            Some(S::BAD_CREDENTIALS),
            "Authentication Credentials Invalid",
        ));
        Flow::Continue
    }

    /// Checks whether this session may start a mail transaction; sends the refusal if not.
    fn may_transact(&mut self) -> bool {
        if self.helo.is_none() {
            self.error(Reply::new(
                503,
                Some(S::INVALID_COMMAND),
                "Send HELO/EHLO first",
            ));
            return false;
        }
        match self.listener.mode {
            ListenerMode::Plain => true,
            ListenerMode::Starttls if self.tls.is_none() => {
                self.error(Reply::new(
                    530,
                    Some(S::SECURITY),
                    "Must issue a STARTTLS command first",
                ));
                false
            }
            _ if self.user.is_none() => {
                self.error(Reply::new(
                    530,
                    Some(S::SECURITY),
                    "Authentication required",
                ));
                false
            }
            _ => true,
        }
    }

    fn mail(&mut self, from: ReversePath, params: MailParams) {
        if !self.may_transact() {
            return;
        }
        if self.txn.is_some() {
            self.error(Reply::new(
                503,
                Some(S::INVALID_COMMAND),
                "Nested MAIL command",
            ));
            return;
        }
        let max = self.rt.config.queue.max_message_size.0;
        if params.size.is_some_and(|s| s > max) {
            self.error(Reply::new(552, Some(S::TOO_BIG), "Message is too long."));
            return;
        }
        if let (Some(user), ReversePath::Mailbox(m)) = (&self.user, &from) {
            let addr = m.to_string();
            if !user.may_send_as(&addr) {
                let reply = r::not_verified(&[addr]);
                self.error(reply);
                return;
            }
        }
        self.txn = Some(Transaction {
            from,
            params,
            rcpts: Vec::new(),
        });
        self.reply(Reply::new(250, Some(S::SENDER_OK), "Ok"));
    }

    fn rcpt(&mut self, to: Mailbox, params: RcptParams) {
        let max = self.rt.config.queue.max_recipients;
        let Some(txn) = self.txn.as_mut() else {
            self.error(Reply::new(
                503,
                Some(S::INVALID_COMMAND),
                "Need MAIL command",
            ));
            return;
        };
        if txn.rcpts.len() >= max {
            self.error(Reply::new(
                452,
                Some(S::TOO_MANY_RECIPIENTS),
                "Too many recipients",
            ));
            return;
        }
        txn.rcpts.push((to, params));
        self.reply(Reply::new(250, Some(S::RECIPIENT_OK), "Ok"));
    }

    async fn data(&mut self) -> Flow {
        match &self.txn {
            None => {
                self.error(Reply::new(
                    503,
                    Some(S::INVALID_COMMAND),
                    "Need MAIL command",
                ));
                return Flow::Continue;
            }
            Some(t) if t.rcpts.is_empty() => {
                self.error(Reply::new(
                    503,
                    Some(S::INVALID_COMMAND),
                    "Need RCPT command",
                ));
                return Flow::Continue;
            }
            Some(_) => {}
        }
        self.reply(Reply::new(354, None, "End data with <CR><LF>.<CR><LF>"));
        if self.flush().await.is_err() {
            return Flow::Close;
        }
        let sub = &self.rt.config.submission;
        let (data_timeout, command_timeout) = (sub.data_timeout.0, sub.command_timeout.0);
        let limits = DataLimits {
            max_size: self.rt.config.queue.max_message_size.0,
            max_line: 1000,
        };
        self.reader.get_mut().set_idle(data_timeout);
        let result = read_data(&mut self.reader, limits).await;
        self.reader.get_mut().set_idle(command_timeout);
        let raw = match result {
            Ok(raw) => raw,
            Err(DataError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                self.txn = None;
                self.reply(Reply::new(
                    451,
                    Some(S::BAD_CONNECTION),
                    "Timeout waiting for data from client.",
                ));
                return Flow::Close;
            }
            Err(e) => {
                self.txn = None;
                let can_continue = e.session_can_continue();
                self.error(e.reply());
                return if can_continue {
                    Flow::Continue
                } else {
                    Flow::Close
                };
            }
        };
        let Some(txn) = self.txn.take() else {
            return Flow::Continue;
        };
        let reply = self.accept(txn, raw).await;
        if reply.code >= 400 {
            self.error(reply);
        } else {
            self.reply(reply);
        }
        Flow::Continue
    }

    /// Checks, prepares and queues a received message; returns the final reply.
    async fn accept(&mut self, txn: Transaction, raw: Vec<u8>) -> Reply {
        let started = std::time::Instant::now();
        let protocol = match (self.esmtp, self.tls.is_some(), self.user.is_some()) {
            (true, true, true) => "ESMTPSA",
            (true, true, false) => "ESMTPS",
            (true, false, _) => "ESMTP",
            (false, _, _) => "SMTP",
        };
        let helo = self.helo.clone().unwrap_or_default();
        let trace = Trace {
            helo: &helo,
            client_ip: self.peer.ip(),
            hostname: &self.rt.config.server.hostname,
            protocol,
            tls: self.tls.clone(),
        };
        let size = raw.len();
        let prepared = message::prepare(&raw, &trace, chrono::Utc::now());
        drop(raw);

        if let Some(user) = &self.user {
            if prepared.from.is_empty() {
                return Reply::new(
                    554,
                    Some(S::MEDIA),
                    "Transaction failed: Missing required header 'From'.",
                );
            }
            let refused: Vec<String> = prepared
                .from
                .iter()
                .filter(|a| !user.may_send_as(a))
                .cloned()
                .collect();
            if !refused.is_empty() {
                return r::not_verified(&refused);
            }
        }
        let policy = match &prepared.configuration_set {
            Some(set) if self.rt.config.policies.contains_key(set) => set.clone(),
            Some(set) => {
                return Reply::new(
                    554,
                    Some(S::NOT_AUTHORIZED),
                    &format!(
                        "Message rejected: Configuration Set does not exist: Configuration set <{}> does not exist.",
                        printable(set, 64)
                    ),
                )
            }
            None => match &self.user {
                Some(u) => u.policy.clone(),
                None => self.listener.policy.clone().unwrap_or_else(|| "phi".into()),
            },
        };
        if let Some(user) = &self.user {
            if let Some(rate) = user.max_send_rate {
                if !self.shared.rates.take(&user.name, rate, txn.rcpts.len()) {
                    return Reply::new(
                        454,
                        Some(S::TEMP_SECURITY),
                        "Throttling failure: Maximum sending rate exceeded.",
                    );
                }
            }
        }

        let recipients = txn
            .rcpts
            .iter()
            .map(|(m, p)| RecipientSpec {
                address: m.to_string(),
                notify: p.notify.map(notify_text),
                orcpt: p.orcpt.clone(),
            })
            .collect::<Vec<_>>();
        let rcpt_count = recipients.len();
        let envelope = Envelope {
            sender: txn.from.to_string(),
            recipients,
            user: self.user.as_ref().map(|u| u.name.clone()),
            policy: policy.clone(),
            tags: prepared.tags.clone(),
            client_ip: Some(self.peer.ip()),
            ret: txn.params.ret.map(|r| match r {
                Ret::Full => "FULL".to_string(),
                Ret::Hdrs => "HDRS".to_string(),
            }),
            envid: txn.params.envid.clone(),
            smtputf8: txn.params.smtputf8,
            eight_bit: matches!(txn.params.body, Some(sealpost_smtp::BodyType::EightBitMime)),
            received_at: SystemTime::now(),
        };
        let queued_size = prepared.message.len();
        if self.shared.audit.failed() {
            // Nothing accepted goes unaudited: the audit log takes no records.
            tracing::error!("the audit log has failed; message refused with a temporary error");
            return Reply::new(451, Some(S::TEMP_SYSTEM), "Temporary service failure");
        }
        let mut rec = Record::new(Event::Accepted)
            .client_ip(self.peer.ip())
            .detail("recipients", rcpt_count as u64)
            .detail("size", queued_size as u64)
            .detail("received_size", size as u64)
            .detail("policy", policy)
            .detail("tls", self.tls.clone().unwrap_or_else(|| "none".into()))
            .detail("listener", self.listener.local.to_string());
        if let Some(u) = &self.user {
            rec = rec.user(u.name.clone());
        }
        // The `accepted` record is committed with the message (the queue's outbox): both are
        // durable before the 250, and the audit log gets the record ahead of any attempt.
        let accepted = move |id: QueueId| {
            sealpost_audit::encode_row(&rec.queue_id(id.to_string()))
                .map(|row| vec![row])
                .map_err(|e| e.to_string())
        };
        let queued = match self
            .shared
            .queue
            .enqueue_recorded(envelope, prepared.message, accepted)
            .await
        {
            Ok(queued) => queued,
            Err(e) => {
                tracing::error!(error = %e, "enqueue failed; message refused with a temporary error");
                return match e {
                    QueueError::NoSpace => {
                        Reply::new(452, Some(S::new(4, 3, 1)), "Insufficient system storage")
                    }
                    _ => Reply::new(451, Some(S::TEMP_SYSTEM), "Temporary service failure"),
                };
            }
        };
        let id = queued.id();
        queued.release();
        tracing::info!(queue_id = %id, recipients = rcpt_count, size = queued_size, "accepted");
        metrics::counter!("sealpost_messages_accepted_total").increment(1);
        metrics::counter!("sealpost_recipients_accepted_total").increment(rcpt_count as u64);
        metrics::histogram!("sealpost_acceptance_seconds").record(started.elapsed().as_secs_f64());
        Reply::new(250, Some(S::OK), &format!("Ok {id}"))
    }
}

fn notify_text(n: Notify) -> String {
    match n {
        Notify::Never => "NEVER".into(),
        Notify::On {
            success,
            failure,
            delay,
        } => {
            let mut v = Vec::new();
            if success {
                v.push("SUCCESS");
            }
            if failure {
                v.push("FAILURE");
            }
            if delay {
                v.push("DELAY");
            }
            v.join(",")
        }
    }
}

fn describe_tls(conn: &rustls::ServerConnection) -> String {
    let version = conn
        .protocol_version()
        .map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
            other => format!("{other:?}"),
        })
        .unwrap_or_else(|| "TLS".into());
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "unknown".into());
    format!("{version} with cipher {cipher}")
}

/// Keeps printable ASCII only, at most `max` characters (for untrusted text in logs and replies).
fn printable(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect()
}
