//! Reports parsed back with mail-parser: structure, fields, and no body bytes.

use super::*;
use mail_parser::MimeHeaders;
use sealpost_policy::{Evidence, PolicySpec, TlsRequirement, Verdict};
use std::time::{Duration, UNIX_EPOCH};

const ORIGINAL: &[u8] = b"From: Billing <billing@clinic.example>\r\nTo: patient@example.net\r\nSubject: Your lab results\r\nMessage-ID: <m1@clinic.example>\r\n\r\nBODY-MARKER-PHI glucose 5.4 mmol/L\r\n";

fn report(action: Action) -> Report<'static> {
    Report {
        reporting_mta: "relay.example.org",
        queue_id: "0123456789abcdef0123456789abcdef",
        envid: Some("env-1"),
        arrival: UNIX_EPOCH + Duration::from_secs(1_795_000_000),
        to: "billing@clinic.example",
        policy: "phi",
        original: ORIGINAL,
        recipients: vec![RecipientReport {
            final_recipient: "patient@example.net".into(),
            original_recipient: Some("rfc822;patient@example.net".into()),
            action,
            status: if action == Action::Failed { "5.7.5".into() } else { "4.7.5".into() },
            remote_mta: Some("mx.example.net".into()),
            diagnostic: Some("x-sealpost; tls-verdict=expired".into()),
            last_attempt: Some(UNIX_EPOCH + Duration::from_secs(1_795_000_600)),
            will_retry_until: (action == Action::Delayed).then(|| UNIX_EPOCH + Duration::from_secs(1_795_400_000)),
            explanation: "the recipient's server mx.example.net presented a certificate that expired on 2021-01-01".into(),
        }],
    }
}

#[test]
fn failed_report_structure() {
    let bytes = build(&report(Action::Failed)).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        !text.contains("BODY-MARKER-PHI"),
        "the body must never be included:\n{text}"
    );
    assert!(!text.contains("glucose"));
    assert!(text.contains("Auto-Submitted: auto-replied"));
    assert!(
        text.contains("multipart/report; report-type=delivery-status"),
        "{text}"
    );
    for line in [
        "Reporting-MTA: dns; relay.example.org",
        "Original-Envelope-Id: env-1",
        "Final-Recipient: rfc822; patient@example.net",
        "Original-Recipient: rfc822;patient@example.net",
        "Action: failed",
        "Status: 5.7.5",
        "Remote-MTA: dns; mx.example.net",
        "Diagnostic-Code: x-sealpost; tls-verdict=expired",
        "Last-Attempt-Date: ",
        "Arrival-Date: ",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // Every line ends in CRLF.
    assert!(
        !bytes.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
        "bare LF"
    );

    let msg = mail_parser::MessageParser::default().parse(&bytes).unwrap();
    assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
    assert_eq!(
        msg.to().and_then(|a| a.first()).and_then(|a| a.address()),
        Some("billing@clinic.example")
    );
    let ct = msg.content_type().unwrap();
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let parts: Vec<String> = msg
        .parts
        .iter()
        .filter_map(|p| {
            p.content_type()
                .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")))
        })
        .collect();
    assert_eq!(
        parts[1..],
        [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ],
        "{parts:?}"
    );
    let human = msg.body_text(0).unwrap();
    assert!(human.contains("expired on 2021-01-01"), "{human}");
    assert!(human.contains("NOT sent"), "{human}");
    assert!(
        text.contains("Subject: Your lab results"),
        "headers are included"
    );
}

#[test]
fn delay_notice_says_still_retrying() {
    let text = String::from_utf8(build(&report(Action::Delayed)).unwrap()).unwrap();
    assert!(text.contains("Action: delayed"));
    assert!(text.contains("Status: 4.7.5"));
    assert!(text.contains("Will-Retry-Until: "));
    assert!(text.contains("Subject: Delayed Mail (still being retried)"));
    assert!(text.contains("you do not need to send it again"));
    assert!(!text.contains("BODY-MARKER-PHI"));
}

