//! Serialisable envelope and per-recipient state (stored encrypted).

use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One envelope recipient with its DSN parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientSpec {
    /// Forward-path address.
    pub address: String,
    /// DSN `NOTIFY=` value, if given.
    pub notify: Option<String>,
    /// DSN `ORCPT=` value, if given.
    pub orcpt: Option<String>,
}

/// The SMTP envelope and submission facts of one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Reverse-path, "" for the null sender.
    pub sender: String,
    /// Envelope recipients in RCPT order.
    pub recipients: Vec<RecipientSpec>,
    /// Authenticated user.
    pub user: Option<String>,
    /// Policy name chosen at submission.
    pub policy: String,
    /// Message tags (X-SES-MESSAGE-TAGS).
    pub tags: Vec<(String, String)>,
    /// Submitting client's address.
    pub client_ip: Option<IpAddr>,
    /// DSN `RET=` value.
    pub ret: Option<String>,
    /// DSN `ENVID=` value.
    pub envid: Option<String>,
    /// SMTPUTF8 was requested.
    pub smtputf8: bool,
    /// BODY=8BITMIME was requested.
    pub eight_bit: bool,
    /// When the submission server received the message.
    pub received_at: SystemTime,
}

/// Delivery state of one recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientState {
    /// Not attempted yet; due now.
    Pending,
    /// Leased by a delivery worker until `lease_until`.
    InFlight {
        /// When the lease expires and the recipient is due again.
        lease_until: SystemTime,
    },
    /// Delivered (final).
    Delivered,
    /// Temporarily failed; due again at `next_attempt`.
    Deferred {
        /// Attempts made so far.
        attempts: u32,
        /// When the next attempt is due.
        next_attempt: SystemTime,
        /// The last error.
        last_error: String,
    },
    /// Diverted: waiting for fallback step `step`, due again at `until`.
    Held {
        /// When the recipient is due again.
        until: SystemTime,
        /// The fallback step to run next.
        step: u32,
        /// Why it was diverted.
        reason: String,
    },
    /// Held by an administrator: never due until released.
    AdminHold,
    /// Failed (final): bounced or dropped.
    Failed {
        /// Why.
        reason: String,
    },
}

impl RecipientState {
    /// Whether this state is final (Delivered or Failed).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            RecipientState::Delivered | RecipientState::Failed { .. }
        )
    }
}

/// Stored state of one recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecipientRecord {
    pub(crate) state: RecipientState,
    pub(crate) attempts: u32,
    pub(crate) last_error: Option<String>,
    /// The state to return to after a lease (InFlight) or an admin hold.
    pub(crate) resume: Option<RecipientState>,
    /// A delay notice was sent for this recipient (absent in records from older versions).
    #[serde(default)]
    pub(crate) delay_notified: bool,
}

/// The stored (encrypted) record of one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MessageRecord {
    pub(crate) envelope: Envelope,
    pub(crate) arrival: SystemTime,
    pub(crate) size: u64,
    pub(crate) recipients: Vec<RecipientRecord>,
}

impl MessageRecord {
    /// A new record with every recipient pending.
    pub(crate) fn new(envelope: Envelope, arrival: SystemTime, size: u64) -> MessageRecord {
        let recipients = envelope
            .recipients
            .iter()
            .map(|_| RecipientRecord {
                state: RecipientState::Pending,
                attempts: 0,
                last_error: None,
                resume: None,
                delay_notified: false,
            })
            .collect();
        MessageRecord {
            envelope,
            arrival,
            size,
            recipients,
        }
    }

    /// Leases until `until` every recipient due at `now_ms` (as `lease_due` does, and at enqueue
    /// for a message handed straight to delivery); `None` if none is due.
    pub(crate) fn lease(
        &mut self,
        id: crate::QueueId,
        now_ms: u64,
        until: SystemTime,
    ) -> Option<crate::Lease> {
        let mut recipients = Vec::new();
        for (index, (rcpt, spec)) in self
            .recipients
            .iter_mut()
            .zip(self.envelope.recipients.iter())
            .enumerate()
        {
            let due = crate::schedule::recipient_due(&rcpt.state, self.arrival)
                .map(crate::schedule::to_ms);
            if !matches!(due, Some(d) if d <= now_ms) {
                continue;
            }
            let previous = match &rcpt.state {
                RecipientState::InFlight { .. } => {
                    rcpt.resume.clone().unwrap_or(RecipientState::Pending)
                }
                other => other.clone(),
            };
            rcpt.state = RecipientState::InFlight { lease_until: until };
            rcpt.resume = Some(previous.clone());
            recipients.push(crate::LeasedRecipient {
                index,
                address: spec.address.clone(),
                notify: spec.notify.clone(),
                orcpt: spec.orcpt.clone(),
                attempts: rcpt.attempts,
                last_error: rcpt.last_error.clone(),
                delay_notified: rcpt.delay_notified,
                previous,
            });
        }
        if recipients.is_empty() {
            return None;
        }
        Some(crate::Lease {
            id,
            envelope: self.envelope.clone(),
            arrival: self.arrival,
            recipients,
        })
    }

    /// Whether every recipient is final.
    pub(crate) fn all_final(&self) -> bool {
        self.recipients.iter().all(|r| r.state.is_final())
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<MessageRecord, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
