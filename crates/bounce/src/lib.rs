//! Delivery status notifications, like Postfix's bounce daemon: RFC 3464 DSNs
//! (`multipart/report; report-type=delivery-status`) for failed recipients and delay notices,
//! each with a part in plain words, the machine-readable `message/delivery-status` part, and the
//! original message's **headers only** (`text/rfc822-headers`): never the body, so no PHI beyond
//! what the headers already carry leaves in a bounce.

mod explain;

pub use explain::{explain, status_for};

use chrono::{DateTime, Utc};
use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use std::time::SystemTime;

/// What happened to one recipient (RFC 3464 §2.3.3 `Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Given up: the message will not be delivered to this recipient.
    Failed,
    /// Not delivered yet; still being retried.
    Delayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        }
    }
}

/// One recipient's part of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientReport {
    /// The recipient address as the queue holds it.
    pub final_recipient: String,
    /// The ORCPT value given at submission (`rfc822;addr`), if any.
    pub original_recipient: Option<String>,
    /// Failed or delayed.
    pub action: Action,
    /// Enhanced status code, e.g. `5.7.10` or `4.7.5`.
    pub status: String,
    /// The MX host last tried, if any.
    pub remote_mta: Option<String>,
    /// The remote server's reply (`smtp; 550 5.1.1 ...`) or our own diagnosis.
    pub diagnostic: Option<String>,
    /// The last delivery attempt.
    pub last_attempt: Option<SystemTime>,
    /// For delays: when retrying stops.
    pub will_retry_until: Option<SystemTime>,
    /// The reason in plain words, e.g. from [`explain`].
    pub explanation: String,
}

/// Everything a report needs.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    /// Our host name (`Reporting-MTA`, the `From:` domain).
    pub reporting_mta: &'a str,
    /// The queue id of the original message.
    pub queue_id: &'a str,
    /// `ENVID` given at submission.
    pub envid: Option<&'a str>,
    /// When the original message was accepted.
    pub arrival: SystemTime,
    /// The envelope sender of the original message: the report goes there.
    pub to: &'a str,
    /// The policy that applied.
    pub policy: &'a str,
    /// The original message; only its header section is included.
    pub original: &'a [u8],
    /// The recipients reported on (all of one action).
    pub recipients: Vec<RecipientReport>,
}

/// Why a report could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BounceError {
    /// The original sender was the null sender: reports are never sent for reports (no loops).
    #[error("no report for a message with a null sender")]
    NullSender,
    /// There is nobody to report on.
    #[error("no recipients to report on")]
    NoRecipients,
    /// The sender address cannot be written in a `To:` header.
    #[error("the sender address {0:?} cannot be used as a report recipient")]
    BadAddress(String),
    /// lettre refused to build the message.
    #[error("building the report: {0}")]
    Build(String),
}

/// `Auto-Submitted: auto-replied` (RFC 3834), so auto-responders do not answer a bounce.
#[derive(Debug, Clone)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }
    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-replied".to_string())
    }
}

fn rfc2822(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc2822()
}

/// The header section of a message (up to and including the blank line, or all of it).
pub fn header_section(message: &[u8]) -> &[u8] {
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &message[..i + 2],
        None => message,
    }
}

/// Longest line written into a report part: short enough that every part goes out as 7bit
/// text (no quoted-printable soft breaks inside words a reader or a test looks for).
const WIDTH: usize = 72;

/// Word-wraps each line of `text` at `width` columns (a word longer than that stays whole).
fn wrap(text: &str, width: usize, indent: &str) -> String {
    let mut out = String::new();
    for line in text.split("\r\n") {
        let mut current = String::new();
        for word in line.split(' ').filter(|w| !w.is_empty()) {
            if !current.is_empty() && current.len() + 1 + word.len() > width {
                out.push_str(&current);
                out.push_str("\r\n");
                current = indent.to_owned();
            } else if !current.is_empty() && current != indent {
                current.push(' ');
            }
            current.push_str(word);
        }
        out.push_str(&current);
        out.push_str("\r\n");
    }
    out.truncate(out.len().saturating_sub(2));
    out
}

/// One `Name: value` field of the delivery-status part, folded (RFC 5322 §2.2.3) so no line
/// exceeds [`WIDTH`]; CRLF at the end.
fn field(name: &str, value: &str) -> String {
    let one_line: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("{}\r\n", wrap(&format!("{name}: {one_line}"), WIDTH, " "))
}

