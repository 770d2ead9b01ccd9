//! The on-disk line format: sealing a record into one hash-chained JSON line and checking one.

use std::net::IpAddr;

use aws_lc_rs::digest;
use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::record::{Event, Json, Record};

/// The `prev` of the very first record: 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The bytes that open the final `hash` field of every line.
const HASH_OPEN: &[u8] = b",\"hash\":\"";
/// The bytes that close the final `hash` field and the object.
const HASH_CLOSE: &[u8] = b"\"}";
/// Length of a lowercase hex SHA-256.
const HEX_LEN: usize = 64;
/// Length of the whole `,"hash":"<64 hex>"}` suffix.
const SUFFIX_LEN: usize = HASH_OPEN.len() + HEX_LEN + HASH_CLOSE.len();

/// Why one line is not a valid audit record (independent of its neighbours).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line is empty.
    #[error("empty line")]
    Empty,
    /// The file ends without a newline after this line (a write was cut short).
    #[error("last line is not terminated by a newline (truncated write)")]
    Unterminated,
    /// The line does not end with `,"hash":"<64 lowercase hex>"}`.
    #[error("line does not end with a \"hash\" field of 64 lowercase hex digits")]
    NoHashSuffix,
    /// The line is not a JSON audit record.
    #[error("not a valid audit record: {0}")]
    Json(String),
    /// The `hash` field parsed from the JSON is not the final one.
    #[error("the \"hash\" field is not the last field of the line")]
    HashNotLast,
    /// `prev` is not 64 lowercase hex digits.
    #[error("\"prev\" is not 64 lowercase hex digits")]
    BadPrev,
    /// `ts` is not an RFC 3339 timestamp.
    #[error("\"ts\" is not an RFC 3339 timestamp: {0}")]
    BadTimestamp(String),
    /// The stored hash does not match the line's content.
    #[error("record seq {seq}: hash does not match the content")]
    HashMismatch {
        /// The `seq` written in the line.
        seq: u64,
    },
}

/// The fields of a record in their fixed on-disk order, without the final `hash`.
#[derive(Serialize)]
struct Unsealed<'a> {
    seq: u64,
    ts: &'a str,
    prev: &'a str,
    event: Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipient: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mx: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<&'a Json>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    detail: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outbox: Option<u64>,
}

/// A record as read back from a line (every field the writer produces).
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // the optional fields are parsed to check their types
struct Stored {
    seq: u64,
    ts: String,
    prev: String,
    event: Event,
    queue_id: Option<String>,
    user: Option<String>,
    client_ip: Option<IpAddr>,
    recipient: Option<String>,
    mx: Option<String>,
    ip: Option<IpAddr>,
    tls: Option<Value>,
    detail: Option<Map<String, Value>>,
    at: Option<String>,
    outbox: Option<u64>,
    hash: String,
}

/// The chain facts of one checked line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The record's sequence number.
    pub seq: u64,
    /// The record's timestamp.
    pub ts: DateTime<FixedOffset>,
    /// The hash of the previous record.
    pub prev: String,
    /// This record's hash.
    pub hash: String,
    /// The record's outbox seq, if it came through the queue's outbox.
    pub outbox: Option<u64>,
}

/// Where a record that came through the queue's outbox was decided: its outbox seq and the
/// time of the decision (the commit that holds it), which can be earlier than `ts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin<'a> {
    /// The outbox row's seq.
    pub seq: u64,
    /// RFC 3339 time the record was decided.
    pub at: &'a str,
}

/// Lowercase hex SHA-256 of `unsealed_without_close` followed by `}`.
fn hash_of(unsealed_without_close: &[u8]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(unsealed_without_close);
    ctx.update(b"}");
    hex::encode(ctx.finish().as_ref())
}

