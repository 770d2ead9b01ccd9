//! xtext encoding of DSN parameter values (RFC 3461 §4).

/// Why an xtext value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XtextError {
    /// A `+` not followed by two hexadecimal digits.
    #[error("bad hexchar in xtext")]
    BadHexchar,
    /// A byte outside `!`..`~` or an `=`.
    #[error("invalid character in xtext")]
    BadChar,
    /// The decoded value is not valid UTF-8.
    #[error("xtext decodes to invalid UTF-8")]
    InvalidUtf8,
}

/// Encodes a value as xtext: `+`, `=`, controls, space and non-ASCII bytes become `+XX`.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push('+');
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0x0f));
        }
    }
    out
}

/// An upper-case hexadecimal digit for a nibble.
fn hex_digit(nibble: u8) -> char {
    char::from(
        b"0123456789ABCDEF"
            .get(usize::from(nibble))
            .copied()
            .unwrap_or(b'0'),
    )
}

/// The value of a hexadecimal digit (upper case per the RFC; lower case tolerated).
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Decodes an xtext value.
pub fn decode(text: &[u8]) -> Result<String, XtextError> {
    let mut out = Vec::with_capacity(text.len());
    let mut iter = text.iter().copied();
    while let Some(b) = iter.next() {
        match b {
            b'+' => {
                let hi = iter
                    .next()
                    .and_then(hex_value)
                    .ok_or(XtextError::BadHexchar)?;
                let lo = iter
                    .next()
                    .and_then(hex_value)
                    .ok_or(XtextError::BadHexchar)?;
                out.push(hi << 4 | lo);
            }
            b'=' => return Err(XtextError::BadChar),
            33..=126 => out.push(b),
            _ => return Err(XtextError::BadChar),
        }
    }
    String::from_utf8(out).map_err(|_| XtextError::InvalidUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for v in ["plain", "a+b=c d", "rfc822;user@example.com", "", "ünï"] {
            assert_eq!(decode(encode(v).as_bytes()).unwrap(), v);
        }
        assert_eq!(encode("a+b=c d"), "a+2Bb+3Dc+20d");
    }

    #[test]
    fn decode_errors() {
        assert_eq!(decode(b"a+2"), Err(XtextError::BadHexchar));
        assert_eq!(decode(b"a+ZZ"), Err(XtextError::BadHexchar));
        assert_eq!(decode(b"a=b"), Err(XtextError::BadChar));
        assert_eq!(decode(b"a b"), Err(XtextError::BadChar));
        assert_eq!(decode(b"+FF"), Err(XtextError::InvalidUtf8));
        assert_eq!(decode(b"+2b").unwrap(), "+");
    }
}
