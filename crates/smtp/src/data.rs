//! The DATA phase: reading a dot-stuffed message (server) and writing one (client).

use std::io::{self, IoSlice};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::codec::{LineError, LineReader};
use crate::crlf::only_crlf;
use crate::reply::Reply;
use crate::status::EnhancedStatus;

/// Size of the chunks `write_data` hands to the writer.
const WRITE_CHUNK: usize = 64 * 1024;

/// Limits applied while reading a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLimits {
    /// Largest message accepted, in octets after dot-unstuffing, CRLFs included.
    pub max_size: u64,
    /// Longest line on the wire, CRLF included (RFC 5321: 1000).
    pub max_line: usize,
}

impl Default for DataLimits {
    /// 40 MB messages (the SES limit), 1000-octet lines.
    fn default() -> Self {
        Self {
            max_size: 40 * 1000 * 1000,
            max_line: 1000,
        }
    }
}

/// Why a message was not received. Each variant names the reply the session should send.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A bare LF or bare CR (SMTP smuggling, CERT VU#302671). Reading stopped right there.
    /// Reply 521 5.5.2 and close the connection: the client's framing cannot be trusted.
    #[error("bare CR or LF in message data")]
    BareLineEnding,
    /// The message exceeded `max_size`; the rest was read and discarded up to the final dot.
    /// Reply 552 5.3.4 and continue the session.
    #[error("message too big")]
    TooBig,
    /// A line exceeded `max_line`; the rest was read and discarded up to the final dot.
    /// Reply 500 5.5.6 and continue the session.
    #[error("line too long in message data")]
    LineTooLong,
    /// A NUL byte in the message; the rest was read and discarded up to the final dot.
    /// Reply 554 5.6.0 and continue the session.
    #[error("NUL byte in message data")]
    NulByte,
    /// The connection closed before the final dot: nothing may be queued; no reply can be sent.
    #[error("connection closed during DATA")]
    Eof,
    /// Reading failed before the final dot: nothing may be queued; close the connection.
    #[error("read failed during DATA: {0}")]
    Io(io::Error),
}

impl DataError {
    /// The reply to send (for `Eof`/`Io` a 421 that can only be sent best-effort).
    pub fn reply(&self) -> Reply {
        use EnhancedStatus as S;
        match self {
            DataError::BareLineEnding => Reply::new(
                521,
                Some(S::SYNTAX),
                "Bare CR or LF not allowed; only CRLF ends a line",
            ),
            DataError::TooBig => Reply::new(552, Some(S::TOO_BIG), "Message is too long."),
            DataError::LineTooLong => Reply::new(500, Some(S::LINE_TOO_LONG), "Line too long"),
            DataError::NulByte => {
                Reply::new(554, Some(S::MEDIA), "NUL characters not allowed in message")
            }
            DataError::Eof | DataError::Io(_) => {
                Reply::new(421, Some(S::BAD_CONNECTION), "Connection lost during DATA")
            }
        }
    }

    /// Whether the session can go on after sending the reply (the final dot was read).
    pub fn session_can_continue(&self) -> bool {
        matches!(
            self,
            DataError::TooBig | DataError::LineTooLong | DataError::NulByte
        )
    }
}

/// Reads a message after the 354 reply, up to the line `.`, and removes dot-stuffing.
///
/// The result keeps the CRLF line endings as sent. Only CRLF.CRLF ends the message; a bare LF
/// or CR stops reading at once with [`DataError::BareLineEnding`]. Once an error that allows
/// the session to continue is found, the rest is read and dropped without being kept.
pub async fn read_data<S: AsyncRead + Unpin>(
    reader: &mut LineReader<S>,
    limits: DataLimits,
) -> Result<Vec<u8>, DataError> {
    reader.set_data_mode(true);
    let result = read_lines(reader, limits).await;
    reader.set_data_mode(false);
    result
}

