//! Enhanced mail system status codes (RFC 3463), as sent after the reply code (RFC 2034).

use std::fmt;

/// An enhanced status code `class.subject.detail`, e.g. `5.7.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedStatus {
    /// Class: 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
    pub class: u8,
    /// Subject (0 to 999).
    pub subject: u16,
    /// Detail (0 to 999).
    pub detail: u16,
}

impl EnhancedStatus {
    /// Builds a status code from its three parts.
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Self {
            class,
            subject,
            detail,
        }
    }

    /// 2.0.0: other or undefined success.
    pub const OK: Self = Self::new(2, 0, 0);
    /// 2.1.0: sender address accepted.
    pub const SENDER_OK: Self = Self::new(2, 1, 0);
    /// 2.1.5: destination address valid.
    pub const RECIPIENT_OK: Self = Self::new(2, 1, 5);
    /// 2.6.0: message accepted.
    pub const MESSAGE_ACCEPTED: Self = Self::new(2, 6, 0);
    /// 2.7.0: security status ok (e.g. authentication succeeded).
    pub const SECURITY_OK: Self = Self::new(2, 7, 0);
    /// 4.3.0: other or undefined mail system status (temporary).
    pub const TEMP_SYSTEM: Self = Self::new(4, 3, 0);
    /// 4.4.2: bad connection.
    pub const BAD_CONNECTION: Self = Self::new(4, 4, 2);
    /// 4.5.3: too many recipients.
    pub const TOO_MANY_RECIPIENTS: Self = Self::new(4, 5, 3);
    /// 4.7.0: other security status (temporary), e.g. throttling.
    pub const TEMP_SECURITY: Self = Self::new(4, 7, 0);
    /// 5.1.1: bad destination mailbox address.
    pub const BAD_MAILBOX: Self = Self::new(5, 1, 1);
    /// 5.1.3: bad destination mailbox address syntax.
    pub const BAD_RCPT_SYNTAX: Self = Self::new(5, 1, 3);
    /// 5.1.7: bad sender's mailbox address syntax.
    pub const BAD_SENDER_SYNTAX: Self = Self::new(5, 1, 7);
    /// 5.1.8: bad sender's system address.
    pub const BAD_SENDER: Self = Self::new(5, 1, 8);
    /// 5.1.10: recipient address has null MX (RFC 7505).
    pub const NULL_MX: Self = Self::new(5, 1, 10);
    /// 5.3.4: message too big for system.
    pub const TOO_BIG: Self = Self::new(5, 3, 4);
    /// 5.5.0: other or undefined protocol status.
    pub const PROTOCOL: Self = Self::new(5, 5, 0);
    /// 5.5.1: invalid command.
    pub const INVALID_COMMAND: Self = Self::new(5, 5, 1);
    /// 5.5.2: syntax error.
    pub const SYNTAX: Self = Self::new(5, 5, 2);
    /// 5.5.3: too many recipients.
    pub const TOO_MANY_RECIPIENTS_PERM: Self = Self::new(5, 5, 3);
    /// 5.5.4: invalid command arguments.
    pub const INVALID_ARGUMENTS: Self = Self::new(5, 5, 4);
    /// 5.5.6: syntax error (used for "line too long").
    pub const LINE_TOO_LONG: Self = Self::new(5, 5, 6);
    /// 5.6.0: other or undefined media error (e.g. NUL in the content).
    pub const MEDIA: Self = Self::new(5, 6, 0);
    /// 5.6.7: non-ASCII addresses not permitted for that sender/recipient (RFC 6531).
    pub const NON_ASCII_ADDRESS: Self = Self::new(5, 6, 7);
    /// 5.7.0: other or undefined security status.
    pub const SECURITY: Self = Self::new(5, 7, 0);
    /// 5.7.1: delivery not authorized, message refused.
    pub const NOT_AUTHORIZED: Self = Self::new(5, 7, 1);
    /// 5.7.8: authentication credentials invalid.
    pub const BAD_CREDENTIALS: Self = Self::new(5, 7, 8);
    /// 5.7.30: REQUIRETLS support required (RFC 8689).
    pub const REQUIRETLS_NEEDED: Self = Self::new(5, 7, 30);

    /// Parses `class.subject.detail` (class 2, 4 or 5; subject and detail of 1 to 3 digits).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.');
        let class = parts.next()?;
        let subject = parts.next()?;
        let detail = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        let class = match class {
            "2" => 2,
            "4" => 4,
            "5" => 5,
            _ => return None,
        };
        Some(Self::new(class, parse_part(subject)?, parse_part(detail)?))
    }
}

/// Parses 1 to 3 ASCII digits.
fn parse_part(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_formats_three_parts() {
        assert_eq!(EnhancedStatus::NOT_AUTHORIZED.to_string(), "5.7.1");
        assert_eq!(EnhancedStatus::REQUIRETLS_NEEDED.to_string(), "5.7.30");
        assert_eq!(EnhancedStatus::new(2, 0, 0).to_string(), "2.0.0");
    }

    #[test]
    fn parse_round_trips_and_rejects_junk() {
        assert_eq!(
            EnhancedStatus::parse("5.1.10"),
            Some(EnhancedStatus::NULL_MX)
        );
        assert_eq!(EnhancedStatus::parse("2.0.0"), Some(EnhancedStatus::OK));
        for bad in [
            "", "3.0.0", "5.1", "5.1.1.1", "5..1", "5.1.1000", "5.a.1", "05.1.1", "5.1.-1",
        ] {
            assert_eq!(EnhancedStatus::parse(bad), None, "{bad:?}");
        }
    }
}
