//! Strict CRLF line reader over an async byte stream.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::crlf::only_crlf;

/// How many bytes one read from the stream asks for at most (commands; the idle buffer size).
const CHUNK: usize = 8 * 1024;
/// How many bytes one read asks for at most while message data is read (fewer reads per
/// message; the buffer shrinks back to [`CHUNK`] afterwards).
pub(crate) const DATA_CHUNK: usize = 64 * 1024;

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The line exceeded the length limit; the reader has discarded it up to and including its CRLF.
    #[error("line too long")]
    TooLong,
    /// An LF not preceded by CR; the reader has consumed the bytes up to and including that LF.
    #[error("bare LF in line")]
    BareLf,
    /// A CR not followed by LF; the reader has consumed the bytes up to and including that CR.
    #[error("bare CR in line")]
    BareCr,
    /// The peer closed the connection before a complete line arrived.
    #[error("connection closed before the end of the line")]
    Eof,
    /// Reading from the stream failed.
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads CRLF-terminated lines from a stream, rejecting bare CR and bare LF.
///
/// The reader owns its buffer so that a server can see, and drop, bytes the client sent ahead
/// (RFC 3207: plaintext pipelined behind STARTTLS must be discarded).
#[derive(Debug)]
pub struct LineReader<S> {
    stream: S,
    /// Buffered bytes; the unread ones are `buf[pos..]`.
    buf: Vec<u8>,
    pos: usize,
    /// Bytes asked for per read.
    read_chunk: usize,
}

/// Where the first line ending candidate in a buffer is, and what it is.
enum Ending {
    /// A CRLF whose CR is at this offset.
    Crlf(usize),
    /// A bare LF at this offset.
    BareLf(usize),
    /// A CR at this offset followed by something other than LF.
    BareCr(usize),
    /// A CR at this offset that is the last buffered byte (need more input to decide).
    PendingCr(usize),
    /// No CR or LF at all.
    None,
}

/// Finds the first line ending (or line ending error) in `bytes`.
///
/// Uses SIMD `memchr2`: this scan runs over every received byte (a byte-at-a-time search was
/// the largest single cost of receiving a message in the benchmark's profile).
fn find_ending(bytes: &[u8]) -> Ending {
    match memchr::memchr2(b'\r', b'\n', bytes) {
        None => Ending::None,
        Some(i) if bytes.get(i) == Some(&b'\n') => Ending::BareLf(i),
        Some(i) => match bytes.get(i + 1) {
            None => Ending::PendingCr(i),
            Some(b'\n') => Ending::Crlf(i),
            Some(_) => Ending::BareCr(i),
        },
    }
}