/// The body of [`read_data`].
async fn read_lines<S: AsyncRead + Unpin>(
    reader: &mut LineReader<S>,
    limits: DataLimits,
) -> Result<Vec<u8>, DataError> {
    let mut message = Vec::new();
    let mut size: u64 = 0;
    let mut failure: Option<DataError> = None;
    loop {
        if failure.is_none() {
            // Ordinary lines in bulk; the line after them (dot, NUL, bare CR/LF, too long, too
            // much, or not complete yet) goes through the checks below.
            let room = limits.max_size.saturating_sub(size);
            let taken = reader.take_plain_lines(limits.max_line, room, &mut message);
            size = size.saturating_add(taken as u64);
        }
        let len = match reader.fill_line(limits.max_line).await {
            Ok(len) => len,
            Err(LineError::TooLong) => {
                failure.get_or_insert(DataError::LineTooLong);
                message = Vec::new();
                continue;
            }
            Err(LineError::BareLf | LineError::BareCr) => return Err(DataError::BareLineEnding),
            Err(LineError::Eof) => return Err(DataError::Eof),
            Err(LineError::Io(e)) => return Err(DataError::Io(e)),
        };
        let line = reader.line_bytes(len);
        if line == b"." {
            reader.consume_line(len);
            break;
        }
        if failure.is_none() {
            let content = line.strip_prefix(b".").unwrap_or(line);
            size = size.saturating_add(content.len() as u64 + 2);
            if content.contains(&0) {
                failure = Some(DataError::NulByte);
            } else if size > limits.max_size {
                failure = Some(DataError::TooBig);
            } else {
                message.extend_from_slice(content);
                message.extend_from_slice(b"\r\n");
            }
            if failure.is_some() {
                message = Vec::new();
            }
        }
        reader.consume_line(len);
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(message),
    }
}

/// Sends a message dot-stuffed and terminated by `.\r\n`, adding a final CRLF if missing.
///
/// The message must use CRLF line endings only; a bare CR or LF is refused with
/// `InvalidInput` before anything is written. A writer with vectored writes gets the message's
/// own bytes, with the stuffing dots between them (no copy); any other writer gets chunks of
/// about 64 KiB. Flushes at the end.
pub async fn write_data<W: AsyncWrite + Unpin>(w: &mut W, message: &[u8]) -> io::Result<()> {
    if !only_crlf(message) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message contains a bare CR or LF",
        ));
    }
    // Every LF is preceded by CR (checked above), so a line starts at 0 and after each LF:
    // the lines to stuff start at 0 if it holds a dot, and one past each "\n.".
    let first = (message.first() == Some(&b'.')).then_some(0);
    let dots = first
        .into_iter()
        .chain(memchr::memmem::find_iter(message, b"\n.").map(|lf| lf + 1));
    let end: &[u8] = if !message.is_empty() && !message.ends_with(b"\r\n") {
        b"\r\n.\r\n"
    } else {
        b".\r\n"
    };
    if w.is_write_vectored() {
        let mut parts = Vec::with_capacity(4);
        let mut start = 0;
        for dot in dots {
            let run = message.get(start..dot).unwrap_or_default();
            if !run.is_empty() {
                parts.push(IoSlice::new(run));
            }
            parts.push(IoSlice::new(b"."));
            start = dot;
        }
        let rest = message.get(start..).unwrap_or_default();
        if !rest.is_empty() {
            parts.push(IoSlice::new(rest));
        }
        parts.push(IoSlice::new(end));
        write_all_vectored(w, &mut parts).await?;
    } else {
        // the runs and the end, no more than a chunk at a time (a few dot lines may grow it once)
        let mut out = Vec::with_capacity(message.len().min(WRITE_CHUNK) + 8);
        let mut start = 0;
        for dot in dots {
            put(w, &mut out, message.get(start..dot).unwrap_or_default()).await?;
            out.push(b'.');
            start = dot;
        }
        put(w, &mut out, message.get(start..).unwrap_or_default()).await?;
        out.extend_from_slice(end);
        w.write_all(&out).await?;
    }
    w.flush().await
}

/// Most slices handed to one vectored write (Linux's `writev` takes up to 1,024).
const MAX_SLICES: usize = 64;

/// Writes every byte of `parts`, in vectored writes of up to [`MAX_SLICES`] slices.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut parts: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !parts.is_empty() {
        let window = parts.get(..MAX_SLICES).unwrap_or(parts);
        let offered: usize = window.iter().map(|p| p.len()).sum();
        let n = w.write_vectored(window).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n > offered {
            return Err(io::Error::other("writer reported more bytes than offered"));
        }
        IoSlice::advance_slices(&mut parts, n);
    }
    Ok(())
}

