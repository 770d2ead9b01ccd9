//! Reports to the sender after a round: one DSN per message for the recipients that failed
//! (queued as a new message from the null sender to the original sender, under the original
//! policy), drops for null-sender messages (no bounce loops), and one-time delay notices.

use std::time::SystemTime;

use sealpost_audit::{Event, Record};
use sealpost_bounce::{Action, RecipientReport, Report};
use sealpost_policy::{Evidence, Verdict};
use sealpost_queue::{Envelope, Lease, LeasedRecipient, Outcome, QueueId, RecipientSpec};

use super::Inner;

/// A recipient that failed for good this round, with what its DSN says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The reason stored in the queue (starts with the enhanced status code).
    pub(crate) reason: String,
    /// Enhanced status code, e.g. `5.7.5`.
    pub(crate) status: String,
    /// The host last tried, if any.
    pub(crate) remote_mta: Option<String>,
    /// `smtp; <reply>` or `x-sealpost; …`.
    pub(crate) diagnostic: String,
    /// The plain-words reason.
    pub(crate) explanation: String,
}

impl Failure {
    /// A failure after a TLS policy rejection: status and wording from the evidence.
    pub(crate) fn from_evidence(evidence: &Evidence, reason: String) -> Failure {
        // A session that failed after a verified handshake is a connection problem.
        let verdict = if evidence.reason.is_accepting() {
            Verdict::ConnectionLost
        } else {
            evidence.reason
        };
        Failure {
            status: sealpost_bounce::status_for(verdict, Action::Failed).to_owned(),
            remote_mta: Some(evidence.mx.clone()),
            diagnostic: format!("x-sealpost; tls-verdict={verdict}"),
            explanation: sealpost_bounce::explain(evidence),
            reason,
        }
    }

    /// A failure after the remote server's permanent (5xx) reply.
    pub(crate) fn from_reply(mx: &str, reply: &str) -> Failure {
        let said = reply
            .strip_prefix(mx)
            .and_then(|r| r.strip_prefix(" said: "))
            .unwrap_or(reply);
        Failure {
            status: enhanced_code(said).unwrap_or("5.0.0").to_owned(),
            remote_mta: Some(mx.to_owned()),
            diagnostic: format!("smtp; {said}"),
            explanation: format!("the recipient's server {mx} refused the message: {said}"),
            reason: reply.to_owned(),
        }
    }

    /// A failure decided by Sealpost itself (null MX, unknown domain, expiry): `reason` starts
    /// with the enhanced status code.
    pub(crate) fn local(reason: String, explanation: String) -> Failure {
        Failure {
            status: enhanced_code(&reason).unwrap_or("5.0.0").to_owned(),
            remote_mta: None,
            diagnostic: format!("x-sealpost; {}", without_code(&reason)),
            explanation,
            reason,
        }
    }
}

/// The first word of `text` (after an optional 3-digit reply code) if it is an enhanced
/// status code such as `5.1.1`.
pub(crate) fn enhanced_code(text: &str) -> Option<&str> {
    let mut words = text.split_whitespace();
    let first = words.next()?;
    let word = if first.len() == 3 && first.bytes().all(|b| b.is_ascii_digit()) {
        words.next()?
    } else {
        first
    };
    let parts: Vec<&str> = word.split('.').collect();
    let ok = parts.len() == 3
        && matches!(parts.first(), Some(&("2" | "4" | "5")))
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then_some(word)
}

fn without_code(reason: &str) -> &str {
    match enhanced_code(reason) {
        Some(code) => reason
            .trim_start()
            .strip_prefix(code)
            .map(str::trim_start)
            .unwrap_or(reason),
        None => reason,
    }
}

/// Whether the recipient's `NOTIFY=` asks for this kind of report (absent: yes).
fn wants(notify: Option<&str>, kind: &str) -> bool {
    match notify {
        None => true,
        Some(n) => n.split(',').any(|w| w.trim().eq_ignore_ascii_case(kind)),
    }
}

fn recipient(lease: &Lease, index: usize) -> Option<&LeasedRecipient> {
    lease.recipients.iter().find(|r| r.index == index)
}

/// The queue id a DSN got, or why it could not be sent.
enum Sent {
    Queued(QueueId),
    NotBuilt(String),
    NotQueued(String),
}

