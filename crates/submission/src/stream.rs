//! The session's byte stream: plain TCP or TLS, with an idle timeout on reads.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Plain TCP or a server-side TLS stream.
pub enum Transport {
    /// Before STARTTLS, or on a plain listener.
    Plain(TcpStream),
    /// After STARTTLS or on an implicit-TLS listener.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// No connection: a placeholder while the stream is being upgraded (reads EOF, writes fail).
    Closed,
}

/// A transport whose reads fail with `TimedOut` after `idle` without progress.
pub struct Conn {
    inner: Transport,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Conn {
    /// Wraps a transport with an idle read timeout.
    pub fn new(inner: Transport, idle: Duration) -> Conn {
        Conn {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// Changes the idle timeout (commands and DATA have different ones) and restarts it.
    pub fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
        self.deadline.as_mut().reset(Instant::now() + idle);
    }

    /// The transport, for the STARTTLS upgrade.
    pub fn into_inner(self) -> Transport {
        self.inner
    }

    /// The TLS session, if any.
    pub fn tls(&self) -> Option<&rustls::ServerConnection> {
        match &self.inner {
            Transport::Plain(_) | Transport::Closed => None,
            Transport::Tls(t) => Some(t.get_ref().1),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let res = match &mut this.inner {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Closed => Poll::Ready(Ok(())),
        };
        match res {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + this.idle;
                    this.deadline.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client idle timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Transport::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Closed => Poll::Ready(Err(closed())),
        }
    }
}

use std::future::Future;

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is being upgraded")
}
