//! SMTP replies (RFC 5321 §4.2): building them (server side) and reading them (client side).

use std::fmt;
use std::io;

use tokio::io::AsyncRead;

use crate::codec::{LineError, LineReader};
use crate::status::EnhancedStatus;

/// Longest reply line accepted, CRLF included (RFC 5321 says 512; servers exceed it).
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines accepted in one reply.
pub const MAX_REPLY_LINES: usize = 100;

/// An SMTP reply: a code, an optional enhanced status and one or more text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code, e.g. 250.
    pub code: u16,
    /// The enhanced status code, repeated on every line on the wire.
    pub status: Option<EnhancedStatus>,
    /// The text lines, without code, status or CRLF.
    pub lines: Vec<String>,
}

/// Replaces characters that must not appear in reply text (controls) by `?`.
fn sanitize(line: &str) -> String {
    line.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

impl Reply {
    /// Builds a reply; a `'\n'` in `text` starts a new line of a multi-line reply.
    pub fn new(code: u16, status: Option<EnhancedStatus>, text: &str) -> Self {
        let lines = text
            .split('\n')
            .map(|l| sanitize(l.strip_suffix('\r').unwrap_or(l)))
            .collect();
        Self {
            code,
            status,
            lines,
        }
    }

    /// Serialises the reply: `250-2.0.0 a\r\n250 2.0.0 b\r\n`.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.lines.iter().map(|l| l.len() + 16).sum());
        let empty = [String::new()];
        let lines: &[String] = if self.lines.is_empty() {
            &empty
        } else {
            &self.lines
        };
        let last = lines.len() - 1;
        for (i, line) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let text = match self.status {
                Some(status) if line.is_empty() => status.to_string(),
                Some(status) => format!("{status} {}", sanitize(line)),
                None => sanitize(line),
            };
            if text.is_empty() && i == last {
                out.extend_from_slice(format!("{:03}\r\n", self.code).as_bytes());
            } else {
                out.extend_from_slice(format!("{:03}{sep}{text}\r\n", self.code).as_bytes());
            }
        }
        out
    }

    /// 2xx or 3xx: the command was accepted (3xx: send more).
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// 4xx: temporary failure, try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: permanent failure.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The text lines joined by a single space.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }
}

impl fmt::Display for Reply {
    /// One line: `550 5.1.1 text of line one text of line two`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:03}", self.code)?;
        if let Some(status) = self.status {
            write!(f, " {status}")?;
        }
        for line in &self.lines {
            if !line.is_empty() {
                write!(f, " {line}")?;
            }
        }
        Ok(())
    }
}

/// Why a reply could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The server closed the connection.
    #[error("connection closed while reading a reply")]
    Eof,
    /// Reading failed.
    #[error("read failed: {0}")]
    Io(io::Error),
    /// A reply line was longer than [`MAX_REPLY_LINE`].
    #[error("reply line too long")]
    LineTooLong,
    /// A reply line ended with a bare CR or LF.
    #[error("bare CR or LF in reply")]
    BareLineEnding,
    /// More than [`MAX_REPLY_LINES`] lines.
    #[error("too many reply lines")]
    TooManyLines,
    /// A line did not start with a reply code and a separator.
    #[error("malformed reply line")]
    Malformed,
    /// A continuation line carried another code than the first line.
    #[error("reply code changed within a reply: {first} then {found}")]
    InconsistentCode {
        /// The code of the first line.
        first: u16,
        /// The differing code.
        found: u16,
    },
}

impl From<LineError> for ReplyError {
    fn from(e: LineError) -> Self {
        match e {
            LineError::TooLong => ReplyError::LineTooLong,
            LineError::BareLf | LineError::BareCr => ReplyError::BareLineEnding,
            LineError::Eof => ReplyError::Eof,
            LineError::Io(e) => ReplyError::Io(e),
        }
    }
}

/// Splits a reply line into code, "is last line" and text.
fn parse_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    let (digits, rest) = line.split_at_checked(3).ok_or(ReplyError::Malformed)?;
    let code = match digits {
        [a @ b'2'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(ReplyError::Malformed),
    };
    match rest.split_first() {
        None => Ok((code, true, rest)),
        Some((b' ', text)) => Ok((code, true, text)),
        Some((b'-', text)) => Ok((code, false, text)),
        Some(_) => Err(ReplyError::Malformed),
    }
}

/// Splits an enhanced status off the start of `text` when it matches the code's class.
fn split_status(code: u16, text: &str) -> Option<(EnhancedStatus, &str)> {
    let (token, rest) = match text.split_once(' ') {
        Some((token, rest)) => (token, rest),
        None => (text, ""),
    };
    let status = EnhancedStatus::parse(token)?;
    (u16::from(status.class) == code / 100).then_some((status, rest))
}