impl<S: AsyncRead + Unpin> LineReader<S> {
    /// Wraps a stream with an empty buffer.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(CHUNK),
            pos: 0,
            read_chunk: CHUNK,
        }
    }

    /// Wraps a stream whose first bytes were already read into `buffered`.
    pub fn with_buffered(stream: S, buffered: Vec<u8>) -> Self {
        Self {
            stream,
            buf: buffered,
            pos: 0,
            read_chunk: CHUNK,
        }
    }

    /// Reads one line and returns it without its CRLF.
    ///
    /// `max_len` counts the CRLF (RFC 5321: command lines 512, text lines 1000).
    /// On [`LineError::TooLong`] the rest of the line has been discarded, so the next call
    /// starts at the next line; a bare CR or LF met while discarding is reported instead.
    ///
    /// Cancel-safe (no byte is lost if the future is dropped), except while discarding a
    /// too-long line: a cancelled discard leaves the rest of that line to be read as a line.
    pub async fn read_line(&mut self, max_len: usize) -> Result<Vec<u8>, LineError> {
        if self.read_chunk != CHUNK {
            // a `read_data` that was cancelled left the large reads on
            self.set_data_mode(false);
        }
        let len = self.fill_line(max_len).await?;
        let line = self.line_bytes(len).to_vec();
        self.consume_line(len);
        Ok(line)
    }

    /// Makes sure a complete line of at most `max_len` bytes (CRLF included) is buffered at the
    /// read position and returns its length without the CRLF.
    pub(crate) async fn fill_line(&mut self, max_len: usize) -> Result<usize, LineError> {
        let max_content = max_len.saturating_sub(2);
        let mut scanned = 0;
        loop {
            let unread = self.buf.get(self.pos..).unwrap_or_default();
            let tail = unread.get(scanned..).unwrap_or_default();
            match find_ending(tail) {
                Ending::Crlf(i) => {
                    let len = scanned + i;
                    if len > max_content {
                        self.pos += len + 2;
                        return Err(LineError::TooLong);
                    }
                    return Ok(len);
                }
                Ending::BareLf(i) => {
                    self.pos += scanned + i + 1;
                    return Err(LineError::BareLf);
                }
                Ending::BareCr(i) => {
                    self.pos += scanned + i + 1;
                    return Err(LineError::BareCr);
                }
                Ending::PendingCr(i) => scanned += i,
                Ending::None => scanned += tail.len(),
            }
            if scanned > max_content {
                // The content is already longer than allowed: drop what we hold and skip the
                // rest of the line without keeping it.
                self.pos += scanned;
                self.discard_line().await?;
                return Err(LineError::TooLong);
            }
            self.fill_more().await?;
        }
    }

    /// The first `len` unread bytes (the line found by `fill_line`).
    pub(crate) fn line_bytes(&self, len: usize) -> &[u8] {
        self.buf.get(self.pos..self.pos + len).unwrap_or_default()
    }

    /// Consumes a line of `len` bytes and its CRLF.
    pub(crate) fn consume_line(&mut self, len: usize) {
        self.pos = (self.pos + len + 2).min(self.buf.len());
    }

    /// Discards input up to and including the next CRLF, keeping memory bounded.
    async fn discard_line(&mut self) -> Result<(), LineError> {
        loop {
            let unread = self.buf.get(self.pos..).unwrap_or_default();
            match find_ending(unread) {
                Ending::Crlf(i) => {
                    self.pos += i + 2;
                    return Ok(());
                }
                Ending::BareLf(i) => {
                    self.pos += i + 1;
                    return Err(LineError::BareLf);
                }
                Ending::BareCr(i) => {
                    self.pos += i + 1;
                    return Err(LineError::BareCr);
                }
                // Keep only the CR: its successor decides.
                Ending::PendingCr(i) => self.pos += i,
                Ending::None => self.pos = self.buf.len(),
            }
            self.fill_more().await?;
        }
    }

    /// Reads one more chunk from the stream, compacting the buffer first.
    async fn fill_more(&mut self) -> Result<(), LineError> {
        if self.pos >= self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        // Grow by exactly one read when less than half a read is free, so a kept partial line
        // does not make the buffer double (64 KiB + a line, not 128 KiB, during DATA).
        if self.buf.capacity() - self.buf.len() < self.read_chunk / 2 {
            self.buf.reserve_exact(self.read_chunk);
        }
        let free = self.buf.capacity() - self.buf.len();
        // `read_buf` only appends what was read, so cancelling this future loses nothing.
        let n = (&mut self.stream)
            .take(free.min(self.read_chunk) as u64)
            .read_buf(&mut self.buf)
            .await?;
        if n == 0 {
            return Err(LineError::Eof);
        }
        Ok(())
    }

    /// Switches to large reads for message data (`true`) or back to command-sized reads,
    /// giving the large buffer back.
    pub(crate) fn set_data_mode(&mut self, data: bool) {
        if data {
            self.read_chunk = DATA_CHUNK;
            return;
        }
        self.read_chunk = CHUNK;
        if self.buf.capacity() > 2 * CHUNK {
            // Keep what the client already sent (pipelined commands), but no more room than that.
            self.buf.drain(..self.pos.min(self.buf.len()));
            self.pos = 0;
            self.buf.shrink_to(CHUNK.max(self.buf.len()));
        }
    }

    /// Moves the complete, ordinary lines at the read position to `out` in one copy and
    /// returns how many bytes that was; stops before the first line that needs a closer look.
    ///
    /// A line is taken only if it ends in CRLF, holds no other CR or LF and no NUL, does not
    /// start with `.` (a dot-stuffed line or the end of the data), is at most `max_len` bytes
    /// with its CRLF, and keeps the total taken within `room`. Every other line is left for
    /// [`fill_line`](Self::fill_line), so the result is what reading the taken lines one by
    /// one would have given. Must be called at the start of a line.
    pub(crate) fn take_plain_lines(
        &mut self,
        max_len: usize,
        room: u64,
        out: &mut Vec<u8>,
    ) -> usize {
        let unread = self.buf.get(self.pos..).unwrap_or_default();
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        let taken = plain_prefix_fast(unread, max_len, room)
            .unwrap_or_else(|| plain_prefix(unread, max_len, room));
        out.extend_from_slice(unread.get(..taken).unwrap_or_default());
        self.pos += taken;
        taken
    }

    /// How many received bytes are buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Drops all buffered bytes and returns how many there were (RFC 3207, CVE-2011-0411).
    pub fn discard_buffered(&mut self) -> usize {
        let n = self.buffered();
        self.buf.clear();
        self.pos = 0;
        n
    }

    /// Returns the stream and the buffered bytes not yet returned.
    pub fn into_inner(mut self) -> (S, Vec<u8>) {
        let leftover = self.buf.split_off(self.pos.min(self.buf.len()));
        (self.stream, leftover)
    }

    /// The underlying stream (e.g. to write replies).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The underlying stream, read-only.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

