//! A raw SMTP test client over tokio: exact bytes out, parsed replies in, STARTTLS and implicit
//! TLS with a rustls client that trusts only the test CA.

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Default bound on every wait for the server.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the client could not get what it waited for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server closed the connection.
    #[error("connection closed by the server")]
    Closed,
    /// Nothing (complete) arrived in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A socket or TLS error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not an SMTP reply.
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    /// A reply other than the one the step needs.
    #[error("unexpected reply {0}")]
    Unexpected(Reply),
    /// A TLS configuration problem (bad CA PEM, bad name).
    #[error("TLS setup: {0}")]
    TlsSetup(String),
}

/// One (possibly multi-line) SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The text of every line without the code and separator, joined by `\n`.
    pub text: String,
}

impl Reply {
    /// The enhanced status code at the start of the first line (e.g. `5.7.8`), if any.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.text.split([' ', '\n']).next()?;
        let parts: Vec<&str> = first.split('.').collect();
        let ok = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(first)
    }

    /// Panics unless the reply has exactly this code (for replies without an enhanced code).
    #[track_caller]
    pub fn assert_code(&self, code: u16) {
        assert!(self.code == code, "expected {code}, got {self}");
    }

    /// Panics unless the reply has exactly this code and enhanced status code.
    #[track_caller]
    pub fn assert(&self, code: u16, enhanced: &str) {
        assert!(
            self.code == code && self.enhanced() == Some(enhanced),
            "expected {code} {enhanced}, got {self}"
        );
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text.replace('\n', " | "))
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A raw SMTP client connection.
pub struct SmtpClient {
    stream: Option<Stream>,
    buf: Vec<u8>,
    /// Bound on each wait for the server.
    pub timeout: Duration,
}

impl std::fmt::Debug for SmtpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tls = matches!(self.stream, Some(Stream::Tls(_)));
        f.debug_struct("SmtpClient")
            .field("tls", &tls)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

