//! A test SMTP receiver (an MX host): plaintext greeting and EHLO, then STARTTLS with a chosen
//! rustls configuration, or a misbehaviour (no STARTTLS, 454, dropped handshake), or a splice to
//! an `openssl s_server` for TLS 1.0/1.1. It records every transaction it receives.

use crate::certs::CertFiles;
use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How the receiver answers STARTTLS.
#[derive(Clone)]
pub enum TlsMode {
    /// Offer STARTTLS and complete the handshake with this rustls configuration.
    Rustls(Arc<ServerConfig>),
    /// Do not advertise STARTTLS.
    NoStarttls,
    /// Advertise STARTTLS and answer it with `454 4.7.0 TLS not available`.
    Refuse454,
    /// Answer STARTTLS with 220, read the ClientHello, then close the connection.
    DropMidHandshake,
    /// Answer STARTTLS with 220, then splice the TCP stream to `openssl s_server` on `port`.
    Splice(u16),
}

/// One transaction the receiver accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// `MAIL FROM` argument as sent.
    pub mail_from: String,
    /// Addresses the receiver accepted with 250.
    pub rcpt_to: Vec<String>,
    /// The message as received, dot-stuffing removed, without the final `.\r\n`.
    pub data: Vec<u8>,
    /// Whether the transaction happened after a TLS handshake.
    pub tls: bool,
}

#[derive(Default)]
struct Log {
    connections: usize,
    commands: Vec<String>,
    received: Vec<Received>,
    /// Announce PIPELINING after STARTTLS.
    pipelining: bool,
    /// Close the connection right after each message's 250, without waiting for QUIT.
    hang_up: bool,
}

/// A running receiver on `addr`.
pub struct Receiver {
    /// The listening address.
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    openssl: Option<Child>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut child) = self.openssl.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// Loads a PEM chain and key written by the certificate factory.
pub fn load_cert(files: &CertFiles) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_file_iter(&files.chain_pem)
        .unwrap_or_else(|e| panic!("reading {}: {e}", files.chain_pem.display()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("parsing {}: {e}", files.chain_pem.display()));
    let key = PrivateKeyDer::from_pem_file(&files.key_pem)
        .unwrap_or_else(|e| panic!("reading {}: {e}", files.key_pem.display()));
    (chain, key)
}

/// A rustls server configuration: `versions`, and only the named cipher suites if any.
pub fn server_config(
    files: &CertFiles,
    versions: &[&'static SupportedProtocolVersion],
    suites: &[CipherSuite],
) -> Arc<ServerConfig> {
    let mut provider: CryptoProvider = rustls::crypto::aws_lc_rs::default_provider();
    if !suites.is_empty() {
        provider
            .cipher_suites
            .retain(|s| suites.contains(&s.suite()));
        assert!(
            !provider.cipher_suites.is_empty(),
            "no suite of {suites:?} in the provider"
        );
    }
    let (chain, key) = load_cert(files);
    let config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap_or_else(|e| panic!("protocol versions: {e}"))
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap_or_else(|e| panic!("server certificate: {e}"));
    Arc::new(config)
}

/// TLS 1.2 and 1.3 with the provider's default suites.
pub fn default_tls(files: &CertFiles) -> TlsMode {
    TlsMode::Rustls(server_config(
        files,
        &[&rustls::version::TLS12, &rustls::version::TLS13],
        &[],
    ))
}

enum Next {
    Close,
    Upgrade,
}

impl Receiver {
    /// Starts a receiver on `ip:port` named `name` in its greeting; `reject` addresses get 550.
    pub async fn start(
        ip: IpAddr,
        port: u16,
        name: &str,
        mode: TlsMode,
        reject: &[&str],
    ) -> Receiver {
        let listener = TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .unwrap_or_else(|e| panic!("binding receiver {ip}:{port}: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let log: Arc<Mutex<Log>> = Arc::default();
        let (name, reject): (Arc<str>, Arc<Vec<String>>) = (
            name.into(),
            Arc::new(reject.iter().map(|s| s.to_ascii_lowercase()).collect()),
        );
        let l = log.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                lock(&l).connections += 1;
                let (l, name, reject, mode) =
                    (l.clone(), name.clone(), reject.clone(), mode.clone());
                tokio::spawn(async move {
                    let _ = serve(tcp, l, name, reject, mode).await;
                });
            }
        });
        Receiver {
            addr,
            log,
            openssl: None,
        }
    }

    /// A receiver whose TLS is `openssl s_server` with `version_flag` (`-tls1`, `-tls1_1`).
    pub async fn start_openssl(
        ip: IpAddr,
        port: u16,
        name: &str,
        files: &CertFiles,
        version_flag: &str,
    ) -> Receiver {
        let backend = {
            let l = StdListener::bind((ip, 0)).unwrap_or_else(|e| panic!("{e}"));
            l.local_addr().unwrap_or_else(|e| panic!("{e}")).port()
        };
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-naccept", "1000"])
            .arg(version_flag)
            .args(["-cipher", "DEFAULT:@SECLEVEL=0"])
            .arg("-accept")
            .arg(format!("{ip}:{backend}"))
            .arg("-cert")
            .arg(&files.chain_pem)
            .arg("-key")
            .arg(&files.key_pem)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting openssl s_server: {e}"));
        for _ in 0..100 {
            if std::net::TcpStream::connect((ip, backend)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut r = Receiver::start(ip, port, name, TlsMode::Splice(backend), &[]).await;
        r.openssl = Some(child);
        r
    }

    /// Announces PIPELINING in the EHLO reply after STARTTLS from now on.
    pub fn offer_pipelining(&self) {
        lock(&self.log).pipelining = true;
    }

    /// From now on closes each connection right after a message's 250, without QUIT (as a
    /// server whose idle timer fires does).
    pub fn hang_up_after_each_message(&self) {
        lock(&self.log).hang_up = true;
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> usize {
        lock(&self.log).connections
    }

    /// Every command verb received (upper case), in order, across connections.
    pub fn commands(&self) -> Vec<String> {
        lock(&self.log).commands.clone()
    }

    /// The transactions that reached the end of DATA.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.log).received.clone()
    }

    /// Whether any DATA command was received.
    pub fn got_data(&self) -> bool {
        lock(&self.log).commands.iter().any(|c| c == "DATA")
    }
}

async fn serve(
    tcp: TcpStream,
    log: Arc<Mutex<Log>>,
    name: Arc<str>,
    reject: Arc<Vec<String>>,
    mode: TlsMode,
) -> std::io::Result<()> {
    let offer = !matches!(mode, TlsMode::NoStarttls);
    let mut tcp = BufReader::new(tcp);
    tcp.get_mut()
        .write_all(format!("220 {name} ESMTP test receiver\r\n").as_bytes())
        .await?;
    let refuse = matches!(mode, TlsMode::Refuse454);
    match dialogue(&mut tcp, &log, &name, &reject, offer, false, refuse).await? {
        Next::Close => return Ok(()),
        Next::Upgrade => {}
    }
    // RFC 3207: discard anything buffered before the handshake.
    let mut tcp = tcp.into_inner();
    match mode {
        TlsMode::Rustls(config) => {
            let tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
            let mut tls = BufReader::new(tls);
            dialogue(&mut tls, &log, &name, &reject, false, true, false).await?;
        }
        TlsMode::DropMidHandshake => {
            let mut hello = [0u8; 64];
            let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut hello).await;
            drop(tcp);
        }
        TlsMode::Splice(port) => {
            let ip = tcp.local_addr()?.ip();
            let mut backend = TcpStream::connect((ip, port)).await?;
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut backend).await;
        }
        TlsMode::NoStarttls | TlsMode::Refuse454 => {}
    }
    Ok(())
}

