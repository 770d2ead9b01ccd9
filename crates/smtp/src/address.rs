//! Mailbox and path grammar of RFC 5321 §4.1.2 (with RFC 6531 UTF-8 when allowed).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest local part in octets (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_LEN: usize = 64;
/// Longest domain in octets (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN_LEN: usize = 255;
/// Longest path in octets, angle brackets included (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH_LEN: usize = 256;
/// Longest domain label in octets.
const MAX_LABEL_LEN: usize = 63;

/// Why an address or path is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The text does not follow the path grammar; the payload names the broken part.
    #[error("address syntax error: {0}")]
    Syntax(&'static str),
    /// The local part is longer than 64 octets.
    #[error("local part longer than 64 octets")]
    LocalTooLong,
    /// The domain is longer than 255 octets.
    #[error("domain longer than 255 octets")]
    DomainTooLong,
    /// The path is longer than 256 octets.
    #[error("path longer than 256 octets")]
    PathTooLong,
    /// Non-ASCII characters while SMTPUTF8 was not requested.
    #[error("non-ASCII address without SMTPUTF8")]
    NonAscii,
    /// Non-ASCII bytes that are not valid UTF-8.
    #[error("address is not valid UTF-8")]
    InvalidUtf8,
}

/// An address `local@domain` as written on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// The local part exactly as written (a quoted string keeps its quotes and escapes).
    pub local: String,
    /// The domain or address literal (`[192.0.2.1]`, `[IPv6:...]`) as written.
    pub domain: String,
}

impl Mailbox {
    /// The domain in ASCII lower case (for grouping recipients by domain and policy lookups).
    pub fn domain_lowercase(&self) -> String {
        self.domain.to_ascii_lowercase()
    }