/// A rustls client configuration trusting only the roots in `ca_pem`.
pub fn tls_client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| ClientError::TlsSetup(format!("CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::TlsSetup(format!("CA certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::TlsSetup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn tls_handshake(
    tcp: TcpStream,
    ca_pem: &str,
    server_name: &str,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let connector = TlsConnector::from(tls_client_config(ca_pem)?);
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| ClientError::TlsSetup(format!("server name {server_name}: {e}")))?;
    tokio::time::timeout(timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
        .map_err(ClientError::Io)
}

impl SmtpClient {
    /// Connects over TCP (no greeting read yet).
    pub async fn connect(addr: SocketAddr) -> Result<SmtpClient, ClientError> {
        let tcp = tokio::time::timeout(DEFAULT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout(DEFAULT_TIMEOUT))??;
        Ok(SmtpClient::from_tcp(tcp))
    }

    /// Connects from a given local source address, e.g. 127.0.0.2 (no greeting read yet).
    pub async fn connect_from(local: IpAddr, addr: SocketAddr) -> Result<SmtpClient, ClientError> {
        let socket = match local {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(local, 0))?;
        let tcp = tokio::time::timeout(DEFAULT_TIMEOUT, socket.connect(addr))
            .await
            .map_err(|_| ClientError::Timeout(DEFAULT_TIMEOUT))??;
        Ok(SmtpClient::from_tcp(tcp))
    }

    /// Connects with implicit TLS, verifying `server_name` against the CA (no greeting read yet).
    pub async fn connect_tls(
        addr: SocketAddr,
        ca_pem: &str,
        server_name: &str,
    ) -> Result<SmtpClient, ClientError> {
        let tcp = tokio::time::timeout(DEFAULT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout(DEFAULT_TIMEOUT))??;
        let tls = tls_handshake(tcp, ca_pem, server_name, DEFAULT_TIMEOUT).await?;
        Ok(SmtpClient {
            stream: Some(Stream::Tls(Box::new(tls))),
            buf: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    fn from_tcp(tcp: TcpStream) -> SmtpClient {
        let _ = tcp.set_nodelay(true);
        SmtpClient {
            stream: Some(Stream::Plain(tcp)),
            buf: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Whether the connection is TLS now.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Some(Stream::Tls(_)))
    }

    /// Writes bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let timeout = self.timeout;
        let write = async {
            match self.stream.as_mut() {
                Some(Stream::Plain(s)) => {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
                Some(Stream::Tls(s)) => {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
                None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
            }
        };
        tokio::time::timeout(timeout, write)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
            .map_err(ClientError::Io)
    }

    /// Writes one command line followed by CRLF.
    pub async fn send(&mut self, line: &str) -> Result<(), ClientError> {
        let mut bytes = line.as_bytes().to_vec();
        bytes.extend_from_slice(b"\r\n");
        self.send_raw(&bytes).await
    }

    async fn fill(&mut self) -> Result<(), ClientError> {
        let mut chunk = [0u8; 8192];
        let timeout = self.timeout;
        let read = async {
            match self.stream.as_mut() {
                Some(Stream::Plain(s)) => s.read(&mut chunk).await,
                Some(Stream::Tls(s)) => s.read(&mut chunk).await,
                None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
            }
        };
        let n = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?;
        match n {
            Ok(0) => Err(ClientError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                Err(ClientError::Closed)
            }
            Err(e) => Err(ClientError::Io(e)),
        }
    }

    async fn read_line(&mut self) -> Result<String, ClientError> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).take(pos).collect();
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            self.fill().await?;
        }
    }

    /// Reads one complete (possibly multi-line) reply.
    pub async fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            let line = self.read_line().await?;
            let b = line.as_bytes();
            if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
                return Err(ClientError::Malformed(line));
            }
            let c: u16 = line[..3]
                .parse()
                .map_err(|_| ClientError::Malformed(line.clone()))?;
            if code.is_some_and(|prev| prev != c) {
                return Err(ClientError::Malformed(line));
            }
            code = Some(c);
            let (last, text) = match b.get(3) {
                None => (true, ""),
                Some(b' ') => (true, &line[4..]),
                Some(b'-') => (false, &line[4..]),
                Some(_) => return Err(ClientError::Malformed(line)),
            };
            lines.push(text.to_string());
            if last {
                return Ok(Reply {
                    code: c,
                    text: lines.join("\n"),
                });
            }
        }
    }

    /// Sends a command and reads its reply.
    pub async fn cmd(&mut self, line: &str) -> Result<Reply, ClientError> {
        self.send(line).await?;
        self.read_reply().await
    }

    /// Reads the greeting and expects 220.
    pub async fn greeting(&mut self) -> Result<Reply, ClientError> {
        let r = self.read_reply().await?;
        if r.code == 220 {
            Ok(r)
        } else {
            Err(ClientError::Unexpected(r))
        }
    }

    /// Sends EHLO and expects 250; returns the reply (its lines are the extensions).
    pub async fn ehlo(&mut self, name: &str) -> Result<Reply, ClientError> {
        let r = self.cmd(&format!("EHLO {name}")).await?;
        if r.code == 250 {
            Ok(r)
        } else {
            Err(ClientError::Unexpected(r))
        }
    }

    /// Sends STARTTLS, expects 220, then upgrades the connection (see [`SmtpClient::upgrade_tls`]).
    pub async fn starttls(&mut self, ca_pem: &str, server_name: &str) -> Result<(), ClientError> {
        let r = self.cmd("STARTTLS").await?;
        if r.code != 220 {
            return Err(ClientError::Unexpected(r));
        }
        self.upgrade_tls(ca_pem, server_name).await
    }

    /// Runs the TLS handshake on the plain connection, discarding any buffered plaintext.
    pub async fn upgrade_tls(
        &mut self,
        ca_pem: &str,
        server_name: &str,
    ) -> Result<(), ClientError> {
        self.buf.clear();
        let Some(Stream::Plain(tcp)) = self.stream.take() else {
            return Err(ClientError::TlsSetup("not a plain connection".into()));
        };
        let tls = tls_handshake(tcp, ca_pem, server_name, self.timeout).await?;
        self.stream = Some(Stream::Tls(Box::new(tls)));
        Ok(())
    }

    /// AUTH PLAIN with an initial response; returns the final reply.
    pub async fn auth_plain(&mut self, user: &str, password: &str) -> Result<Reply, ClientError> {
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.cmd(&format!("AUTH PLAIN {token}")).await
    }

    /// AUTH LOGIN in three steps; returns the first reply that is not 334.
    pub async fn auth_login(&mut self, user: &str, password: &str) -> Result<Reply, ClientError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let r = self.cmd("AUTH LOGIN").await?;
        if r.code != 334 {
            return Ok(r);
        }
        let r = self.cmd(&b64.encode(user)).await?;
        if r.code != 334 {
            return Ok(r);
        }
        self.cmd(&b64.encode(password)).await
    }

    /// Sends a message body after a 354: dot-stuffs lines, ends with CRLF.CRLF; returns the reply.
    pub async fn data_body(&mut self, message: &str) -> Result<Reply, ClientError> {
        let mut wire = Vec::with_capacity(message.len() + 8);
        for line in message.split("\r\n") {
            if line.starts_with('.') {
                wire.push(b'.');
            }
            wire.extend_from_slice(line.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
        // `split` yields a last empty piece when the message ends with CRLF.
        if message.ends_with("\r\n") {
            wire.truncate(wire.len() - 2);
        }
        wire.extend_from_slice(b".\r\n");
        self.send_raw(&wire).await?;
        self.read_reply().await
    }

    /// MAIL, RCPT for each recipient, DATA and the message (CRLF lines); returns the first reply
    /// that refuses a step, or the final reply after the dot.
    pub async fn submit(
        &mut self,
        from: &str,
        rcpts: &[&str],
        message: &str,
    ) -> Result<Reply, ClientError> {
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await?;
        if r.code != 250 {
            return Ok(r);
        }
        for rcpt in rcpts {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>")).await?;
            if r.code != 250 {
                return Ok(r);
            }
        }
        let r = self.cmd("DATA").await?;
        if r.code != 354 {
            return Ok(r);
        }
        self.data_body(message).await
    }

    /// Waits (bounded) for the server to close the connection; Ok if it did without sending more.
    pub async fn expect_closed(&mut self) -> Result<(), ClientError> {
        if !self.buf.is_empty() {
            let r = self.read_reply().await?;
            return Err(ClientError::Unexpected(r));
        }
        match self.fill().await {
            Err(ClientError::Closed) => Ok(()),
            Err(e) => Err(e),
            Ok(()) => {
                let r = self.read_reply().await?;
                Err(ClientError::Unexpected(r))
            }
        }
    }

    /// Reads replies until the server closes the connection (bounded by the timeout per read).
    pub async fn replies_until_closed(&mut self) -> Result<Vec<Reply>, ClientError> {
        let mut out = Vec::new();
        loop {
            match self.read_reply().await {
                Ok(r) => out.push(r),
                Err(ClientError::Closed) if self.buf.is_empty() => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    }
}

/// A small RFC 5322 message with CRLF line endings.
pub fn message(from: &str, to: &str, subject: &str, body: &str) -> String {
    let mut m = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n"
    );
    for line in body.lines() {
        m.push_str(line);
        m.push_str("\r\n");
    }
    m
}

/// Whether a reply is `250 2.0.0 Ok <32 lower-case hex>`; returns the queue id.
pub fn queue_id_of(reply: &Reply) -> Option<String> {
    if reply.code != 250 {
        return None;
    }
    let id = reply.text.strip_prefix("2.0.0 Ok ")?;
    (id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| id.to_string())
}