fn human_part(r: &Report<'_>) -> String {
    let failed = r.recipients.iter().any(|x| x.action == Action::Failed);
    let mut t = String::new();
    if failed {
        t.push_str(&format!(
            "This is the mail system at host {}.\r\n\r\nYour message could not be delivered to the recipient(s) below.\r\nIt was NOT sent anywhere else. The policy `{}` applied to it.\r\n\r\n",
            r.reporting_mta, r.policy
        ));
    } else {
        t.push_str(&format!(
            "This is the mail system at host {}.\r\n\r\nYour message has not been delivered yet to the recipient(s) below.\r\nIt is still queued and will be retried;\r\nyou do not need to send it again. The policy `{}` applied to it.\r\n\r\n",
            r.reporting_mta, r.policy
        ));
    }
    for rec in &r.recipients {
        let mut item = format!("<{}>: {}", rec.final_recipient, rec.explanation);
        if let Some(until) = rec.will_retry_until {
            item.push_str(&format!(
                ". Sealpost will keep trying until {}.",
                rfc2822(until)
            ));
        }
        t.push_str(&wrap(&item, WIDTH, "    "));
        t.push_str("\r\n\r\n");
    }
    t.push_str(&format!(
        "Queue id: {}.\r\nThe original message's headers are attached; its body is not,\r\nso this report carries no message content.\r\n",
        r.queue_id
    ));
    t
}

fn status_part(r: &Report<'_>) -> String {
    let mut t = field("Reporting-MTA", &format!("dns; {}", r.reporting_mta));
    if let Some(envid) = r.envid {
        t.push_str(&field("Original-Envelope-Id", envid));
    }
    t.push_str(&field("X-Sealpost-Queue-ID", r.queue_id));
    t.push_str(&field("Arrival-Date", &rfc2822(r.arrival)));
    for rec in &r.recipients {
        t.push_str("\r\n");
        if let Some(o) = &rec.original_recipient {
            t.push_str(&field("Original-Recipient", o));
        }
        t.push_str(&field(
            "Final-Recipient",
            &format!("rfc822; {}", rec.final_recipient),
        ));
        t.push_str(&field("Action", rec.action.as_str()));
        t.push_str(&field("Status", &rec.status));
        if let Some(m) = &rec.remote_mta {
            t.push_str(&field("Remote-MTA", &format!("dns; {m}")));
        }
        if let Some(d) = &rec.diagnostic {
            t.push_str(&field("Diagnostic-Code", d));
        }
        if let Some(a) = rec.last_attempt {
            t.push_str(&field("Last-Attempt-Date", &rfc2822(a)));
        }
        if let Some(u) = rec.will_retry_until {
            t.push_str(&field("Will-Retry-Until", &rfc2822(u)));
        }
    }
    t
}

/// Builds the report message (CRLF line endings), addressed to the original envelope sender.
pub fn build(r: &Report<'_>) -> Result<Vec<u8>, BounceError> {
    if r.to.is_empty() {
        return Err(BounceError::NullSender);
    }
    if r.recipients.is_empty() {
        return Err(BounceError::NoRecipients);
    }
    let to: Mailbox =
        r.to.parse()
            .map_err(|_| BounceError::BadAddress(r.to.to_string()))?;
    let from: Mailbox = format!("Mail Delivery System <MAILER-DAEMON@{}>", r.reporting_mta)
        .parse()
        .map_err(|_| BounceError::BadAddress(format!("MAILER-DAEMON@{}", r.reporting_mta)))?;
    let failed = r.recipients.iter().any(|x| x.action == Action::Failed);
    let subject = if failed {
        "Undelivered Mail Returned to Sender"
    } else {
        "Delayed Mail (still being retried)"
    };
    let boundary = format!(
        "sealpost-report-{}",
        hex::encode(rand::random::<[u8; 12]>())
    );
    let report_type = ContentType::parse(&format!(
        "multipart/report; report-type=delivery-status; boundary=\"{boundary}\""
    ))
    .map_err(|e| BounceError::Build(e.to_string()))?;
    let status_type = ContentType::parse("message/delivery-status")
        .map_err(|e| BounceError::Build(e.to_string()))?;
    let headers_type =
        ContentType::parse("text/rfc822-headers").map_err(|e| BounceError::Build(e.to_string()))?;
    let body = MultiPart::builder()
        .header(report_type)
        .singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_PLAIN)
                .body(human_part(r)),
        )
        .singlepart(
            SinglePart::builder()
                .header(status_type)
                .body(status_part(r)),
        )
        .singlepart(
            SinglePart::builder()
                .header(headers_type)
                .body(String::from_utf8_lossy(header_section(r.original)).into_owned()),
        );
    let message = lettre::Message::builder()
        .from(from)
        .to(to)
        .subject(subject)
        .message_id(Some(format!(
            "<{}.{}@{}>",
            r.queue_id,
            hex::encode(rand::random::<[u8; 6]>()),
            r.reporting_mta
        )))
        .header(AutoSubmitted)
        .multipart(body)
        .map_err(|e| BounceError::Build(e.to_string()))?;
    Ok(message.formatted())
}

#[cfg(test)]
mod tests;
