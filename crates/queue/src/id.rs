//! Queue ids: 128-bit, time-ordered identifiers.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// 128-bit, time-ordered (48-bit ms timestamp + 80 random bits), Display/FromStr as 32 lowercase hex.
///
/// Serialised as its 32-hex text too: JSON readers would turn a raw u128 into an inexact float.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId(u128);

impl Serialize for QueueId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for QueueId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a string is not a queue id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a queue id is 32 lowercase hex digits")]
pub struct ParseQueueIdError;

impl QueueId {
    /// A new id for the current time.
    pub fn generate() -> QueueId {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let random: u128 = rand::random::<u128>() & ((1u128 << 80) - 1);
        QueueId(((ms & ((1u128 << 48) - 1)) << 80) | random)
    }

    /// The id as a raw 128-bit number.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// The id from a raw 128-bit number.
    pub fn from_u128(raw: u128) -> QueueId {
        QueueId(raw)
    }

    /// Milliseconds since the Unix epoch encoded in the id.
    pub fn timestamp_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for QueueId {
    type Err = ParseQueueIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ParseQueueIdError);
        }
        u128::from_str_radix(s, 16)
            .map(QueueId)
            .map_err(|_| ParseQueueIdError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip_and_format() {
        let id = QueueId::generate();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(text.parse::<QueueId>().unwrap(), id);
        assert!("ABCDEF00000000000000000000000000"
            .parse::<QueueId>()
            .is_err());
        assert!("abc".parse::<QueueId>().is_err());
        assert!("+bcdef00000000000000000000000000"
            .parse::<QueueId>()
            .is_err());
    }

    #[test]
    fn ids_are_time_ordered_and_unique() {
        let a = QueueId::generate();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = QueueId::generate();
        assert!(b > a);
        assert!(b.timestamp_ms() > a.timestamp_ms());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now - b.timestamp_ms() < 5_000);
        let many: std::collections::HashSet<_> = (0..1000).map(|_| QueueId::generate()).collect();
        assert_eq!(many.len(), 1000);
    }

    #[test]
    fn serialises_as_hex_text() {
        let id = QueueId::generate();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<QueueId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<QueueId>("12").is_err());
    }
}