/// The length of the ordinary lines at the start of `unread`, line by line (see
/// [`LineReader::take_plain_lines`]).
fn plain_prefix(unread: &[u8], max_len: usize, room: usize) -> usize {
    let max_content = max_len.saturating_sub(2);
    let mut start = 0;
    let mut hits = memchr::memchr2_iter(b'\r', b'\n', unread);
    while let Some(cr) = hits.next() {
        // An LF first is a bare LF; a CR not followed by LF is a bare CR or not yet known.
        if unread.get(cr) != Some(&b'\r') || unread.get(cr + 1) != Some(&b'\n') {
            break;
        }
        let end = cr + 2;
        if cr - start > max_content || unread.get(start) == Some(&b'.') || end > room {
            break;
        }
        // the LF at cr + 1 is the next hit
        hits.next();
        start = end;
    }
    let mut taken = start;
    if let Some(nul) = memchr::memchr(0, unread.get(..taken).unwrap_or_default()) {
        // stop before the line holding the NUL
        taken =
            memchr::memrchr(b'\n', unread.get(..nul).unwrap_or_default()).map_or(0, |lf| lf + 1);
    }
    taken
}

/// [`plain_prefix`] for the common case, checked over whole runs instead of line by line;
/// `None` when something needs the line-by-line answer.
///
/// Takes every complete line within `room` and before the first line that starts with a dot,
/// if they hold no NUL and no bare CR or LF and none is too long. Too long is ruled out without
/// finding each line: if every aligned window of `max_len / 2` bytes holds an LF, no two LFs
/// are `max_len` or more apart. Line by line, the per-line work (~12 µs for 50 KB of text) was
/// a visible part of receiving a message.
fn plain_prefix_fast(unread: &[u8], max_len: usize, room: usize) -> Option<usize> {
    let window = max_len / 2;
    if window == 0 {
        return None;
    }
    let region = unread.get(..room.min(unread.len()))?;
    let cut = if region.first() == Some(&b'.') {
        0
    } else {
        memchr::memmem::find(region, b"\n.").map_or(region.len(), |lf| lf + 1)
    };
    let before_dot = region.get(..cut)?;
    let end = memchr::memrchr(b'\n', before_dot).map_or(0, |lf| lf + 1);
    let lines = before_dot.get(..end)?;
    // The window check first: on text with long (but allowed) lines it fails within a few
    // windows, so handing over to the line-by-line answer costs little.
    let plain = lines
        .chunks_exact(window)
        .all(|w| memchr::memchr(b'\n', w).is_some())
        && only_crlf(lines)
        && memchr::memchr(0, lines).is_none();
    plain.then_some(end)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Readers that exercise chunk boundaries.

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, ReadBuf};

    /// Returns at most one byte per poll, and is pending every other poll.
    pub(crate) struct Trickle {
        data: Vec<u8>,
        pos: usize,
        pend: bool,
    }

    impl Trickle {
        /// A reader over `data` handing out one byte at a time.
        pub(crate) fn new(data: &[u8]) -> Self {
            Self {
                data: data.to_vec(),
                pos: 0,
                pend: false,
            }
        }

        /// How many bytes were handed out.
        pub(crate) fn consumed(&self) -> usize {
            self.pos
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = &mut *self;
            this.pend = !this.pend;
            if this.pend {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some(&b) = this.data.get(this.pos) {
                buf.put_slice(&[b]);
                this.pos += 1;
            }
            Poll::Ready(Ok(()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::Trickle;
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Message data is read in large chunks, and the buffer goes back to command size after
    /// the message, so an idle session does not keep 64 KiB.
    #[tokio::test]
    async fn data_reads_are_large_and_the_buffer_shrinks_after() {
        let mut wire = Vec::new();
        for _ in 0..4000 {
            wire.extend_from_slice(b"0123456789012345678901234567890123456789\r\n");
        }
        wire.extend_from_slice(b".\r\nQUIT\r\n");
        let (client, mut server) = tokio::io::duplex(256 * 1024);
        server.write_all(&wire).await.unwrap();
        drop(server);
        let mut r = LineReader::new(client);
        let message = crate::data::read_data(&mut r, crate::DataLimits::default())
            .await
            .unwrap();
        assert_eq!(message.len(), 4000 * 42);
        assert!(
            r.buf.capacity() <= 2 * CHUNK,
            "{} bytes kept",
            r.buf.capacity()
        );
        assert_eq!(r.read_chunk, CHUNK);
        assert_eq!(r.read_line(512).await.unwrap(), b"QUIT");

        // commands pipelined behind a big message stay buffered, with no spare room kept
        let mut wire = Vec::new();
        for _ in 0..300 {
            wire.extend_from_slice(&[b'x'; 998]);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b".\r\n");
        for _ in 0..3000 {
            wire.extend_from_slice(b"NOOP\r\n");
        }
        let (client, mut server) = tokio::io::duplex(1024 * 1024);
        server.write_all(&wire).await.unwrap();
        drop(server);
        let mut r = LineReader::new(client);
        crate::data::read_data(&mut r, crate::DataLimits::default())
            .await
            .unwrap();
        assert!(
            r.buf.capacity() <= (2 * CHUNK).max(r.buf.len()),
            "{} bytes kept for {} buffered",
            r.buf.capacity(),
            r.buffered()
        );
        for _ in 0..3000 {
            assert_eq!(r.read_line(512).await.unwrap(), b"NOOP");
        }
    }

    /// A `read_data` dropped half-way (a timeout around it) does not leave the large reads on:
    /// the next command read turns them off and gives the buffer back.
    #[tokio::test]
    async fn cancelled_data_read_goes_back_to_command_reads() {
        let (client, mut server) = tokio::io::duplex(256 * 1024);
        let mut half = Vec::new();
        for _ in 0..2000 {
            half.extend_from_slice(b"0123456789012345678901234567890123456789\r\n");
        }
        server.write_all(&half).await.unwrap();
        let mut r = LineReader::new(client);
        let read = crate::data::read_data(&mut r, crate::DataLimits::default());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), read)
                .await
                .is_err(),
            "the message is not complete, the read must still be waiting"
        );
        assert_eq!(r.read_chunk, DATA_CHUNK);
        server.write_all(b"NOOP\r\n").await.unwrap();
        assert_eq!(r.read_line(512).await.unwrap(), b"NOOP");
        assert_eq!(r.read_chunk, CHUNK);
        assert!(r.buf.capacity() <= 2 * CHUNK, "{}", r.buf.capacity());
    }

    #[tokio::test]
    async fn take_plain_lines_stops_where_a_line_needs_checking() {
        for (input, taken) in [
            (&b"ab\r\ncd\r\n..x\r\n"[..], 8),
            (b"ab\r\n.\r\n", 4),
            (b"ab\r\nc\0d\r\nef\r\n", 4),
            (b"ab\r\nc\rd\r\n", 4),
            (b"ab\r\ncd\nef\r\n", 4),
            (b"ab\r\n0123456789\r\n", 4),
            (b"ab\r\ncd", 4),
            (b"ab\r\ncd\r", 4),
            (b"\r\n\r\nab\r\n", 8),
        ] {
            let mut r = LineReader::with_buffered(&b""[..], input.to_vec());
            let mut out = Vec::new();
            let n = r.take_plain_lines(10, u64::MAX, &mut out);
            assert_eq!((n, out.len()), (taken, taken), "{input:?}");
            assert_eq!(&out[..], &input[..taken]);
            assert_eq!(r.buffered(), input.len() - taken);
        }
        // the size budget: a line that would pass it is left for the checks
        let mut r = LineReader::with_buffered(&b""[..], b"ab\r\ncd\r\n".to_vec());
        let mut out = Vec::new();
        assert_eq!(r.take_plain_lines(1000, 7, &mut out), 4);
    }

    /// Every short string over a small alphabet, under small limits and every room, plus long
    /// random text: wherever the run-based check answers, it gives the line-by-line answer.
    #[test]
    fn the_fast_plain_prefix_agrees_with_the_line_by_line_one() {
        let alphabet = [b'\r', b'\n', b'.', b'a', 0];
        for len in 0..=7u32 {
            for n in 0..5usize.pow(len) {
                let mut k = n;
                let s: Vec<u8> = (0..len)
                    .map(|_| {
                        let b = alphabet[k % 5];
                        k /= 5;
                        b
                    })
                    .collect();
                for max_len in 0..6 {
                    for room in 0..=s.len() + 1 {
                        if let Some(fast) = plain_prefix_fast(&s, max_len, room) {
                            assert_eq!(
                                fast,
                                plain_prefix(&s, max_len, room),
                                "{s:?} {max_len} {room}"
                            );
                        }
                    }
                }
            }
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n) as usize
        };
        let mut answered = 0;
        for _ in 0..3000 {
            let mut s = Vec::new();
            for _ in 0..next(300) {
                let len = if next(500) == 0 { next(300) } else { next(40) };
                s.extend(std::iter::repeat_n(b'x', len));
                s.extend_from_slice(b"\r\n");
            }
            for _ in 0..next(3) {
                let at = next(s.len() as u64 + 1);
                s.insert(at, alphabet[next(5)]);
            }
            let max_len = [8, 100, 1000, 1000][next(4)];
            let room = if next(2) == 0 {
                usize::MAX
            } else {
                next(s.len() as u64 + 2)
            };
            if let Some(fast) = plain_prefix_fast(&s, max_len, room) {
                answered += 1;
                assert_eq!(fast, plain_prefix(&s, max_len, room), "{max_len} {room}");
            }
        }
        assert!(
            answered > 1000,
            "the run-based check answered only {answered} of 3000"
        );
    }

    /// A line of `max_len` and of `max_len + 1` bytes at every offset against the windows: the
    /// run-based check may only take the first.
    #[test]
    fn a_line_just_too_long_is_never_taken_whatever_its_offset() {
        for max_len in 1..=40 {
            for offset in 0..=2 * max_len {
                // short lines ("\r\n", and one "a\r\n" for an odd offset) up to the offset
                let mut s = if offset % 2 == 1 {
                    b"a\r\n".to_vec()
                } else {
                    Vec::new()
                };
                while s.len() + 2 <= offset {
                    s.extend_from_slice(b"\r\n");
                }
                for len in [max_len, max_len + 1] {
                    let mut t = s.clone();
                    t.extend(std::iter::repeat_n(b'z', len.saturating_sub(2)));
                    t.extend_from_slice(&b"\r\n"[2usize.saturating_sub(len)..]);
                    t.extend_from_slice(b"\r\n");
                    if let Some(fast) = plain_prefix_fast(&t, max_len, usize::MAX) {
                        assert_eq!(
                            fast,
                            plain_prefix(&t, max_len, usize::MAX),
                            "{t:?} {max_len}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn ordinary_text_is_taken_without_the_line_by_line_check() {
        let text = b"Subject: x\r\n\r\nline one\r\nline two\r\n\r\nend\r\n.\r\n";
        let lines = text.len() - 3;
        assert_eq!(plain_prefix_fast(text, 1000, usize::MAX), Some(lines));
        assert_eq!(
            plain_prefix_fast(text, 1000, 12),
            Some(12),
            "only whole lines within room"
        );
        assert_eq!(
            plain_prefix_fast(b"ab\r\n..x\r\n", 1000, usize::MAX),
            Some(4)
        );
        // a line of max_len / 2 bytes is taken; one of max_len + 1 is left to the line-by-line check
        let long = |n: usize| [vec![b'y'; n - 2], b"\r\n".to_vec()].concat();
        assert_eq!(plain_prefix_fast(&long(50), 100, usize::MAX), Some(50));
        assert_eq!(plain_prefix_fast(&long(101), 100, usize::MAX), None);
        assert_eq!(plain_prefix(&long(101), 100, usize::MAX), 0);
    }

    #[tokio::test]
    async fn reads_lines_without_crlf() {
        let mut r = LineReader::new(&b"EHLO a\r\nQUIT\r\n\r\n"[..]);
        assert_eq!(r.read_line(512).await.unwrap(), b"EHLO a");
        assert_eq!(r.read_line(512).await.unwrap(), b"QUIT");
        assert_eq!(r.read_line(512).await.unwrap(), b"");
        assert!(matches!(r.read_line(512).await, Err(LineError::Eof)));
    }

    #[tokio::test]
    async fn bare_lf_is_an_error_and_consumed() {
        let mut r = LineReader::new(&b"NOOP\nQUIT\r\n"[..]);
        assert!(matches!(r.read_line(512).await, Err(LineError::BareLf)));
        assert_eq!(r.read_line(512).await.unwrap(), b"QUIT");
    }

    #[tokio::test]
    async fn bare_cr_is_an_error_and_consumed() {
        let mut r = LineReader::new(&b"NO\rOP\r\nQUIT\r\n"[..]);
        assert!(matches!(r.read_line(512).await, Err(LineError::BareCr)));
        assert_eq!(r.read_line(512).await.unwrap(), b"OP");
        assert_eq!(r.read_line(512).await.unwrap(), b"QUIT");
    }

    #[tokio::test]
    async fn cr_at_eof_is_eof_not_a_line() {
        let mut r = LineReader::new(&b"QUIT\r"[..]);
        assert!(matches!(r.read_line(512).await, Err(LineError::Eof)));
        let mut r = LineReader::new(&b"QUIT"[..]);
        assert!(matches!(r.read_line(512).await, Err(LineError::Eof)));
    }

    #[tokio::test]
    async fn limit_counts_the_crlf() {
        let mut r = LineReader::new(&b"12345678\r\n123456789\r\nok\r\n"[..]);
        assert_eq!(r.read_line(10).await.unwrap(), b"12345678");
        assert!(matches!(r.read_line(10).await, Err(LineError::TooLong)));
        assert_eq!(r.read_line(10).await.unwrap(), b"ok");
    }

    #[tokio::test]
    async fn too_long_line_resyncs_to_next_line() {
        // Longer than one chunk, so the discard has to read more from the stream.
        let mut input = vec![b'x'; 3 * CHUNK + 17];
        input.extend_from_slice(b"\r\nNOOP\r\n");
        let mut r = LineReader::new(&input[..]);
        assert!(matches!(r.read_line(512).await, Err(LineError::TooLong)));
        assert_eq!(r.read_line(512).await.unwrap(), b"NOOP");
        // Memory stayed bounded while discarding.
        assert!(r.buf.capacity() <= 4 * CHUNK, "{}", r.buf.capacity());
    }

    #[tokio::test]
    async fn too_long_line_with_bare_lf_reports_bare_lf() {
        let mut input = vec![b'x'; 600];
        input.extend_from_slice(b"\nNOOP\r\n");
        let mut r = LineReader::new(&input[..]);
        assert!(matches!(r.read_line(512).await, Err(LineError::BareLf)));
        assert_eq!(r.read_line(512).await.unwrap(), b"NOOP");
    }

    #[tokio::test]
    async fn too_long_line_one_byte_at_a_time_with_split_crlf() {
        let mut input = vec![b'y'; 700];
        input.extend_from_slice(b"\r\nRSET\r\n");
        let mut r = LineReader::new(Trickle::new(&input));
        assert!(matches!(r.read_line(512).await, Err(LineError::TooLong)));
        assert_eq!(r.read_line(512).await.unwrap(), b"RSET");
    }

    #[tokio::test]
    async fn one_byte_per_poll_handles_split_crlf() {
        let input = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nbad\rX\r\nend\n";
        let mut r = LineReader::new(Trickle::new(input));
        assert_eq!(r.read_line(512).await.unwrap(), b"MAIL FROM:<a@b.c>");
        assert_eq!(r.read_line(512).await.unwrap(), b"RCPT TO:<d@e.f>");
        assert!(matches!(r.read_line(512).await, Err(LineError::BareCr)));
        assert_eq!(r.read_line(512).await.unwrap(), b"X");
        assert!(matches!(r.read_line(512).await, Err(LineError::BareLf)));
        assert!(matches!(r.read_line(512).await, Err(LineError::Eof)));
    }

    #[tokio::test]
    async fn reads_in_chunks_not_bytes() {
        // All pipelined commands arrive in one read and stay buffered.
        let mut r =
            LineReader::new(&b"STARTTLS\r\nMAIL FROM:<evil@x.y>\r\nRCPT TO:<a@b.c>\r\n"[..]);
        assert_eq!(r.read_line(512).await.unwrap(), b"STARTTLS");
        assert_eq!(r.buffered(), 39);
    }

    #[tokio::test]
    async fn starttls_discards_pipelined_plaintext() {
        let (mut client, server) = tokio::io::duplex(4096);
        client
            .write_all(b"STARTTLS\r\nMAIL FROM:<evil@x.y>\r\n")
            .await
            .unwrap();
        let mut r = LineReader::new(server);
        assert_eq!(r.read_line(512).await.unwrap(), b"STARTTLS");
        assert_eq!(r.buffered(), 22);
        assert_eq!(r.discard_buffered(), 22);
        assert_eq!(r.buffered(), 0);
        let (stream, leftover) = r.into_inner();
        assert!(leftover.is_empty());
        // Only bytes sent after the discard are seen by a new reader on the same stream.
        client.write_all(b"EHLO again\r\n").await.unwrap();
        let mut r = LineReader::new(stream);
        assert_eq!(r.read_line(512).await.unwrap(), b"EHLO again");
    }

    #[tokio::test]
    async fn into_inner_returns_leftover_bytes() {
        let mut r = LineReader::new(&b"220 hi\r\nrest"[..]);
        assert_eq!(r.read_line(512).await.unwrap(), b"220 hi");
        let (_, leftover) = r.into_inner();
        assert_eq!(leftover, b"rest");
    }

    #[tokio::test]
    async fn with_buffered_reads_given_bytes_first() {
        let mut r = LineReader::with_buffered(&b"B\r\n"[..], b"A\r\n".to_vec());
        assert_eq!(r.read_line(512).await.unwrap(), b"A");
        assert_eq!(r.read_line(512).await.unwrap(), b"B");
    }

    #[tokio::test]
    async fn io_error_is_reported() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let mut r = LineReader::new(server);
        assert!(matches!(r.read_line(512).await, Err(LineError::Eof)));
        let mut r = LineReader::new(tokio_test_err::Failing);
        assert!(matches!(r.read_line(512).await, Err(LineError::Io(_))));
    }

    mod tokio_test_err {
        use std::pin::Pin;
        use std::task::{Context, Poll};
        use tokio::io::{AsyncRead, ReadBuf};

        /// A reader whose every read fails.
        pub(super) struct Failing;

        impl AsyncRead for Failing {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                Poll::Ready(Err(std::io::Error::other("boom")))
            }
        }
    }
}