    /// Whether the mailbox contains non-ASCII characters (needs SMTPUTF8 to be sent).
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// Parses a bare `local@domain` (no angle brackets), e.g. from configuration.
    pub fn parse(text: &str, allow_utf8: bool) -> Result<Self, AddressError> {
        let mut p = Parser::new(text.as_bytes(), allow_utf8);
        let mailbox = p.mailbox()?;
        if p.rest().is_empty() {
            Ok(mailbox)
        } else {
            Err(AddressError::Syntax(
                "trailing characters after the address",
            ))
        }
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The reverse path of `MAIL FROM`: the null sender `<>` or a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>`: bounces and other notifications.
    Null,
    /// A sender mailbox.
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    /// Formats as it appears between the angle brackets (empty for the null path).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(m) => m.fmt(f),
        }
    }
}

/// Returns the length of the `<...>` path at the start of `bytes` (quotes respected), or `None`
/// when there is no closing bracket.
pub(crate) fn path_extent(bytes: &[u8]) -> Option<usize> {
    if bytes.first() != Some(&b'<') {
        return None;
    }
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == b'>' && !quoted {
            return Some(i + 1);
        }
    }
    None
}

/// Parses a complete `<...>` path; `<>` gives `None`. A source route is accepted and dropped.
pub(crate) fn parse_path(bytes: &[u8], allow_utf8: bool) -> Result<Option<Mailbox>, AddressError> {
    if bytes.len() > MAX_PATH_LEN {
        return Err(AddressError::PathTooLong);
    }
    if !bytes.is_ascii() {
        if !allow_utf8 {
            return Err(AddressError::NonAscii);
        }
        if std::str::from_utf8(bytes).is_err() {
            return Err(AddressError::InvalidUtf8);
        }
    }
    let inner = bytes
        .strip_prefix(b"<")
        .and_then(|b| b.strip_suffix(b">"))
        .ok_or(AddressError::Syntax("path must be enclosed in <>"))?;
    if inner.is_empty() {
        return Ok(None);
    }
    let mut p = Parser::new(inner, allow_utf8);
    if p.peek() == Some(b'@') {
        p.source_route()?;
    }
    let mailbox = p.mailbox()?;
    if !p.rest().is_empty() {
        return Err(AddressError::Syntax(
            "unexpected characters after the address",
        ));
    }
    Ok(Some(mailbox))
}

/// A cursor over address bytes.
struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    allow_utf8: bool,
}

/// `atext` of RFC 5322 (ASCII part).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8], allow_utf8: bool) -> Self {
        Self {
            bytes,
            pos: 0,
            allow_utf8,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    /// Consumes `b` if it is next.
    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// The bytes from `start` to the cursor as a string.
    fn text_from(&self, start: usize) -> Result<String, AddressError> {
        let bytes = self.bytes.get(start..self.pos).unwrap_or_default();
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| AddressError::InvalidUtf8)
    }

    /// A-d-l ":" — `@a,@b:`; the route is checked and dropped.
    fn source_route(&mut self) -> Result<(), AddressError> {
        loop {
            if !self.eat(b'@') {
                return Err(AddressError::Syntax("bad source route"));
            }
            self.domain()?;
            if self.eat(b':') {
                return Ok(());
            }
            if !self.eat(b',') {
                return Err(AddressError::Syntax("bad source route"));
            }
        }
    }

    /// Mailbox = Local-part "@" ( Domain / address-literal ).
    fn mailbox(&mut self) -> Result<Mailbox, AddressError> {
        let start = self.pos;
        if self.peek() == Some(b'"') {
            self.quoted_string()?;
        } else {
            self.dot_string()?;
        }
        if self.pos - start > MAX_LOCAL_LEN {
            return Err(AddressError::LocalTooLong);
        }
        let local = self.text_from(start)?;
        if !self.eat(b'@') {
            return Err(AddressError::Syntax("missing @domain"));
        }
        let start = self.pos;
        if self.peek() == Some(b'[') {
            self.address_literal()?;
        } else {
            self.domain()?;
        }
        let domain = self.text_from(start)?;
        Ok(Mailbox { local, domain })
    }

    /// Dot-string = Atom *("." Atom).
    fn dot_string(&mut self) -> Result<(), AddressError> {
        loop {
            let start = self.pos;
            while let Some(b) = self.peek() {
                if is_atext(b) || (b >= 0x80 && self.allow_utf8) {
                    self.pos += 1;
                } else {
                    break;
                }
            }
            if self.pos == start {
                return Err(AddressError::Syntax("bad local part"));
            }
            if !self.eat(b'.') {
                return Ok(());
            }
        }
    }

    /// Quoted-string = DQUOTE *QcontentSMTP DQUOTE.
    fn quoted_string(&mut self) -> Result<(), AddressError> {
        self.eat(b'"');
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(32..=126) => self.pos += 1,
                        _ => return Err(AddressError::Syntax("bad quoted pair")),
                    }
                }
                Some(32..=126) => self.pos += 1,
                Some(0x80..) if self.allow_utf8 => self.pos += 1,
                _ => return Err(AddressError::Syntax("bad quoted local part")),
            }
        }
    }

    /// Domain = sub-domain *("." sub-domain), each Let-dig [Ldh-str] (U-labels if UTF-8).
    fn domain(&mut self) -> Result<(), AddressError> {
        let start = self.pos;
        loop {
            let label = self.pos;
            while let Some(b) = self.peek() {
                if b.is_ascii_alphanumeric() || b == b'-' || (b >= 0x80 && self.allow_utf8) {
                    self.pos += 1;
                } else {
                    break;
                }
            }
            let text = self.bytes.get(label..self.pos).unwrap_or_default();
            if text.is_empty() {
                return Err(AddressError::Syntax("empty domain label"));
            }
            if text.first() == Some(&b'-') || text.last() == Some(&b'-') {
                return Err(AddressError::Syntax("domain label starts or ends with '-'"));
            }
            if text.len() > MAX_LABEL_LEN {
                return Err(AddressError::Syntax("domain label longer than 63 octets"));
            }
            if !self.eat(b'.') {
                break;
            }
        }
        if self.pos - start > MAX_DOMAIN_LEN {
            return Err(AddressError::DomainTooLong);
        }
        Ok(())
    }

    /// address-literal = "[" ( IPv4-address-literal / "IPv6:" IPv6-addr ) "]".
    fn address_literal(&mut self) -> Result<(), AddressError> {
        self.eat(b'[');
        let start = self.pos;
        while let Some(b) = self.peek() {
            if b == b']' {
                break;
            }
            self.pos += 1;
        }
        let inner = self.bytes.get(start..self.pos).unwrap_or_default();
        if !self.eat(b']') {
            return Err(AddressError::Syntax("unterminated address literal"));
        }
        let inner =
            std::str::from_utf8(inner).map_err(|_| AddressError::Syntax("bad address literal"))?;
        let valid = match inner.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner
                .get(5..)
                .is_some_and(|v6| v6.parse::<Ipv6Addr>().is_ok()),
            _ => inner.parse::<Ipv4Addr>().is_ok(),
        };
        if valid {
            Ok(())
        } else {
            Err(AddressError::Syntax("bad address literal"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> Result<Option<Mailbox>, AddressError> {
        parse_path(s.as_bytes(), false)
    }

    fn mb(local: &str, domain: &str) -> Result<Option<Mailbox>, AddressError> {
        Ok(Some(Mailbox {
            local: local.into(),
            domain: domain.into(),
        }))
    }

    #[test]
    fn plain_and_null_paths() {
        assert_eq!(path("<>"), Ok(None));
        assert_eq!(
            path("<john.doe+tag@Example.COM>"),
            mb("john.doe+tag", "Example.COM")
        );
        let m = path("<a@Example.COM>").unwrap().unwrap();
        assert_eq!(m.domain_lowercase(), "example.com");
        assert_eq!(m.to_string(), "a@Example.COM");
    }

    #[test]
    fn quoted_local_part_is_kept_verbatim() {
        assert_eq!(
            path(r#"<"john doe>\"x"@example.com>"#),
            mb(r#""john doe>\"x""#, "example.com")
        );
        assert_eq!(path_extent(br#"<"a>b"@c.d> SIZE=1"#), Some(11));
        assert!(path(r#"<"unterminated@example.com>"#).is_err());
    }

    #[test]
    fn source_route_is_dropped() {
        assert_eq!(
            path("<@a.example,@b.example:user@c.example>"),
            mb("user", "c.example")
        );
        assert!(path("<@a.example user@c.example>").is_err());
        assert!(path("<@:user@c.example>").is_err());
    }

    #[test]
    fn address_literals() {
        assert_eq!(
            path("<postmaster@[192.0.2.1]>"),
            mb("postmaster", "[192.0.2.1]")
        );
        assert_eq!(
            path("<a@[IPv6:2001:db8::1]>"),
            mb("a", "[IPv6:2001:db8::1]")
        );
        for bad in [
            "<a@[300.1.1.1]>",
            "<a@[IPv6:zz::1]>",
            "<a@[tag:foo]>",
            "<a@[1.2.3.4>",
        ] {
            assert!(path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "a@b.c",
            "<a@b.c",
            "<a>",
            "<@b.c>",
            "<a@>",
            "<a..b@c.d>",
            "<.a@c.d>",
            "<a.@c.d>",
            "<a@-b.c>",
            "<a@b-.c>",
            "<a@b..c>",
            "<a@b.c.>",
            "<a b@c.d>",
            "<a@b.c >",
            "<a@b_c.d>",
            "<a@b.c>x",
        ] {
            assert!(matches!(path(bad), Err(AddressError::Syntax(_))), "{bad}");
        }
    }

    #[test]
    fn length_limits() {
        let local64 = "l".repeat(64);
        assert!(path(&format!("<{local64}@b.c>")).is_ok());
        assert_eq!(
            path(&format!("<{local64}l@b.c>")),
            Err(AddressError::LocalTooLong)
        );
        let label = "d".repeat(63);
        assert!(path(&format!("<a@{label}.c>")).is_ok());
        assert!(matches!(
            path(&format!("<a@{label}d.c>")),
            Err(AddressError::Syntax(_))
        ));
        // 4 labels of 63 + 3 dots = 255: fine as a domain; the path is 4 + 255 = 259 though.
        let domain255 = [label.as_str(); 4].join(".");
        assert_eq!(domain255.len(), 255);
        assert_eq!(
            path(&format!("<a@{domain255}>")),
            Err(AddressError::PathTooLong)
        );
        assert!(Mailbox::parse(&format!("a@{domain255}"), false).is_ok());
        assert_eq!(
            Mailbox::parse(&format!("a@{domain255}.b"), false),
            Err(AddressError::DomainTooLong)
        );
        // Exactly 256 octets with the brackets is allowed.
        let domain = format!("{}.{}.{}.{}", label, label, label, "d".repeat(59));
        let p = format!("<ab@{domain}>");
        assert_eq!(p.len(), 256);
        assert!(path(&p).is_ok());
    }

    #[test]
    fn utf8_only_when_allowed() {
        let p = "<jörg@bücher.example>";
        assert_eq!(parse_path(p.as_bytes(), false), Err(AddressError::NonAscii));
        assert_eq!(parse_path(p.as_bytes(), true), mb("jörg", "bücher.example"));
        assert_eq!(
            parse_path(b"<j\xff@b.example>", true),
            Err(AddressError::InvalidUtf8)
        );
        let m = Mailbox::parse("jörg@b.example", true).unwrap();
        assert!(!m.is_ascii());
    }
}
