//! Header processing at submission: strip `X-SES-*`, read the configuration set and tags, find the
//! From addresses, add `Received:`, and `Message-ID:`/`Date:` when missing. Header fields that stay
//! are copied byte for byte and the body is never touched (no re-encoding).

use std::net::IpAddr;

/// What the session learns from, and does to, a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The message to queue: our trace header, the original fields minus `X-SES-*`, the body.
    pub message: Vec<u8>,
    /// First `X-SES-CONFIGURATION-SET` value, trimmed.
    pub configuration_set: Option<String>,
    /// Parsed `X-SES-MESSAGE-TAGS` (first instance).
    pub tags: Vec<(String, String)>,
    /// Addresses in `From:` (lowercased domain, as written local part).
    pub from: Vec<String>,
    /// The Message-ID the message carries after processing (without angle brackets).
    pub message_id: String,
}

/// Facts for the `Received:` header.
#[derive(Debug, Clone)]
pub struct Trace<'a> {
    /// Name the client gave in EHLO/HELO.
    pub helo: &'a str,
    /// Client address.
    pub client_ip: IpAddr,
    /// Our host name.
    pub hostname: &'a str,
    /// `ESMTPSA`, `ESMTPS`, `ESMTP`, `SMTP` (RFC 3848).
    pub protocol: &'a str,
    /// e.g. `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384`.
    pub tls: Option<String>,
}

struct Field {
    start: usize,
    end: usize,
    name_end: usize,
}

/// Splits the header section into fields; returns them and the offset where the body part begins.
fn fields(raw: &[u8]) -> (Vec<Field>, usize) {
    let mut out: Vec<Field> = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        let line_end = raw[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| pos + p + 2)
            .unwrap_or(raw.len());
        let line = &raw[pos..line_end];
        if line == b"\r\n" {
            return (out, pos); // blank line: body separator stays with the body part
        }
        let continuation = matches!(line.first(), Some(b' ') | Some(b'\t'));
        if continuation {
            match out.last_mut() {
                Some(f) => f.end = line_end,
                None => return (out, pos),
            }
        } else {
            let name_end = line.iter().position(|b| *b == b':');
            let valid =
                name_end.is_some_and(|n| n > 0 && line[..n].iter().all(|b| (33..=126).contains(b)));
            match (valid, name_end) {
                (true, Some(n)) => out.push(Field {
                    start: pos,
                    end: line_end,
                    name_end: pos + n,
                }),
                _ => return (out, pos), // not a header line: the body starts here
            }
        }
        pos = line_end;
    }
    (out, raw.len())
}

