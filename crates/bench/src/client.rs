//! A minimal SMTP client for the load generator: plain, or STARTTLS with AUTH PLAIN.

use crate::error::BenchError;
use crate::stream::Stream;
use base64::Engine as _;
use rustls_pki_types::ServerName;
use sealpost_smtp::{read_reply, write_data, LineReader, Reply};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How a load session talks to the server.
#[derive(Clone)]
pub enum Security {
    /// Plain SMTP, no AUTH.
    Plain,
    /// STARTTLS (certificate verified against the given roots and name), then AUTH PLAIN
    /// unless the user is empty.
    StartTls {
        /// TLS connector trusting the bench CA.
        connector: TlsConnector,
        /// Name the server certificate must carry.
        server_name: ServerName<'static>,
        /// AUTH user.
        user: String,
        /// AUTH password.
        password: String,
    },
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Plain => f.write_str("Plain"),
            Security::StartTls {
                server_name, user, ..
            } => f
                .debug_struct("StartTls")
                .field("server_name", server_name)
                .field("user", user)
                .finish_non_exhaustive(),
        }
    }
}

impl Security {
    /// STARTTLS + AUTH PLAIN, trusting the certificates in `roots`.
    pub fn starttls(
        roots: rustls::RootCertStore,
        server_name: &str,
        user: &str,
        password: &str,
    ) -> Result<Security, BenchError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| BenchError::ServerName(server_name.to_string()))?;
        Ok(Security::StartTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            user: user.to_string(),
            password: password.to_string(),
        })
    }
}

/// One open SMTP session.
pub struct Client {
    reader: LineReader<Stream>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// The result of one transaction.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The final reply was 250.
    pub accepted: bool,
    /// Time from the end of DATA (final dot written and flushed) to the reply.
    pub latency: Duration,
    /// The reply code that ended the transaction.
    pub code: u16,
}

fn expect(command: &'static str, reply: &Reply, code: u16) -> Result<(), BenchError> {
    if reply.code == code {
        Ok(())
    } else {
        Err(BenchError::Unexpected {
            command,
            code: reply.code,
            text: reply.text(),
        })
    }
}

impl Client {
    /// Connects, reads the greeting, says EHLO and, for STARTTLS, upgrades and authenticates.
    pub async fn connect(
        addr: SocketAddr,
        helo: &str,
        security: &Security,
    ) -> Result<Client, BenchError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| BenchError::net("connecting", e))?;
        tcp.set_nodelay(true)
            .map_err(|e| BenchError::net("TCP_NODELAY", e))?;
        let mut c = Client {
            reader: LineReader::new(Stream::Plain(tcp)),
        };
        let greeting = read_reply(&mut c.reader).await?;
        expect("greeting", &greeting, 220)?;
        c.command("EHLO", &format!("EHLO {helo}\r\n"), 250).await?;
        if let Security::StartTls {
            connector,
            server_name,
            user,
            password,
        } = security
        {
            c.command("STARTTLS", "STARTTLS\r\n", 220).await?;
            let (stream, _ahead) = c.reader.into_inner();
            let Stream::Plain(tcp) = stream else {
                return Err(BenchError::Unexpected {
                    command: "STARTTLS",
                    code: 0,
                    text: "already TLS".into(),
                });
            };
            let tls = connector
                .connect(server_name.clone(), tcp)
                .await
                .map_err(|e| BenchError::net("TLS handshake", e))?;
            c = Client {
                reader: LineReader::new(Stream::Client(Box::new(tls))),
            };
            c.command("EHLO", &format!("EHLO {helo}\r\n"), 250).await?;
            if user.is_empty() {
                return Ok(c);
            }
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
            c.command("AUTH", &format!("AUTH PLAIN {token}\r\n"), 235)
                .await?;
        }
        Ok(c)
    }

    /// Connects and stops after the EHLO (or after STARTTLS and its EHLO, without AUTH).
    pub async fn connect_idle(
        addr: SocketAddr,
        helo: &str,
        tls: Option<(&TlsConnector, &ServerName<'static>)>,
    ) -> Result<Client, BenchError> {
        let c = Client::connect(addr, helo, &Security::Plain).await?;
        let Some((connector, name)) = tls else {
            return Ok(c);
        };
        let mut c = c;
        c.command("STARTTLS", "STARTTLS\r\n", 220).await?;
        let (stream, _ahead) = c.reader.into_inner();
        let Stream::Plain(tcp) = stream else {
            return Err(BenchError::Unexpected {
                command: "STARTTLS",
                code: 0,
                text: "already TLS".into(),
            });
        };
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| BenchError::net("TLS handshake", e))?;
        let mut c = Client {
            reader: LineReader::new(Stream::Client(Box::new(tls))),
        };
        c.command("EHLO", &format!("EHLO {helo}\r\n"), 250).await?;
        Ok(c)
    }

    async fn write(&mut self, line: &str) -> Result<(), BenchError> {
        let w = self.reader.get_mut();
        w.write_all(line.as_bytes())
            .await
            .map_err(|e| BenchError::net("writing a command", e))?;
        w.flush()
            .await
            .map_err(|e| BenchError::net("writing a command", e))
    }

    async fn command(
        &mut self,
        verb: &'static str,
        line: &str,
        code: u16,
    ) -> Result<Reply, BenchError> {
        self.write(line).await?;
        let reply = read_reply(&mut self.reader).await?;
        expect(verb, &reply, code)?;
        Ok(reply)
    }

    /// Sends one message to one recipient. A refusal (4xx/5xx) is returned as `accepted: false`
    /// after RSET; an I/O or protocol error is an `Err` (the session is then unusable).
    pub async fn send(&mut self, from: &str, to: &str, message: &[u8]) -> Result<Sent, BenchError> {
        let refused = |code| Sent {
            accepted: false,
            latency: Duration::ZERO,
            code,
        };
        for (verb, line, code) in [
            ("MAIL", format!("MAIL FROM:<{from}>\r\n"), 250),
            ("RCPT", format!("RCPT TO:<{to}>\r\n"), 250),
            ("DATA", "DATA\r\n".to_string(), 354),
        ] {
            self.write(&line).await?;
            let reply = read_reply(&mut self.reader).await?;
            if reply.code != code {
                if reply.code >= 400 && reply.code < 600 {
                    self.command("RSET", "RSET\r\n", 250).await?;
                    return Ok(refused(reply.code));
                }
                expect(verb, &reply, code)?;
            }
        }
        write_data(self.reader.get_mut(), message)
            .await
            .map_err(|e| BenchError::net("writing message data", e))?;
        let t0 = Instant::now();
        let reply = read_reply(&mut self.reader).await?;
        Ok(Sent {
            accepted: reply.code == 250,
            latency: t0.elapsed(),
            code: reply.code,
        })
    }

    /// Says QUIT and closes (errors ignored: the work is done).
    pub async fn quit(mut self) {
        if self.write("QUIT\r\n").await.is_ok() {
            let _ = read_reply(&mut self.reader).await;
        }
        let _ = self.reader.get_mut().shutdown().await;
    }
}