async fn reply<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    text: &str,
) -> std::io::Result<()> {
    s.get_mut().write_all(text.as_bytes()).await?;
    s.get_mut().flush().await
}

fn arg_address(line: &str) -> String {
    let start = line.find('<').map_or(0, |i| i + 1);
    let end = line[start..].find('>').map_or(line.len(), |i| start + i);
    line[start..end].to_string()
}

async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    log: &Mutex<Log>,
    name: &str,
    reject: &[String],
    offer_starttls: bool,
    tls: bool,
    refuse: bool,
) -> std::io::Result<Next> {
    let mut mail_from = String::new();
    let mut rcpts = Vec::new();
    // with PIPELINING, MAIL and RCPT replies wait for DATA (a client that waits for each
    // reply stalls)
    let hold = tls && lock(log).pipelining;
    let mut held = String::new();
    loop {
        let mut line = Vec::new();
        if s.read_until(b'\n', &mut line).await? == 0 {
            return Ok(Next::Close);
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let verb = text
            .split([' ', ':'])
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        lock(log).commands.push(verb.clone());
        match verb.as_str() {
            "EHLO" => {
                let starttls = if offer_starttls {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                };
                let pipelining = if tls && lock(log).pipelining {
                    "250-PIPELINING\r\n"
                } else {
                    ""
                };
                reply(s, &format!("250-{name}\r\n250-8BITMIME\r\n{starttls}{pipelining}250-ENHANCEDSTATUSCODES\r\n250 SIZE 10000000\r\n")).await?;
            }
            "STARTTLS" if offer_starttls && refuse => {
                reply(s, "454 4.7.0 TLS not available due to temporary reason\r\n").await?;
            }
            "STARTTLS" if offer_starttls => {
                reply(s, "220 2.0.0 Ready to start TLS\r\n").await?;
                return Ok(Next::Upgrade);
            }
            "MAIL" => {
                mail_from = arg_address(&text);
                rcpts.clear();
                held.push_str("250 2.1.0 ok\r\n");
            }
            "RCPT" => {
                let to = arg_address(&text);
                if reject.contains(&to.to_ascii_lowercase()) {
                    held.push_str("550 5.1.1 no such user here\r\n");
                } else {
                    rcpts.push(to);
                    held.push_str("250 2.1.5 ok\r\n");
                }
            }
            "DATA" => {
                held.push_str("354 go ahead\r\n");
                reply(s, &std::mem::take(&mut held)).await?;
                let mut data = Vec::new();
                loop {
                    let mut l = Vec::new();
                    if s.read_until(b'\n', &mut l).await? == 0 {
                        return Ok(Next::Close);
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    let unstuffed = if l.first() == Some(&b'.') {
                        &l[1..]
                    } else {
                        &l[..]
                    };
                    data.extend_from_slice(unstuffed);
                }
                lock(log).received.push(Received {
                    mail_from: mail_from.clone(),
                    rcpt_to: std::mem::take(&mut rcpts),
                    data,
                    tls,
                });
                reply(s, "250 2.0.0 queued\r\n").await?;
                if lock(log).hang_up {
                    return Ok(Next::Close);
                }
            }
            "RSET" => {
                rcpts.clear();
                reply(s, "250 2.0.0 ok\r\n").await?;
            }
            "NOOP" => reply(s, "250 2.0.0 ok\r\n").await?,
            "QUIT" => {
                reply(s, "221 2.0.0 bye\r\n").await?;
                return Ok(Next::Close);
            }
            _ => reply(s, "502 5.5.1 not implemented\r\n").await?,
        }
        if !hold && !held.is_empty() {
            reply(s, &std::mem::take(&mut held)).await?;
        }
    }
}
