//! What a server advertises in its EHLO reply (client side).

use crate::reply::Reply;

/// The extensions a server announced in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EhloInfo {
    /// The server's name from the first reply line.
    pub domain: String,
    /// `STARTTLS` (RFC 3207).
    pub starttls: bool,
    /// `PIPELINING` (RFC 2920).
    pub pipelining: bool,
    /// `SIZE [n]` (RFC 1870): `None` if not announced, `Some(0)` if announced without a limit.
    pub size: Option<u64>,
    /// `8BITMIME` (RFC 6152).
    pub eight_bit_mime: bool,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `DSN` (RFC 3461).
    pub dsn: bool,
    /// `ENHANCEDSTATUSCODES` (RFC 2034).
    pub enhanced_status_codes: bool,
    /// `REQUIRETLS` (RFC 8689).
    pub requiretls: bool,
    /// `CHUNKING` (RFC 3030).
    pub chunking: bool,
    /// SASL mechanisms from `AUTH` (and the old `AUTH=` form), upper case, no duplicates.
    pub auth: Vec<String>,
}

impl EhloInfo {
    /// Reads the extensions from a 250 EHLO reply (the first line is the greeting).
    pub fn from_reply(reply: &Reply) -> Self {
        let mut info = EhloInfo::default();
        let mut lines = reply.lines.iter();
        if let Some(first) = lines.next() {
            info.domain = first
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
        for line in lines {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            // The pre-RFC 4954 form `AUTH=LOGIN PLAIN`.
            if let Some(first_mech) = keyword.strip_prefix("AUTH=") {
                info.add_mechanisms(std::iter::once(first_mech).chain(words));
                continue;
            }
            match keyword.as_str() {
                "STARTTLS" => info.starttls = true,
                "PIPELINING" => info.pipelining = true,
                "SIZE" => {
                    let limit = words.next().and_then(|n| n.parse::<u64>().ok());
                    info.size = Some(limit.unwrap_or(0));
                }
                "8BITMIME" => info.eight_bit_mime = true,
                "SMTPUTF8" => info.smtputf8 = true,
                "DSN" => info.dsn = true,
                "ENHANCEDSTATUSCODES" => info.enhanced_status_codes = true,
                "REQUIRETLS" => info.requiretls = true,
                "CHUNKING" => info.chunking = true,
                "AUTH" => info.add_mechanisms(words),
                _ => {}
            }
        }
        info
    }

    /// Adds SASL mechanism names, upper-cased and without duplicates.
    fn add_mechanisms<'a>(&mut self, names: impl Iterator<Item = &'a str>) {
        for name in names {
            let name = name.to_ascii_uppercase();
            if !name.is_empty() && !self.auth.contains(&name) {
                self.auth.push(name);
            }
        }
    }

    /// Whether the server offers the SASL mechanism `name` (case-insensitive).
    pub fn has_auth(&self, name: &str) -> bool {
        self.auth.iter().any(|m| m.eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::LineReader;
    use crate::reply::read_reply;

    #[tokio::test]
    async fn parses_a_full_ehlo_reply() {
        let wire = b"250-mx.example.net Hello [192.0.2.1]\r\n\
            250-PIPELINING\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n250-STARTTLS\r\n\
            250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250-SMTPUTF8\r\n250-REQUIRETLS\r\n\
            250-CHUNKING\r\n250-AUTH PLAIN login\r\n250 AUTH=LOGIN XOAUTH2\r\n";
        let reply = read_reply(&mut LineReader::new(&wire[..])).await.unwrap();
        let info = EhloInfo::from_reply(&reply);
        assert_eq!(
            info,
            EhloInfo {
                domain: "mx.example.net".into(),
                starttls: true,
                pipelining: true,
                size: Some(35_882_577),
                eight_bit_mime: true,
                smtputf8: true,
                dsn: true,
                enhanced_status_codes: true,
                requiretls: true,
                chunking: true,
                auth: vec!["PLAIN".into(), "LOGIN".into(), "XOAUTH2".into()],
            }
        );
        assert!(info.has_auth("plain"));
        assert!(!info.has_auth("CRAM-MD5"));
    }

    #[test]
    fn minimal_reply_and_size_without_limit() {
        let info = EhloInfo::from_reply(&Reply::new(250, None, "mx.example"));
        assert_eq!(info.domain, "mx.example");
        assert!(!info.starttls && info.size.is_none() && info.auth.is_empty());
        let info = EhloInfo::from_reply(&Reply::new(250, None, "mx\nsize\nstarttls"));
        assert_eq!(info.size, Some(0));
        assert!(info.starttls);
        // Keywords only count on their own line, not in the greeting.
        let info = EhloInfo::from_reply(&Reply::new(250, None, "STARTTLS"));
        assert!(!info.starttls);
    }
}