#[test]
fn no_report_for_null_sender_or_nobody() {
    let mut r = report(Action::Failed);
    r.to = "";
    assert!(matches!(build(&r), Err(BounceError::NullSender)));
    let mut r = report(Action::Failed);
    r.recipients.clear();
    assert!(matches!(build(&r), Err(BounceError::NoRecipients)));
}

#[test]
fn header_section_cuts_at_blank_line() {
    assert_eq!(
        header_section(ORIGINAL),
        &ORIGINAL[..ORIGINAL.len() - "\r\nBODY-MARKER-PHI glucose 5.4 mmol/L\r\n".len()]
    );
    assert_eq!(header_section(b"no blank line"), b"no blank line");
}

#[test]
fn explanations_in_plain_words() {
    let spec = PolicySpec::new("phi", TlsRequirement::Verified);
    let e = Evidence::without_tls(
        &spec,
        "mx.example.net",
        None,
        Verdict::StarttlsNotOffered,
        None,
    );
    let s = explain(&e);
    assert!(s.contains("does not offer encryption"), "{s}");
    assert!(
        s.contains("policy `phi` requires a verified TLS connection"),
        "{s}"
    );
    assert_eq!(
        status_for(Verdict::StarttlsNotOffered, Action::Failed),
        "5.7.10"
    );
    assert_eq!(status_for(Verdict::Expired, Action::Delayed), "4.7.5");
    assert_eq!(status_for(Verdict::Expired, Action::Failed), "5.7.5");
    let e = Evidence::without_tls(
        &spec,
        "mx.example.net",
        None,
        Verdict::ProtocolVersion,
        None,
    );
    assert!(explain(&e).contains("TLS 1.2 or later is required"));
}

#[test]
fn long_explanations_and_diagnostics_stay_7bit_and_fold() {
    let mut r = report(Action::Failed);
    let long = "mx.example.net said: 550 5.7.1 ".to_owned() + &"policy-word ".repeat(20);
    r.recipients[0].diagnostic = Some(format!("smtp; {long}"));
    r.recipients[0].explanation = "the recipient's server mx.example.net presented a certificate that expired on 2021-01-01; Sealpost did not deliver because the policy `phi` requires a verified TLS connection".into();
    let text = String::from_utf8(build(&r).unwrap()).unwrap();
    assert!(!text.contains("quoted-printable"), "{text}");
    let start = text.find("Content-Type: text/plain").unwrap();
    let end = text.find("Content-Type: text/rfc822-headers").unwrap();
    for line in text[start..end].split("\r\n") {
        assert!(line.len() <= 76, "line too long ({}): {line}", line.len());
    }
    // Words are kept whole, so a reader (or grep) finds them.
    assert!(text.contains("policy `phi`"), "{text}");
    assert!(
        text.contains("Diagnostic-Code: smtp; mx.example.net said: 550 5.7.1"),
        "{text}"
    );
    // The folded field unfolds to the original value.
    let msg = mail_parser::MessageParser::default()
        .parse(text.as_bytes())
        .unwrap();
    let status = String::from_utf8_lossy(msg.parts[2].contents()).replace("\r\n ", " ");
    assert!(
        status.contains(&format!("Diagnostic-Code: smtp; {}", long.trim_end())),
        "{status}"
    );
}

#[test]
fn wrap_breaks_at_spaces_and_indents_continuations() {
    assert_eq!(wrap("aa bb cc", 5, " "), "aa bb\r\n cc");
    assert_eq!(wrap("short", 72, " "), "short");
    assert_eq!(wrap("one\r\ntwo three", 5, ""), "one\r\ntwo\r\nthree");
    assert_eq!(
        wrap("averyveryverylongword x", 5, " "),
        "averyveryverylongword\r\n x"
    );
}