impl Inner {
    /// Builds and queues one report about `recipients` of `lease` (all of one action).
    async fn send_report(
        &self,
        lease: &Lease,
        original: &[u8],
        recipients: Vec<RecipientReport>,
    ) -> Sent {
        let env = &lease.envelope;
        let id = lease.id.to_string();
        let report = Report {
            reporting_mta: &self.hostname,
            queue_id: &id,
            envid: env.envid.as_deref(),
            arrival: lease.arrival,
            to: &env.sender,
            policy: &env.policy,
            original,
            recipients,
        };
        let bytes = match sealpost_bounce::build(&report) {
            Ok(b) => b,
            Err(e) => return Sent::NotBuilt(e.to_string()),
        };
        let dsn = Envelope {
            sender: String::new(),
            recipients: vec![RecipientSpec {
                address: env.sender.clone(),
                notify: None,
                orcpt: None,
            }],
            user: None,
            policy: env.policy.clone(),
            tags: Vec::new(),
            client_ip: None,
            ret: None,
            envid: None,
            smtputf8: !env.sender.is_ascii(),
            eight_bit: !bytes.is_ascii(),
            received_at: SystemTime::now(),
        };
        match self.queue.enqueue(dsn, bytes).await {
            Ok(dsn_id) => Sent::Queued(dsn_id),
            Err(e) => Sent::NotQueued(e.to_string()),
        }
    }

    /// Finishes the recipients that failed this round: one DSN for all of them (or a drop for
    /// a null sender), each audited; returns their outcomes.
    pub(crate) async fn bounce(
        &self,
        lease: &Lease,
        original: &[u8],
        failures: Vec<(usize, Failure)>,
    ) -> Vec<(usize, Outcome)> {
        if failures.is_empty() {
            return Vec::new();
        }
        let id = lease.id.to_string();
        let mut out = Vec::new();
        if lease.envelope.sender.is_empty() {
            for (index, f) in failures {
                self.audit(self.finished(Event::Dropped, lease, index, &f).detail(
                    "why",
                    "null sender: no DSN is sent for a message without a return path (no bounce loops)",
                ))
                .await;
                out.push((index, Outcome::Failed { reason: f.reason }));
            }
            tracing::warn!(queue_id = %id, recipients = out.len(), "null-sender message failed; dropped without a DSN");
            return out;
        }
        let now = SystemTime::now();
        let (reported, unreported): (Vec<_>, Vec<_>) = failures.into_iter().partition(|(i, _)| {
            wants(
                recipient(lease, *i).and_then(|r| r.notify.as_deref()),
                "FAILURE",
            )
        });
        for (index, f) in unreported {
            self.audit(
                self.finished(Event::Bounced, lease, index, &f)
                    .detail("dsn", "not_requested (NOTIFY)"),
            )
            .await;
            out.push((index, Outcome::Failed { reason: f.reason }));
        }
        if reported.is_empty() {
            return out;
        }
        let reports = reported
            .iter()
            .map(|(index, f)| RecipientReport {
                final_recipient: recipient(lease, *index)
                    .map(|r| r.address.clone())
                    .unwrap_or_default(),
                original_recipient: recipient(lease, *index).and_then(|r| r.orcpt.clone()),
                action: Action::Failed,
                status: f.status.clone(),
                remote_mta: f.remote_mta.clone(),
                diagnostic: Some(f.diagnostic.clone()),
                last_attempt: Some(now),
                will_retry_until: None,
                explanation: f.explanation.clone(),
            })
            .collect();
        match self.send_report(lease, original, reports).await {
            Sent::Queued(dsn) => {
                for (index, f) in reported {
                    self.audit(
                        self.finished(Event::Bounced, lease, index, &f)
                            .detail("dsn", dsn.to_string()),
                    )
                    .await;
                    out.push((index, Outcome::Failed { reason: f.reason }));
                }
                tracing::info!(queue_id = %id, dsn = %dsn, "DSN queued for the sender");
            }
            Sent::NotBuilt(why) => {
                for (index, f) in reported {
                    self.audit(
                        self.finished(Event::Dropped, lease, index, &f)
                            .detail("why", format!("no DSN could be built: {why}")),
                    )
                    .await;
                    out.push((index, Outcome::Failed { reason: f.reason }));
                }
                tracing::error!(queue_id = %id, error = %why, "cannot build a DSN; recipients dropped");
            }
            Sent::NotQueued(why) => {
                // Never lose the failure silently: keep the recipient and try again later.
                tracing::error!(queue_id = %id, error = %why, "cannot queue a DSN; recipients stay queued");
                for (index, f) in reported {
                    let reason = format!("4.3.0 cannot queue the DSN ({why}); after: {}", f.reason);
                    self.audit(
                        Record::new(Event::Deferred)
                            .queue_id(id.clone())
                            .recipient(
                                recipient(lease, index)
                                    .map(|r| r.address.clone())
                                    .unwrap_or_default(),
                            )
                            .detail("reason", reason.clone()),
                    )
                    .await;
                    out.push((index, Outcome::Deferred { reason }));
                }
            }
        }
        out
    }