/// Reads one reply, possibly multi-line, and parses its enhanced status code.
pub async fn read_reply<S: AsyncRead + Unpin>(
    reader: &mut LineReader<S>,
) -> Result<Reply, ReplyError> {
    let mut first_code = None;
    let mut texts = Vec::new();
    loop {
        if texts.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        let line = reader.read_line(MAX_REPLY_LINE).await?;
        let (code, last, text) = parse_line(&line)?;
        match first_code {
            None => first_code = Some(code),
            Some(first) if first != code => {
                return Err(ReplyError::InconsistentCode { first, found: code })
            }
            Some(_) => {}
        }
        texts.push(String::from_utf8_lossy(text).into_owned());
        if last {
            break;
        }
    }
    let code = first_code.ok_or(ReplyError::Malformed)?;
    let status = texts
        .first()
        .and_then(|t| split_status(code, t))
        .map(|(s, _)| s);
    let lines = texts
        .iter()
        .map(|t| match (status, split_status(code, t)) {
            (Some(s), Some((found, rest))) if s == found => sanitize(rest),
            _ => sanitize(t),
        })
        .collect();
    Ok(Reply {
        code,
        status,
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::testutil::Trickle;

    async fn read(input: &[u8]) -> Result<Reply, ReplyError> {
        read_reply(&mut LineReader::new(input)).await
    }

    #[test]
    fn single_line_to_wire() {
        let r = Reply::new(250, Some(EnhancedStatus::OK), "Ok 123");
        assert_eq!(r.to_wire(), b"250 2.0.0 Ok 123\r\n");
        assert_eq!(r.to_string(), "250 2.0.0 Ok 123");
        let r = Reply::new(354, None, "End data with <CR><LF>.<CR><LF>");
        assert_eq!(r.to_wire(), b"354 End data with <CR><LF>.<CR><LF>\r\n");
    }

    #[test]
    fn multi_line_repeats_status_on_every_line() {
        let r = Reply::new(550, Some(EnhancedStatus::NOT_AUTHORIZED), "one\ntwo\nthree");
        assert_eq!(
            r.to_wire(),
            b"550-5.7.1 one\r\n550-5.7.1 two\r\n550 5.7.1 three\r\n"
        );
        let r = Reply::new(250, None, "relay.example\nPIPELINING\n8BITMIME");
        assert_eq!(
            r.to_wire(),
            b"250-relay.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        );
    }

    #[test]
    fn control_characters_never_reach_the_wire() {
        let r = Reply::new(250, None, "a\rb\u{0}c\r\nd");
        assert_eq!(r.to_wire(), b"250-a?b?c\r\n250 d\r\n");
        let r = Reply {
            code: 250,
            status: None,
            lines: vec!["x\r\ny".into()],
        };
        assert_eq!(r.to_wire(), b"250 x??y\r\n");
        let r = Reply {
            code: 221,
            status: None,
            lines: vec![],
        };
        assert_eq!(r.to_wire(), b"221\r\n");
    }

    #[test]
    fn classes() {
        let r = |code| Reply::new(code, None, "");
        assert!(r(250).is_positive() && r(354).is_positive());
        assert!(r(451).is_transient() && !r(451).is_positive());
        assert!(r(554).is_permanent() && !r(554).is_transient());
    }

    #[tokio::test]
    async fn reads_multi_line_with_status() {
        let r = read(b"550-5.1.1 no such\r\n550-5.1.1 user\r\n550 5.1.1 here\r\n")
            .await
            .unwrap();
        assert_eq!(r.code, 550);
        assert_eq!(r.status, Some(EnhancedStatus::BAD_MAILBOX));
        assert_eq!(r.lines, ["no such", "user", "here"]);
        assert!(r.is_permanent());
        assert_eq!(Reply::new(550, r.status, "no such\nuser\nhere"), r);
    }

    #[tokio::test]
    async fn reads_ehlo_reply_one_byte_at_a_time() {
        let input = b"250-mx.example Hello\r\n250-SIZE 1000\r\n250 STARTTLS\r\nnext";
        let mut reader = LineReader::new(Trickle::new(input));
        let r = read_reply(&mut reader).await.unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.status, None);
        assert_eq!(r.lines, ["mx.example Hello", "SIZE 1000", "STARTTLS"]);
    }

    #[tokio::test]
    async fn status_of_other_class_is_text() {
        let r = read(b"250 5.0.0 odd\r\n").await.unwrap();
        assert_eq!(r.status, None);
        assert_eq!(r.lines, ["5.0.0 odd"]);
        let r = read(b"220\r\n").await.unwrap();
        assert_eq!((r.code, r.lines.clone()), (220, vec![String::new()]));
        let r = read(b"451 4.3.0\r\n").await.unwrap();
        assert_eq!(r.status, Some(EnhancedStatus::TEMP_SYSTEM));
        assert_eq!(r.lines, [""]);
    }

    #[tokio::test]
    async fn reply_errors() {
        assert!(matches!(read(b"").await, Err(ReplyError::Eof)));
        assert!(matches!(read(b"250-a\r\n").await, Err(ReplyError::Eof)));
        assert!(matches!(read(b"25\r\n").await, Err(ReplyError::Malformed)));
        assert!(matches!(
            read(b"abc hi\r\n").await,
            Err(ReplyError::Malformed)
        ));
        assert!(matches!(
            read(b"150 hi\r\n").await,
            Err(ReplyError::Malformed)
        ));
        assert!(matches!(
            read(b"250_hi\r\n").await,
            Err(ReplyError::Malformed)
        ));
        assert!(matches!(
            read(b"250 hi\n").await,
            Err(ReplyError::BareLineEnding)
        ));
        assert!(matches!(
            read(b"250-a\r\n251 b\r\n").await,
            Err(ReplyError::InconsistentCode {
                first: 250,
                found: 251
            })
        ));
        let long = [b"250 ".as_slice(), &[b'x'; MAX_REPLY_LINE], b"\r\n"].concat();
        assert!(matches!(read(&long).await, Err(ReplyError::LineTooLong)));
        let ok = [b"250 ".as_slice(), &[b'x'; MAX_REPLY_LINE - 6], b"\r\n"].concat();
        assert!(read(&ok).await.is_ok());
        let many = [b"250-x\r\n".repeat(MAX_REPLY_LINES), b"250 x\r\n".to_vec()].concat();
        assert!(matches!(read(&many).await, Err(ReplyError::TooManyLines)));
        let enough = [
            b"250-x\r\n".repeat(MAX_REPLY_LINES - 1),
            b"250 x\r\n".to_vec(),
        ]
        .concat();
        assert_eq!(read(&enough).await.unwrap().lines.len(), MAX_REPLY_LINES);
    }
}
