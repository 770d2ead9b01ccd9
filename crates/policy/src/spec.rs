//! What an operator asks of a destination: the TLS requirement and optional pins.

use serde::Serialize;

/// How strictly the peer must be authenticated. There is no plaintext option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsRequirement {
    /// TLS 1.2+, NIST suites, PKIX chain to a trust anchor, valid dates, name = MX host,
    /// strong leaf key and signature.
    Verified,
    /// TLS 1.2+ and NIST suites, certificate not authenticated (operator's explicit choice
    /// for non-PHI mail only).
    Encrypted,
}

/// A named TLS policy applied to one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    /// The policy's name from the configuration (e.g. "phi").
    pub name: String,
    /// The authentication the peer must pass.
    pub requirement: TlsRequirement,
    /// Optional SHA-256 fingerprints of the leaf certificate (whole DER); if non-empty the
    /// leaf must match one of them in addition to the requirement.
    pub pins: Vec<[u8; 32]>,
}

impl PolicySpec {
    /// A policy with the given name and requirement and no pins.
    pub fn new(name: impl Into<String>, requirement: TlsRequirement) -> Self {
        Self {
            name: name.into(),
            requirement,
            pins: Vec::new(),
        }
    }

    /// Whether the lowercase-hex SHA-256 fingerprint matches one of the pins
    /// (true when there are no pins).
    pub fn pin_allows(&self, leaf_sha256_hex: Option<&str>) -> bool {
        if self.pins.is_empty() {
            return true;
        }
        match leaf_sha256_hex {
            Some(fp) => self.pins.iter().any(|pin| hex::encode(pin) == fp),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_pins_allows_anything_and_pins_need_an_exact_match() {
        let mut spec = PolicySpec::new("phi", TlsRequirement::Verified);
        assert!(spec.pin_allows(None));
        spec.pins.push([0xab; 32]);
        assert!(spec.pin_allows(Some(&"ab".repeat(32))));
        assert!(!spec.pin_allows(Some(&"ac".repeat(32))));
        assert!(!spec.pin_allows(None));
    }
}