    /// The audit record for a finished recipient: reason, status, remote MTA.
    fn finished(&self, event: Event, lease: &Lease, index: usize, f: &Failure) -> Record {
        let mut rec = Record::new(event)
            .queue_id(lease.id.to_string())
            .recipient(
                recipient(lease, index)
                    .map(|r| r.address.clone())
                    .unwrap_or_default(),
            )
            .detail("reason", f.reason.clone())
            .detail("status", f.status.clone());
        if let Some(mx) = &f.remote_mta {
            rec = rec.mx(mx.clone());
        }
        rec
    }

    /// Sends one delay notice for the recipients still waiting past `queue.delay_notice` that
    /// have not had one, and records that it went out.
    pub(crate) async fn delay_notices(
        &self,
        lease: &Lease,
        original: &[u8],
        results: &[(usize, Outcome)],
        evidence: &[(usize, Evidence)],
    ) {
        let Some(after) = self.delay_notice else {
            return;
        };
        let now = SystemTime::now();
        if lease.envelope.sender.is_empty() || now < lease.arrival + after {
            return;
        }
        let until = lease.arrival + self.queue.lifetime();
        let mut reports = Vec::new();
        let mut indices = Vec::new();
        for (index, outcome) in results {
            let reason = match outcome {
                Outcome::Deferred { reason } | Outcome::Held { reason, .. } => reason,
                Outcome::Delivered { .. } | Outcome::Failed { .. } => continue,
            };
            let Some(r) = recipient(lease, *index) else {
                continue;
            };
            if r.delay_notified || !wants(r.notify.as_deref(), "DELAY") {
                continue;
            }
            let ev = evidence
                .iter()
                .find(|(i, e)| i == index && !e.reason.is_accepting())
                .map(|(_, e)| e);
            let (status, remote_mta, diagnostic, explanation) = match ev {
                Some(e) => (
                    sealpost_bounce::status_for(e.reason, Action::Delayed).to_owned(),
                    Some(e.mx.clone()),
                    format!("x-sealpost; tls-verdict={}", e.reason),
                    sealpost_bounce::explain(e),
                ),
                None => (
                    enhanced_code(reason)
                        .filter(|c| c.starts_with('4'))
                        .unwrap_or("4.0.0")
                        .to_owned(),
                    None,
                    format!("x-sealpost; {}", without_code(reason)),
                    format!("the last attempt failed: {}", without_code(reason)),
                ),
            };
            reports.push(RecipientReport {
                final_recipient: r.address.clone(),
                original_recipient: r.orcpt.clone(),
                action: Action::Delayed,
                status,
                remote_mta,
                diagnostic: Some(diagnostic),
                last_attempt: Some(now),
                will_retry_until: Some(until),
                explanation,
            });
            indices.push(*index);
        }
        if reports.is_empty() {
            return;
        }
        let id = lease.id.to_string();
        match self.send_report(lease, original, reports).await {
            Sent::Queued(dsn) => {
                if let Err(e) = self
                    .queue
                    .mark_delay_notified(lease.id, indices.clone())
                    .await
                {
                    tracing::error!(queue_id = %id, error = %e, "cannot record that a delay notice was sent; it may be sent again");
                }
                for index in indices {
                    let address = recipient(lease, index)
                        .map(|r| r.address.clone())
                        .unwrap_or_default();
                    self.audit(
                        Record::new(Event::Deferred)
                            .queue_id(id.clone())
                            .recipient(address)
                            .detail("delay_notice", dsn.to_string()),
                    )
                    .await;
                }
                tracing::info!(queue_id = %id, dsn = %dsn, "delay notice queued for the sender");
            }
            Sent::NotBuilt(why) | Sent::NotQueued(why) => {
                tracing::error!(queue_id = %id, error = %why, "cannot send a delay notice; trying again next round");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::engine::Engine;
    use sealpost_queue::Queue;
    use std::time::Duration;

    /// An engine on a real queue and audit log in `dir`.
    fn engine(dir: &std::path::Path) -> (Engine, Queue, std::path::PathBuf) {
        crate::engine::test_engine::engine_in(dir, "", Duration::from_secs(60))
    }

    async fn leased(queue: &Queue, sender: &str, policy: &str) -> Lease {
        let env = crate::engine::test_engine::envelope(sender, policy);
        let body = b"Subject: secret subject\r\n\r\nsecret body\r\n".to_vec();
        queue.enqueue(env, body).await.unwrap();
        let mut leases = queue.lease_due(SystemTime::now(), 10).await.unwrap();
        assert_eq!(leases.len(), 1);
        leases.remove(0)
    }

    fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_bounce_queues_one_dsn_from_the_null_sender_under_the_same_policy() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, queue, audit_path) = engine(dir.path());
        let lease = leased(&queue, "app@clinic.test", "partner").await;
        let failure = Failure::from_reply("mx.b.test", "mx.b.test said: 550 5.1.1 no such user");
        let out = engine
            .inner()
            .bounce(
                &lease,
                b"Subject: secret subject\r\n\r\nsecret body\r\n",
                vec![(0, failure)],
            )
            .await;
        assert!(
            matches!(&out[..], [(0, Outcome::Failed { reason })] if reason.contains("550 5.1.1"))
        );
        engine.inner().audit_synced(lease.id).await;
        let lines = audit_lines(&audit_path);
        let bounced = lines.iter().find(|l| l["event"] == "bounced").unwrap();
        assert_eq!(bounced["detail"]["status"], "5.1.1");
        let dsn_id: QueueId = bounced["detail"]["dsn"].as_str().unwrap().parse().unwrap();
        let dsn = queue.show(dsn_id).await.unwrap().envelope;
        assert_eq!(dsn.sender, "");
        assert_eq!(dsn.recipients.len(), 1);
        assert_eq!(dsn.recipients[0].address, "app@clinic.test");
        assert_eq!(dsn.policy, "partner");
        assert_eq!(dsn.user, None);
        let body = String::from_utf8(queue.body(dsn_id).await.unwrap()).unwrap();
        assert!(body.contains("Status: 5.1.1") && body.contains("smtp; 550 5.1.1 no such user"));
        assert!(
            body.contains("Subject: secret subject"),
            "headers of the original"
        );
        assert!(!body.contains("secret body"), "never the body");
        // Nothing of the subject or body in the audit trail.
        let text = std::fs::read_to_string(&audit_path).unwrap();
        assert!(!text.contains("secret"), "{text}");
    }

    #[tokio::test]
    async fn a_null_sender_failure_is_dropped_and_no_dsn_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, queue, audit_path) = engine(dir.path());
        let lease = leased(&queue, "", "phi").await;
        let failure = Failure::local(
            "5.1.2 recipient domain b.test not found".into(),
            "words".into(),
        );
        let out = engine.inner().bounce(&lease, b"", vec![(0, failure)]).await;
        assert!(matches!(&out[..], [(0, Outcome::Failed { .. })]));
        engine.inner().audit_synced(lease.id).await;
        let lines = audit_lines(&audit_path);
        assert!(lines
            .iter()
            .any(|l| l["event"] == "dropped" && l["recipient"] == "pat@b.test"));
        assert!(!lines.iter().any(|l| l["event"] == "bounced"));
        assert_eq!(
            queue.list().await.unwrap().len(),
            1,
            "only the original, no DSN"
        );
    }

    #[test]
    fn enhanced_codes_are_found_after_a_reply_code_or_first() {
        assert_eq!(enhanced_code("550 5.1.1 no such user"), Some("5.1.1"));
        assert_eq!(enhanced_code("5.4.7 expired: x"), Some("5.4.7"));
        assert_eq!(enhanced_code("4.7.5 no MX passed"), Some("4.7.5"));
        assert_eq!(enhanced_code("550 no such user"), None);
        assert_eq!(enhanced_code("mx said: 550 5.1.1"), None);
        assert_eq!(enhanced_code("1.2.3 x"), None);
        assert_eq!(enhanced_code(""), None);
    }

    #[test]
    fn failures_carry_status_diagnostic_and_words() {
        let f = Failure::from_reply("mx.b.test", "mx.b.test said: 550 5.1.1 no such user here");
        assert_eq!(f.status, "5.1.1");
        assert_eq!(f.diagnostic, "smtp; 550 5.1.1 no such user here");
        assert_eq!(f.remote_mta.as_deref(), Some("mx.b.test"));
        let f = Failure::from_reply("mx.b.test", "mx.b.test said: 554 transaction failed");
        assert_eq!(f.status, "5.0.0");
        let f = Failure::local(
            "5.1.10 b.test publishes a null MX (RFC 7505): it accepts no mail".into(),
            "words".into(),
        );
        assert_eq!(f.status, "5.1.10");
        assert_eq!(
            f.diagnostic,
            "x-sealpost; b.test publishes a null MX (RFC 7505): it accepts no mail"
        );
    }

    #[test]
    fn notify_decides_which_reports_are_wanted() {
        assert!(wants(None, "FAILURE"));
        assert!(wants(Some("SUCCESS,failure"), "FAILURE"));
        assert!(!wants(Some("NEVER"), "FAILURE"));
        assert!(!wants(Some("FAILURE"), "DELAY"));
        assert!(wants(Some("FAILURE,DELAY"), "DELAY"));
    }
}