/// True when `s` is 64 lowercase hex digits.
fn is_hex64(s: &[u8]) -> bool {
    s.len() == HEX_LEN && s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Seals `rec` as record `seq` after `prev`: returns the line (with its `\n`) and its hash.
#[cfg(test)]
pub(crate) fn seal(
    seq: u64,
    ts: &str,
    prev: &str,
    rec: &Record,
) -> Result<(Vec<u8>, String), serde_json::Error> {
    let mut line = Vec::new();
    let hash = seal_into(&mut line, seq, ts, prev, rec, None)?;
    Ok((line, hash))
}

/// [`seal`], appending the line to `out` (left as it was on an error); returns the hash.
pub(crate) fn seal_into(
    out: &mut Vec<u8>,
    seq: u64,
    ts: &str,
    prev: &str,
    rec: &Record,
    origin: Option<Origin<'_>>,
) -> Result<String, serde_json::Error> {
    let unsealed = Unsealed {
        seq,
        ts,
        prev,
        event: rec.event,
        queue_id: rec.queue_id.as_deref(),
        user: rec.user.as_deref(),
        client_ip: rec.client_ip,
        recipient: rec.recipient.as_deref(),
        mx: rec.mx.as_deref(),
        ip: rec.ip,
        tls: rec.tls.as_ref(),
        detail: &rec.detail,
        at: origin.map(|o| o.at),
        outbox: origin.map(|o| o.seq),
    };
    let start = out.len();
    if let Err(e) = serde_json::to_writer(&mut *out, &unsealed) {
        out.truncate(start);
        return Err(e);
    }
    // A serialised struct always ends with '}'; drop it and append the hash field instead.
    out.pop();
    let hash = hash_of(out.get(start..).unwrap_or_default());
    out.extend_from_slice(HASH_OPEN);
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(HASH_CLOSE);
    out.push(b'\n');
    Ok(hash)
}

/// The `outbox` seq of a line (without its `\n`), read from where the writer puts it (right
/// before the `hash` field) without parsing or checking the rest.
pub(crate) fn outbox_of(line: &[u8]) -> Option<u64> {
    const FIELD: &[u8] = b",\"outbox\":";
    let body = line.get(..line.len().checked_sub(SUFFIX_LEN)?)?;
    let digits_at = body.iter().rposition(|b| !b.is_ascii_digit())? + 1;
    let (head, digits) = body.split_at(digits_at);
    if digits.is_empty() || !head.ends_with(FIELD) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Checks one line (without its `\n`) on its own: shape, fields and its own hash.
pub fn check_line(line: &[u8]) -> Result<Sealed, LineError> {
    if line.is_empty() {
        return Err(LineError::Empty);
    }
    if line.len() <= SUFFIX_LEN || !line.ends_with(HASH_CLOSE) {
        return Err(LineError::NoHashSuffix);
    }
    let body_len = line.len() - SUFFIX_LEN;
    let (body, suffix) = line.split_at(body_len);
    let Some(hex_part) = suffix
        .strip_prefix(HASH_OPEN)
        .and_then(|rest| rest.strip_suffix(HASH_CLOSE))
    else {
        return Err(LineError::NoHashSuffix);
    };
    if !is_hex64(hex_part) {
        return Err(LineError::NoHashSuffix);
    }
    let stored: Stored =
        serde_json::from_slice(line).map_err(|e| LineError::Json(e.to_string()))?;
    if stored.hash.as_bytes() != hex_part {
        return Err(LineError::HashNotLast);
    }
    if !is_hex64(stored.prev.as_bytes()) {
        return Err(LineError::BadPrev);
    }
    let ts = DateTime::parse_from_rfc3339(&stored.ts)
        .map_err(|e| LineError::BadTimestamp(e.to_string()))?;
    if let Some(at) = &stored.at {
        DateTime::parse_from_rfc3339(at).map_err(|e| LineError::BadTimestamp(e.to_string()))?;
    }
    if hash_of(body) != stored.hash {
        return Err(LineError::HashMismatch { seq: stored.seq });
    }
    Ok(Sealed {
        seq: stored.seq,
        ts,
        prev: stored.prev,
        hash: stored.hash,
        outbox: stored.outbox,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: &str = "2025-01-02T03:04:05.678Z";

    fn sealed_line(rec: &Record) -> (String, String) {
        let (line, hash) = seal(7, TS, GENESIS_PREV, rec).unwrap();
        (String::from_utf8(line).unwrap(), hash)
    }

    #[test]
    fn fields_are_in_fixed_order_and_hash_is_last() {
        let rec = Record::new(Event::Attempt)
            .queue_id("q1")
            .user("app")
            .client_ip("192.0.2.1".parse().unwrap())
            .recipient("r@example.org")
            .mx("mx.example.org")
            .ip("192.0.2.2".parse().unwrap())
            .tls(serde_json::json!({"version": "TLSv1_3"}))
            .detail("size", 10);
        let (line, hash) = sealed_line(&rec);
        let expected_prefix = format!(
            "{{\"seq\":7,\"ts\":\"{TS}\",\"prev\":\"{GENESIS_PREV}\",\"event\":\"attempt\",\
             \"queue_id\":\"q1\",\"user\":\"app\",\"client_ip\":\"192.0.2.1\",\
             \"recipient\":\"r@example.org\",\"mx\":\"mx.example.org\",\"ip\":\"192.0.2.2\",\
             \"tls\":{{\"version\":\"TLSv1_3\"}},\"detail\":{{\"size\":10}},\"hash\":\""
        );
        assert!(line.starts_with(&expected_prefix), "{line}");
        assert_eq!(line, format!("{expected_prefix}{hash}\"}}\n"));
    }

    #[test]
    fn evidence_serialised_once_is_written_as_a_value_would_be() {
        // a struct whose fields are not in key order, with nesting, escapes and numbers
        #[derive(Serialize)]
        struct Facts {
            version: &'static str,
            chain: Vec<&'static str>,
            alpn: Option<&'static str>,
            bits: u32,
            detail: &'static str,
        }
        let facts = Facts {
            version: "TLSv1_3",
            chain: vec!["ab", "cd"],
            alpn: None,
            bits: 256,
            detail: "quote \" and \u{e9}",
        };
        let once = Json::of(&facts);
        let via_value = serde_json::to_value(&facts).unwrap();
        let (a, _) = sealed_line(&Record::new(Event::Attempt).tls(once.clone()));
        let (b, _) = sealed_line(&Record::new(Event::Attempt).tls(via_value));
        assert_eq!(a, b);
        assert!(
            a.contains(r#""tls":{"alpn":null,"bits":256,"chain":["ab","cd"],"detail":"#),
            "{a}"
        );
        // and the line checks as any other
        check_line(a.trim_end().as_bytes()).unwrap();
    }

    #[test]
    fn unset_fields_and_empty_detail_are_omitted() {
        let (line, hash) = sealed_line(&Record::new(Event::Started));
        assert_eq!(
            line,
            format!(
                "{{\"seq\":7,\"ts\":\"{TS}\",\"prev\":\"{GENESIS_PREV}\",\"event\":\"started\",\
                 \"hash\":\"{hash}\"}}\n"
            )
        );
    }

    #[test]
    fn hash_is_sha256_of_line_with_hash_field_replaced_by_brace() {
        let (line, hash) = sealed_line(&Record::new(Event::Accepted).queue_id("q\"1"));
        let line = line.trim_end_matches('\n');
        let unsealed = line.replace(&format!(",\"hash\":\"{hash}\"}}"), "}");
        let expected = hex::encode(digest::digest(&digest::SHA256, unsealed.as_bytes()).as_ref());
        assert_eq!(hash, expected);
        let checked = check_line(line.as_bytes()).unwrap();
        assert_eq!(checked.seq, 7);
        assert_eq!(checked.hash, hash);
        assert_eq!(checked.prev, GENESIS_PREV);
    }

    #[test]
    fn check_line_rejects_damage() {
        let (line, _) = sealed_line(&Record::new(Event::Delivered).recipient("abc@example.org"));
        let line = line.trim_end_matches('\n');
        assert_eq!(check_line(b""), Err(LineError::Empty));
        assert_eq!(
            check_line(&line.as_bytes()[..line.len() - 5]),
            Err(LineError::NoHashSuffix)
        );
        let edited = line.replace("abc@", "abd@");
        assert_eq!(
            check_line(edited.as_bytes()),
            Err(LineError::HashMismatch { seq: 7 })
        );
        let upper = line.replacen("\"hash\":\"", "\"hash\":\"A", 1);
        assert_eq!(check_line(upper.as_bytes()), Err(LineError::NoHashSuffix));
        let not_json = line.replacen("{\"seq\"", "[\"seq\"", 1);
        assert!(matches!(
            check_line(not_json.as_bytes()),
            Err(LineError::Json(_))
        ));
        let bad_event = line.replace("\"delivered\"", "\"teleported\"");
        assert!(matches!(
            check_line(bad_event.as_bytes()),
            Err(LineError::Json(_))
        ));
        let bad_ts = line.replace(TS, "yesterday");
        assert!(matches!(
            check_line(bad_ts.as_bytes()),
            Err(LineError::BadTimestamp(_))
        ));
        let bad_prev = line.replace(GENESIS_PREV, &"Z".repeat(64));
        assert_eq!(check_line(bad_prev.as_bytes()), Err(LineError::BadPrev));
    }
}