/// Appends `run` to `out`, writing whenever `out` reaches [`WRITE_CHUNK`] bytes.
async fn put<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &mut Vec<u8>,
    mut run: &[u8],
) -> io::Result<()> {
    while !run.is_empty() {
        let room = WRITE_CHUNK.saturating_sub(out.len());
        if out.is_empty() && run.len() >= WRITE_CHUNK {
            // nothing to join it with: write the whole chunks straight from the message
            let whole = run.len() - run.len() % WRITE_CHUNK;
            let (chunks, rest) = run.split_at(whole);
            w.write_all(chunks).await?;
            run = rest;
            continue;
        }
        let (now, rest) = run.split_at(room.min(run.len()));
        out.extend_from_slice(now);
        run = rest;
        if out.len() >= WRITE_CHUNK {
            w.write_all(out).await?;
            out.clear();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line-by-line `write_data` the run-based one replaced, kept as the reference.
    fn stuffed_reference(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in message.split_inclusive(|&b| b == b'\n') {
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
        }
        if !message.is_empty() && !message.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    /// A random message of dot lines, empty lines and long lines (some larger than a write
    /// chunk); every tenth case has thousands of lines. It may end without CRLF or in dots.
    fn random_message(rng: &mut Rng, case: usize) -> Vec<u8> {
        let mut message = Vec::new();
        let lines = rng.below(if case.is_multiple_of(10) { 3000 } else { 30 });
        for _ in 0..lines {
            if rng.below(3) == 0 {
                message.push(b'.');
            }
            let len = match rng.below(20) {
                0 => rng.below(3 * WRITE_CHUNK as u64),
                1 => 0,
                _ => rng.below(100),
            };
            message.extend(std::iter::repeat_n(b"a.x"[rng.below(3)], len));
            message.extend_from_slice(b"\r\n");
        }
        if rng.below(3) == 0 {
            message.extend(std::iter::repeat_n(b'.', rng.below(3)));
        }
        message
    }

    /// Random messages of dot lines, empty lines and long lines, some larger than a write
    /// chunk: the same bytes on the wire as the line-by-line reference, in chunk-sized writes.
    #[tokio::test]
    async fn write_data_matches_the_line_by_line_reference() {
        let mut rng = Rng(0x0D07_57AF_F1E5_0001);
        for case in 0..400 {
            let message = random_message(&mut rng, case);
            let mut writer = CountingWriter::default();
            write_data(&mut writer, &message).await.unwrap();
            assert_eq!(writer.bytes, stuffed_reference(&message), "case {case}");
            assert!(writer.flushed);
            assert!(
                writer.writes <= writer.bytes.len() / WRITE_CHUNK + 1,
                "case {case}: {} writes for {} bytes",
                writer.writes,
                writer.bytes.len()
            );
        }
    }

    /// The same random messages through a writer with vectored writes that takes at most
    /// `cap` bytes per call: the same bytes as the reference, and few calls when it takes all.
    #[tokio::test]
    async fn vectored_write_data_matches_the_line_by_line_reference() {
        let mut rng = Rng(0x0D07_57AF_F1E5_0002);
        for case in 0..400 {
            let message = random_message(&mut rng, case);
            // a byte per call only for short messages (it is slow in a debug build)
            let cap = match case % 5 {
                1 if message.len() <= 4096 => 1,
                1 | 2 => 7 + message.len() / 64,
                3 => 4096,
                4 => WRITE_CHUNK,
                _ => usize::MAX,
            };
            let mut writer = VectoredWriter::new(cap);
            write_data(&mut writer, &message).await.unwrap();
            assert_eq!(writer.bytes, stuffed_reference(&message), "case {case}");
            assert!(writer.flushed);
            if cap == usize::MAX {
                // one slice per run and per dot, plus the end; MAX_SLICES of them per call
                let dots = writer.bytes.len() - message.len();
                assert!(
                    writer.writes <= (2 * dots + 2).div_ceil(MAX_SLICES),
                    "case {case}: {} writes",
                    writer.writes
                );
            }
        }
    }

    /// A message without lines to stuff goes out as its own bytes, not a copy, in one call.
    #[tokio::test]
    async fn vectored_write_data_sends_the_message_itself() {
        let message = b"Subject: x\r\n\r\nbody\r\n".repeat(5000);
        let mut writer = VectoredWriter::new(usize::MAX);
        write_data(&mut writer, &message).await.unwrap();
        assert_eq!(writer.writes, 1);
        assert_eq!(
            writer.first_slice,
            Some((message.as_ptr() as usize, message.len()))
        );
        assert!(writer.bytes.ends_with(b"body\r\n.\r\n"));
    }

    /// A writer whose vectored writes return 0 or claim more than offered fails the send.
    #[tokio::test]
    async fn vectored_write_data_refuses_a_misbehaving_writer() {
        for (claim, kind) in [
            (0, io::ErrorKind::WriteZero),
            (usize::MAX, io::ErrorKind::Other),
        ] {
            let mut writer = VectoredWriter::new(usize::MAX);
            writer.claim = Some(claim);
            let e = write_data(&mut writer, b"a\r\n").await.unwrap_err();
            assert_eq!(e.kind(), kind);
        }
    }

    use crate::codec::testutil::Trickle;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    const LIMITS: DataLimits = DataLimits {
        max_size: 10 * 1024 * 1024,
        max_line: 1000,
    };

    /// The commands an attacker tries to smuggle after a fake end of data.
    const SMUGGLED: &[u8] = b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nevil\r\n.\r\n";

    async fn read_all(input: &[u8], limits: DataLimits) -> (Result<Vec<u8>, DataError>, Vec<u8>) {
        let mut r = LineReader::new(input);
        let result = read_data(&mut r, limits).await;
        let (_, leftover) = r.into_inner();
        (result, leftover)
    }

    async fn stuffed(message: &[u8]) -> Vec<u8> {
        let mut wire = Vec::new();
        write_data(&mut wire, message).await.unwrap();
        wire
    }

    #[tokio::test]
    async fn reads_until_dot_and_unstuffs() {
        let (m, rest) = read_all(
            b"Subject: x\r\n\r\n..leading dot\r\n...two\r\n.\r\nQUIT\r\n",
            LIMITS,
        )
        .await;
        assert_eq!(m.unwrap(), b"Subject: x\r\n\r\n.leading dot\r\n..two\r\n");
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[tokio::test]
    async fn first_line_may_be_the_dot() {
        let (m, rest) = read_all(b".\r\nQUIT\r\n", LIMITS).await;
        assert_eq!(m.unwrap(), b"");
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[tokio::test]
    async fn dot_with_trailing_text_is_not_the_end() {
        let (m, _) = read_all(b"a\r\n. \r\n.x\r\n.\r\n", LIMITS).await;
        assert_eq!(m.unwrap(), b"a\r\n \r\nx\r\n");
    }

    #[tokio::test]
    async fn stuffing_round_trip_for_dot_lines() {
        for message in [
            &b".\r\n"[..],
            b"..\r\n",
            b".",
            b".hidden\r\n..double\r\nplain\r\n.\r\n",
            b"",
            b"no final crlf",
            b"\r\n\r\n",
        ] {
            let wire = stuffed(message).await;
            let (got, rest) = read_all(&wire, LIMITS).await;
            let mut expected = message.to_vec();
            if !expected.is_empty() && !expected.ends_with(b"\r\n") {
                expected.extend_from_slice(b"\r\n");
            }
            assert_eq!(got.unwrap(), expected, "{message:?}");
            assert!(rest.is_empty());
        }
        assert_eq!(stuffed(b".").await, b"..\r\n.\r\n");
        assert_eq!(stuffed(b"a\r\n.b\r\n").await, b"a\r\n..b\r\n.\r\n");
        assert_eq!(stuffed(b"").await, b".\r\n");
    }

    /// Sends `prefix ++ SMUGGLED` one byte per poll and checks that reading stops at the bare
    /// line ending, `stop` bytes into the input, never reaching the smuggled commands.
    async fn assert_smuggling_stopped(prefix: &[u8], stop: usize) {
        let input = [prefix, SMUGGLED].concat();
        let mut r = LineReader::new(Trickle::new(&input));
        let result = read_data(&mut r, LIMITS).await;
        assert!(
            matches!(result, Err(DataError::BareLineEnding)),
            "{prefix:?}: {result:?}"
        );
        assert_eq!(r.get_ref().consumed(), stop, "{prefix:?}");
        // And in one chunk: same verdict, and the smuggled message is never returned as data.
        let (result, _) = read_all(&input, LIMITS).await;
        assert!(matches!(result, Err(DataError::BareLineEnding)));
    }

    #[tokio::test]
    async fn smuggling_lf_dot_lf() {
        assert_smuggling_stopped(b"hello\n.\n", 6).await;
    }

    #[tokio::test]
    async fn smuggling_crlf_dot_cr() {
        // The CR after the dot needs one more byte to be judged bare.
        assert_smuggling_stopped(b"hello\r\n.\r", 10).await;
    }

    #[tokio::test]
    async fn smuggling_lf_dot_crlf() {
        assert_smuggling_stopped(b"hello\n.\r\n", 6).await;
    }

    #[tokio::test]
    async fn smuggling_cr_dot_cr() {
        assert_smuggling_stopped(b"hello\r.\r", 7).await;
    }

    #[tokio::test]
    async fn too_big_drains_to_the_dot() {
        let mut input = b"x\r\n".repeat(1000);
        input.extend_from_slice(b".\r\nQUIT\r\n");
        let limits = DataLimits {
            max_size: 100,
            max_line: 1000,
        };
        let (m, rest) = read_all(&input, limits).await;
        assert!(matches!(m, Err(DataError::TooBig)));
        assert_eq!(rest, b"QUIT\r\n");
        assert_eq!(
            DataError::TooBig.reply().to_wire(),
            b"552 5.3.4 Message is too long.\r\n"
        );
        // Exactly at the limit is fine.
        let limits = DataLimits {
            max_size: 3000,
            max_line: 1000,
        };
        assert_eq!(read_all(&input, limits).await.0.unwrap().len(), 3000);
        let limits = DataLimits {
            max_size: 2999,
            max_line: 1000,
        };
        assert!(matches!(
            read_all(&input, limits).await.0,
            Err(DataError::TooBig)
        ));
    }

    #[tokio::test]
    async fn bare_lf_while_draining_still_stops() {
        let mut input = b"x\r\n".repeat(100);
        input.extend_from_slice(b"y\n.\n");
        input.extend_from_slice(SMUGGLED);
        let limits = DataLimits {
            max_size: 10,
            max_line: 1000,
        };
        let (m, rest) = read_all(&input, limits).await;
        assert!(matches!(m, Err(DataError::BareLineEnding)));
        assert!(rest.ends_with(SMUGGLED));
    }

    #[tokio::test]
    async fn line_too_long_drains_and_resyncs() {
        let mut input = b"ok\r\n".to_vec();
        input.extend_from_slice(&[b'a'; 999]);
        input.extend_from_slice(b"\r\nmore\r\n.\r\nQUIT\r\n");
        let (m, rest) = read_all(&input, LIMITS).await;
        assert!(matches!(m, Err(DataError::LineTooLong)));
        assert_eq!(rest, b"QUIT\r\n");
        // 998 + CRLF = 1000 is allowed.
        let mut input = vec![b'a'; 998];
        input.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(read_all(&input, LIMITS).await.0.unwrap().len(), 1000);
    }

    #[tokio::test]
    async fn long_line_with_bare_lf_stops() {
        let mut input = vec![b'a'; 5000];
        input.extend_from_slice(b"\n.\n");
        input.extend_from_slice(SMUGGLED);
        let (m, _) = read_all(&input, LIMITS).await;
        assert!(matches!(m, Err(DataError::BareLineEnding)));
    }

    #[tokio::test]
    async fn nul_byte_drains_and_is_refused() {
        let (m, rest) = read_all(b"a\0b\r\nc\r\n.\r\nQUIT\r\n", LIMITS).await;
        let e = m.unwrap_err();
        assert!(matches!(e, DataError::NulByte));
        assert!(e.session_can_continue());
        assert_eq!(e.reply().code, 554);
        assert_eq!(e.reply().status, Some(EnhancedStatus::MEDIA));
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[tokio::test]
    async fn eof_and_io_errors_queue_nothing() {
        let (m, _) = read_all(b"partial\r\nmessage", LIMITS).await;
        assert!(matches!(m, Err(DataError::Eof)));
        let (m, _) = read_all(b"partial\r\n.", LIMITS).await;
        assert!(matches!(m, Err(DataError::Eof)));
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let mut r = LineReader::new(server);
        assert!(matches!(
            read_data(&mut r, LIMITS).await,
            Err(DataError::Eof)
        ));
        let mut r = LineReader::new(FailingReader);
        let e = read_data(&mut r, LIMITS).await.unwrap_err();
        assert!(matches!(e, DataError::Io(_)));
        assert!(!e.session_can_continue());
    }

    #[test]
    fn replies_per_error() {
        let code = |e: DataError| {
            let r = e.reply();
            (r.code, r.status.map(|s| s.to_string()))
        };
        assert_eq!(code(DataError::BareLineEnding), (521, Some("5.5.2".into())));
        assert_eq!(code(DataError::TooBig), (552, Some("5.3.4".into())));
        assert_eq!(code(DataError::LineTooLong), (500, Some("5.5.6".into())));
        assert_eq!(code(DataError::NulByte), (554, Some("5.6.0".into())));
        assert_eq!(code(DataError::Eof), (421, Some("4.4.2".into())));
        assert!(!DataError::BareLineEnding.session_can_continue());
    }

    #[tokio::test]
    async fn five_megabyte_message() {
        let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
        let mut message = Vec::new();
        let mut i = 0u32;
        while message.len() < 5 * 1024 * 1024 {
            if i.is_multiple_of(7) {
                message.push(b'.');
            }
            message.extend_from_slice(line);
            i += 1;
        }
        let mut writer = CountingWriter::default();
        write_data(&mut writer, &message).await.unwrap();
        assert!(
            writer.writes <= message.len() / WRITE_CHUNK + 3,
            "{}",
            writer.writes
        );
        assert!(writer.flushed);
        let (got, rest) = read_all(&writer.bytes, LIMITS).await;
        assert_eq!(got.unwrap(), message);
        assert!(rest.is_empty());

        // Over a real in-memory pipe smaller than the message, writer and reader concurrently.
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let sent = message.clone();
        let writer = tokio::spawn(async move {
            write_data(&mut client, &sent).await?;
            client.write_all(b"QUIT\r\n").await
        });
        let mut r = LineReader::new(server);
        assert_eq!(read_data(&mut r, LIMITS).await.unwrap(), message);
        assert_eq!(r.read_line(512).await.unwrap(), b"QUIT");
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn one_byte_per_poll_message() {
        let message = b"From: a@b.c\r\n\r\n.x\r\n\r\n..\r\nend".repeat(50);
        let wire = stuffed(&message).await;
        let mut r = LineReader::new(Trickle::new(&wire));
        let got = read_data(&mut r, LIMITS).await.unwrap();
        let mut expected = message.clone();
        expected.extend_from_slice(b"\r\n");
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn write_refuses_bare_line_endings_before_writing() {
        for bad in [&b"a\nb"[..], b"a\rb", b"a\r", b"\n", b"a\r\r\n", b"a\n\r\n"] {
            let mut out = Vec::new();
            let e = write_data(&mut out, bad).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(out.is_empty());
        }
    }

    #[tokio::test]
    async fn write_handles_huge_lines() {
        let mut message = vec![b'.'];
        message.extend(std::iter::repeat_n(b'z', 3 * WRITE_CHUNK));
        let wire = stuffed(&message).await;
        assert!(wire.starts_with(b".."));
        assert!(wire.ends_with(b"z\r\n.\r\n"));
        let limits = DataLimits {
            max_size: u64::MAX,
            max_line: usize::MAX,
        };
        let (got, _) = read_all(&wire, limits).await;
        message.extend_from_slice(b"\r\n");
        assert_eq!(got.unwrap(), message);
    }

    /// xorshift64*: a small deterministic generator for the property test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    #[tokio::test]
    async fn random_messages_round_trip() {
        let alphabet = b".. .a.Z\t=-\xc3\xa9";
        let mut rng = Rng(0x5EA1_7057_1234_5678);
        for case in 0..500 {
            let mut message = Vec::new();
            for _ in 0..rng.below(40) {
                for _ in 0..rng.below(120) {
                    message.push(alphabet[rng.below(alphabet.len() as u64)]);
                }
                message.extend_from_slice(b"\r\n");
            }
            if rng.below(4) == 0 {
                message.push(b'.');
            }
            let wire = stuffed(&message).await;
            assert!(only_crlf(&wire));
            assert!(wire.ends_with(b"\r\n.\r\n") || wire == b".\r\n");
            let chunked = rng.below(10) == 0;
            let got = if chunked {
                let mut r = LineReader::new(Trickle::new(&wire));
                read_data(&mut r, LIMITS).await.unwrap()
            } else {
                let (got, rest) = read_all(&wire, LIMITS).await;
                assert!(rest.is_empty(), "case {case}");
                got.unwrap()
            };
            if !message.is_empty() && !message.ends_with(b"\r\n") {
                message.extend_from_slice(b"\r\n");
            }
            assert_eq!(got, message, "case {case}");
        }
    }

    /// `read_data` as it was before the bulk path: every line through `fill_line` and the
    /// checks. Kept as the reference the bulk path must agree with.
    async fn read_data_reference<S: AsyncRead + Unpin>(
        reader: &mut LineReader<S>,
        limits: DataLimits,
    ) -> Result<Vec<u8>, DataError> {
        let mut message = Vec::new();
        let mut size: u64 = 0;
        let mut failure: Option<DataError> = None;
        loop {
            let len = match reader.fill_line(limits.max_line).await {
                Ok(len) => len,
                Err(LineError::TooLong) => {
                    failure.get_or_insert(DataError::LineTooLong);
                    message = Vec::new();
                    continue;
                }
                Err(LineError::BareLf | LineError::BareCr) => {
                    return Err(DataError::BareLineEnding)
                }
                Err(LineError::Eof) => return Err(DataError::Eof),
                Err(LineError::Io(e)) => return Err(DataError::Io(e)),
            };
            let line = reader.line_bytes(len);
            if line == b"." {
                reader.consume_line(len);
                break;
            }
            if failure.is_none() {
                let content = line.strip_prefix(b".").unwrap_or(line);
                size = size.saturating_add(content.len() as u64 + 2);
                if content.contains(&0) {
                    failure = Some(DataError::NulByte);
                } else if size > limits.max_size {
                    failure = Some(DataError::TooBig);
                } else {
                    message.extend_from_slice(content);
                    message.extend_from_slice(b"\r\n");
                }
                if failure.is_some() {
                    message = Vec::new();
                }
            }
            reader.consume_line(len);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(message),
        }
    }

    /// Hands out `data` in chunks of random sizes (1 to 3,000 bytes).
    struct Chunky {
        data: Vec<u8>,
        pos: usize,
        rng: Rng,
    }

    impl AsyncRead for Chunky {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let want = match self.rng.below(4) {
                0 => 1 + self.rng.below(70_000),
                _ => 1 + self.rng.below(3000),
            };
            let end = (self.pos + want.min(buf.remaining())).min(self.data.len());
            let chunk = self.data[self.pos..end].to_vec();
            buf.put_slice(&chunk);
            self.pos = end;
            Poll::Ready(Ok(()))
        }
    }

    /// One random line for the comparison: mostly ordinary text, sometimes a leading dot, a
    /// lone dot, a NUL, a bare CR or LF, a CR LF split oddly, or a line near the length limit.
    fn random_line(rng: &mut Rng, out: &mut Vec<u8>) {
        let text = b"abc xyz.=-\t";
        let len = match rng.below(10) {
            0 => 40 + rng.below(40),
            _ => rng.below(30),
        };
        match rng.below(40) {
            0 => out.push(b'.'),
            1 => out.extend_from_slice(b".."),
            _ => {}
        }
        for _ in 0..len {
            out.push(text[rng.below(text.len() as u64)]);
        }
        match rng.below(200) {
            0 => out.insert(out.len() - len / 2, 0),
            1 => out.push(b'\n'),
            2 => out.push(b'\r'),
            3 => out.extend_from_slice(b"\r\r\n"),
            4 => out.push(0),
            _ => {}
        }
        out.extend_from_slice(if rng.below(300) == 0 {
            b".\r\n"
        } else {
            b"\r\n"
        });
    }

    /// The bulk path gives exactly what reading line by line gives: the same message or the
    /// same error, and the same bytes left unread, over random inputs with every kind of odd
    /// line, random limits and random read sizes.
    #[tokio::test]
    async fn bulk_reading_matches_line_by_line() {
        let mut rng = Rng(0x0DDB_A115_EED5_1234);
        let mut seen = [0usize; 6];
        for case in 0..3000 {
            let mut wire = Vec::new();
            // where each line ends, in message bytes: a size limit right at (or one or two
            // bytes around) one of them is where an off-by-one would show
            let mut ends = vec![0u64];
            for _ in 0..rng.below(300) {
                random_line(&mut rng, &mut wire);
                ends.push(wire.len() as u64);
            }
            if rng.below(8) != 0 {
                wire.extend_from_slice(b".\r\n");
            }
            wire.extend_from_slice(b"QUIT\r\n");
            let max_size = match rng.below(3) {
                0 => rng.below(12_000) as u64,
                _ => (ends[rng.below(ends.len() as u64)] + rng.below(5) as u64).saturating_sub(2),
            };
            let limits = DataLimits {
                max_size,
                max_line: 30 + rng.below(60),
            };
            let seed = rng.next();
            let mut fast = LineReader::new(Chunky {
                data: wire.clone(),
                pos: 0,
                rng: Rng(seed | 1),
            });
            let mut slow = LineReader::new(Chunky {
                data: wire.clone(),
                pos: 0,
                rng: Rng(seed | 1),
            });
            let got = read_data(&mut fast, limits).await;
            let want = read_data_reference(&mut slow, limits).await;
            let kind = match (&got, &want) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "case {case}");
                    0
                }
                (Err(DataError::BareLineEnding), Err(DataError::BareLineEnding)) => 1,
                (Err(DataError::TooBig), Err(DataError::TooBig)) => 2,
                (Err(DataError::LineTooLong), Err(DataError::LineTooLong)) => 3,
                (Err(DataError::NulByte), Err(DataError::NulByte)) => 4,
                (Err(DataError::Eof), Err(DataError::Eof)) => 5,
                (a, b) => panic!("case {case}: bulk {a:?}, line by line {b:?}"),
            };
            seen[kind] += 1;
            // what is left: the buffered rest plus what the stream still holds
            let rest = |r: LineReader<Chunky>| {
                let (stream, mut left) = r.into_inner();
                left.extend_from_slice(&stream.data[stream.pos..]);
                left
            };
            assert_eq!(rest(fast), rest(slow), "case {case}: unread bytes differ");
        }
        // every outcome came up often enough to mean something
        assert!(seen.iter().all(|&n| n >= 20), "{seen:?}");
    }

    /// Every sequence of up to four tokens from {a, ., CR, LF, NUL, CRLF, "ab" CRLF}, with and
    /// without an end of data after it, under tiny line and size limits and with reads of 1, 3
    /// or any number of bytes: the bulk path and the reference agree on all of them.
    #[tokio::test]
    async fn bulk_reading_matches_line_by_line_on_every_short_input() {
        let tokens: [&[u8]; 7] = [b"a", b".", b"\r", b"\n", b"\0", b"\r\n", b"ab\r\n"];
        let mut inputs: Vec<Vec<u8>> = vec![Vec::new()];
        let mut last: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for prefix in &last {
                for t in tokens {
                    let mut v = prefix.clone();
                    v.extend_from_slice(t);
                    next.push(v);
                }
            }
            inputs.extend(next.iter().cloned());
            last = next;
        }
        let mut runs = 0;
        for body in &inputs {
            for tail in [&b""[..], b".\r\nQ\r\n"] {
                let mut wire = body.clone();
                wire.extend_from_slice(tail);
                for max_line in [2, 3, 4, 1000] {
                    for max_size in [0, 2, 3, 4, 6, 1000] {
                        for read in [1usize, 3, usize::MAX] {
                            let limits = DataLimits { max_size, max_line };
                            let (got, got_rest) = read_sized(&wire, read, limits, true).await;
                            let (want, want_rest) = read_sized(&wire, read, limits, false).await;
                            let same = match (&got, &want) {
                                (Ok(a), Ok(b)) => a == b,
                                (Err(a), Err(b)) => {
                                    std::mem::discriminant(a) == std::mem::discriminant(b)
                                }
                                _ => false,
                            };
                            assert!(
                                same && got_rest == want_rest,
                                "{wire:?} line {max_line} size {max_size} reads {read}: bulk {got:?} {got_rest:?}, line by line {want:?} {want_rest:?}"
                            );
                            runs += 1;
                        }
                    }
                }
            }
        }
        assert!(runs > 200_000, "{runs}");
    }

    /// Reads `wire` in reads of at most `read` bytes with the bulk path or the reference;
    /// returns the outcome and the bytes left unread.
    async fn read_sized(
        wire: &[u8],
        read: usize,
        limits: DataLimits,
        bulk: bool,
    ) -> (Result<Vec<u8>, DataError>, Vec<u8>) {
        let stream = Sized { data: wire, read };
        let mut r = LineReader::new(stream);
        let result = if bulk {
            read_data(&mut r, limits).await
        } else {
            read_data_reference(&mut r, limits).await
        };
        let (stream, mut left) = r.into_inner();
        left.extend_from_slice(stream.data);
        (result, left)
    }

    /// Hands out its bytes at most `read` at a time.
    struct Sized<'a> {
        data: &'a [u8],
        read: usize,
    }

    impl AsyncRead for Sized<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.read.min(buf.remaining()).min(self.data.len());
            let (chunk, rest) = self.data.split_at(n);
            buf.put_slice(chunk);
            self.data = rest;
            Poll::Ready(Ok(()))
        }
    }

    /// A writer that records the bytes and counts write calls.
    #[derive(Default)]
    struct CountingWriter {
        bytes: Vec<u8>,
        writes: usize,
        flushed: bool,
    }

    impl AsyncWrite for CountingWriter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushed = true;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A writer with vectored writes that takes at most `cap` bytes per call.
    struct VectoredWriter {
        cap: usize,
        bytes: Vec<u8>,
        writes: usize,
        flushed: bool,
        /// Address and length of the first slice of the first call.
        first_slice: Option<(usize, usize)>,
        /// Reports this count instead of what was taken.
        claim: Option<usize>,
    }

    impl VectoredWriter {
        fn new(cap: usize) -> VectoredWriter {
            VectoredWriter {
                cap,
                bytes: Vec::new(),
                writes: 0,
                flushed: false,
                first_slice: None,
                claim: None,
            }
        }
    }

    impl AsyncWrite for VectoredWriter {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            if self.first_slice.is_none() {
                self.first_slice = bufs.first().map(|b| (b.as_ptr() as usize, b.len()));
            }
            let mut taken = 0;
            for b in bufs {
                let n = b.len().min(self.cap - taken);
                self.bytes.extend_from_slice(&b[..n]);
                taken += n;
                if taken == self.cap {
                    break;
                }
            }
            Poll::Ready(Ok(self.claim.unwrap_or(taken)))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushed = true;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A reader whose every read fails.
    struct FailingReader;

    impl AsyncRead for FailingReader {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::other("boom")))
        }
    }
}