fn unfolded_value(raw: &[u8], f: &Field) -> String {
    let value = &raw[f.name_end + 1..f.end];
    let text = String::from_utf8_lossy(value);
    text.split("\r\n")
        .map(|l| l.trim_matches(|c| c == ' ' || c == '\t'))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `X-SES-MESSAGE-TAGS: name=value, name2=value2`.
pub fn parse_tags(value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn printable(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect()
}

/// Processes a received message as described in the module documentation.
pub fn prepare(raw: &[u8], trace: &Trace<'_>, now: chrono::DateTime<chrono::Utc>) -> Prepared {
    let (fields, body_start) = fields(raw);
    let mut configuration_set = None;
    let mut tags = None;
    let mut has_message_id = None;
    let mut has_date = false;
    let mut kept: Vec<&Field> = Vec::with_capacity(fields.len());
    for f in &fields {
        let name = String::from_utf8_lossy(&raw[f.start..f.name_end]).to_ascii_lowercase();
        let name = name.trim_end();
        if name.starts_with("x-ses-") {
            match name {
                "x-ses-configuration-set" if configuration_set.is_none() => {
                    configuration_set = Some(unfolded_value(raw, f))
                }
                "x-ses-message-tags" if tags.is_none() => {
                    tags = Some(parse_tags(&unfolded_value(raw, f)))
                }
                _ => {}
            }
            continue;
        }
        if name == "message-id" && has_message_id.is_none() {
            let v = unfolded_value(raw, f);
            has_message_id = Some(
                v.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string(),
            );
        }
        if name == "date" {
            has_date = true;
        }
        kept.push(f);
    }

    // From addresses, parsed by mail-parser from the original header section (encoded words,
    // groups and comments handled there).
    let header_section = &raw[..body_start];
    let from = mail_parser::MessageParser::default()
        .parse_headers(header_section)
        .and_then(|m| {
            m.from().map(|a| {
                a.iter()
                    .filter_map(|addr| addr.address())
                    .map(|s| match s.rsplit_once('@') {
                        Some((l, d)) => format!("{l}@{}", d.to_ascii_lowercase()),
                        None => s.to_string(),
                    })
                    .collect::<Vec<_>>()
            })
        })
        .unwrap_or_default();

    let date = now.to_rfc2822();
    let mut out = Vec::with_capacity(raw.len() + 512);
    let tls = trace
        .tls
        .as_ref()
        .map(|t| format!("\r\n\t(using {t})"))
        .unwrap_or_default();
    out.extend_from_slice(
        format!(
            "Received: from {} ([{}])\r\n\tby {} (Sealpost) with {}{};\r\n\t{}\r\n",
            printable(trace.helo, 200),
            trace.client_ip,
            trace.hostname,
            trace.protocol,
            tls,
            date
        )
        .as_bytes(),
    );
    for f in &kept {
        out.extend_from_slice(&raw[f.start..f.end]);
        if !raw[f.start..f.end].ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
    let message_id = match has_message_id {
        Some(id) if !id.is_empty() => id,
        _ => {
            let id = format!(
                "{}@{}",
                hex::encode(rand::random::<[u8; 16]>()),
                trace.hostname
            );
            out.extend_from_slice(format!("Message-ID: <{id}>\r\n").as_bytes());
            id
        }
    };
    if !has_date {
        out.extend_from_slice(format!("Date: {date}\r\n").as_bytes());
    }
    if body_start >= raw.len() && !fields.is_empty() {
        // Headers only: keep the message well-formed with an empty body.
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&raw[body_start..]);
    Prepared {
        message: out,
        configuration_set,
        tags: tags.unwrap_or_default(),
        from,
        message_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace() -> Trace<'static> {
        Trace {
            helo: "app.example",
            client_ip: "127.0.0.1".parse().unwrap(),
            hostname: "relay.example.org",
            protocol: "ESMTPSA",
            tls: Some("TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384".into()),
        }
    }

    const BODY: &[u8] =
        b"\r\nLine one =C3=A9\r\n..not unstuffed here\r\n\r\nX-SES-FAKE: in body stays\r\n";

    #[test]
    fn strips_ses_headers_and_keeps_body_bytes() {
        let mut raw = b"From: Billing <Billing@Clinic.Example>\r\nX-SES-CONFIGURATION-SET: partner\r\nTo: p@x.org\r\nx-ses-message-tags: dept=billing, kind = invoice\r\nX-SES-CONFIGURATION-SET: second\r\nSubject: folded\r\n continued\r\nMessage-ID: <abc@app>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nX-SES-SOURCE-ARN: arn:x\r\n\tfolded-arn\r\n".to_vec();
        raw.extend_from_slice(BODY);
        let p = prepare(&raw, &trace(), chrono::Utc::now());
        assert_eq!(p.configuration_set.as_deref(), Some("partner"));
        assert_eq!(
            p.tags,
            vec![
                ("dept".into(), "billing".into()),
                ("kind".into(), "invoice".into())
            ]
        );
        assert_eq!(p.from, vec!["Billing@clinic.example".to_string()]);
        assert_eq!(p.message_id, "abc@app");
        let text = String::from_utf8(p.message.clone()).unwrap();
        assert!(text.starts_with("Received: from app.example ([127.0.0.1])\r\n\tby relay.example.org (Sealpost) with ESMTPSA"));
        assert!(!text
            .to_ascii_lowercase()
            .contains("x-ses-configuration-set"));
        assert!(!text.contains("x-ses-message-tags"));
        assert!(!text.contains("folded-arn"));
        assert!(text.contains("Subject: folded\r\n continued\r\n"));
        assert_eq!(text.matches("Message-ID").count(), 1);
        assert!(p.message.ends_with(BODY), "body must be byte-identical");
        assert!(text.contains("X-SES-FAKE: in body stays"));
    }

    #[test]
    fn adds_message_id_and_date_when_missing() {
        let mut raw = b"From: a@b.example\r\nSubject: hi\r\n".to_vec();
        raw.extend_from_slice(BODY);
        let p = prepare(&raw, &trace(), chrono::Utc::now());
        let text = String::from_utf8(p.message.clone()).unwrap();
        assert!(p.message_id.ends_with("@relay.example.org"));
        assert!(text.contains(&format!("Message-ID: <{}>\r\n", p.message_id)));
        assert!(text.contains("\r\nDate: "));
        assert!(p.message.ends_with(BODY));
    }

    #[test]
    fn no_header_section() {
        let raw = b"just a line of text without a colon\r\nmore\r\n".to_vec();
        let p = prepare(&raw, &trace(), chrono::Utc::now());
        assert!(p.message.ends_with(&raw));
        assert!(p.from.is_empty());
    }

    #[test]
    fn headers_only_message() {
        let raw = b"From: a@b.example\r\nSubject: x\r\n".to_vec();
        let p = prepare(&raw, &trace(), chrono::Utc::now());
        assert!(p.message.ends_with(b"\r\n\r\n"));
    }

    #[test]
    fn tags_parse() {
        assert_eq!(
            parse_tags("a=1,b = 2 , =x, c"),
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
    }
}
