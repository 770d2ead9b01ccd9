//! The audit record a caller hands to [`crate::AuditLog::record`]: what happened and to whom.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The kind of decision or action an audit record documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A client failed SMTP authentication.
    AuthFailed,
    /// A message was accepted and committed to the queue (the 250 was about to be sent).
    Accepted,
    /// One delivery attempt to one MX host, with its TLS evidence.
    Attempt,
    /// A recipient was delivered.
    Delivered,
    /// A recipient was deferred for a later retry.
    Deferred,
    /// A recipient was diverted to a fallback step (hold, smarthost, portal).
    Diverted,
    /// A recipient was bounced and a DSN generated.
    Bounced,
    /// A message reached the end of its queue lifetime.
    Expired,
    /// A message was dropped without a bounce (for example a failed null-sender message).
    Dropped,
    /// A message was set aside for manual inspection.
    Quarantined,
    /// An administrator acted on the queue or the relay.
    Admin,
    /// The configuration was (re)loaded.
    ConfigReloaded,
    /// The relay started.
    Started,
    /// The relay stopped.
    Stopped,
}

impl Event {
    /// The snake_case name used in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::AuthFailed => "auth_failed",
            Event::Accepted => "accepted",
            Event::Attempt => "attempt",
            Event::Delivered => "delivered",
            Event::Deferred => "deferred",
            Event::Diverted => "diverted",
            Event::Bounced => "bounced",
            Event::Expired => "expired",
            Event::Dropped => "dropped",
            Event::Quarantined => "quarantined",
            Event::Admin => "admin",
            Event::ConfigReloaded => "config_reloaded",
            Event::Started => "started",
            Event::Stopped => "stopped",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audit fact before it is sealed into the chain (the log adds `seq`, `ts`, `prev`, `hash`).
///
/// PHI hygiene: this type deliberately has no field for a message's subject, body or attachment
/// names, and none may be added. Callers must not smuggle such content into `detail` either:
/// `detail` is for sizes, counts, policy names, fallback steps, reasons and remote SMTP replies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// What happened.
    pub event: Event,
    /// The queue id of the message concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    /// The authenticated (or attempted) submission user, or the administrator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The submitting client's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    /// The envelope recipient concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// The MX (or smarthost) host name of a delivery attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx: Option<String>,
    /// The IP address connected to for a delivery attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// The TLS evidence of a delivery attempt, already serialised by the policy crate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Json>,
    /// Event-specific facts (sizes, counts, policy, step, reason, remote reply, admin action).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub detail: Map<String, Value>,
}

/// A JSON value serialised once, for a fact many records repeat (a connection's TLS evidence):
/// cloning shares the text, and a record writes it as it is.
#[derive(Debug, Clone)]
pub struct Json(Arc<RawValue>);

impl Json {
    /// `value` as a record would write it; `null` if it cannot be serialised.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Json {
        // through a `Value`, so the bytes are the same as a `Value` field's (object keys sorted)
        serde_json::to_value(value)
            .map(Json::from)
            .unwrap_or_else(|_| Json::from(Value::Null))
    }

    /// The serialised text.
    pub fn text(&self) -> &str {
        self.0.get()
    }
}

impl From<Value> for Json {
    fn from(value: Value) -> Json {
        // a `Value` always serialises (its keys are strings); `null` keeps this total
        Json(Arc::from(
            serde_json::value::to_raw_value(&value).unwrap_or_default(),
        ))
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Json, D::Error> {
        let raw: Box<RawValue> = Deserialize::deserialize(deserializer)?;
        Ok(Json(Arc::from(raw)))
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Json) -> bool {
        self.text() == other.text()
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl Record {
    /// A record of `event` with no optional facts set.
    pub fn new(event: Event) -> Record {
        Record {
            event,
            queue_id: None,
            user: None,
            client_ip: None,
            recipient: None,
            mx: None,
            ip: None,
            tls: None,
            detail: Map::new(),
        }
    }

    /// Sets the queue id.
    pub fn queue_id(mut self, queue_id: impl Into<String>) -> Record {
        self.queue_id = Some(queue_id.into());
        self
    }

    /// Sets the user (submission account or administrator).
    pub fn user(mut self, user: impl Into<String>) -> Record {
        self.user = Some(user.into());
        self
    }

    /// Sets the submitting client's IP address.
    pub fn client_ip(mut self, client_ip: IpAddr) -> Record {
        self.client_ip = Some(client_ip);
        self
    }

    /// Sets the envelope recipient.
    pub fn recipient(mut self, recipient: impl Into<String>) -> Record {
        self.recipient = Some(recipient.into());
        self
    }

    /// Sets the MX or smarthost host name.
    pub fn mx(mut self, mx: impl Into<String>) -> Record {
        self.mx = Some(mx.into());
        self
    }

    /// Sets the remote IP address of a delivery attempt.
    pub fn ip(mut self, ip: IpAddr) -> Record {
        self.ip = Some(ip);
        self
    }

    /// Sets the serialised TLS evidence.
    pub fn tls(mut self, tls: impl Into<Json>) -> Record {
        self.tls = Some(tls.into());
        self
    }

    /// Adds (or replaces) one event-specific fact in `detail`.
    pub fn detail(mut self, key: impl Into<String>, value: impl Into<Value>) -> Record {
        self.detail.insert(key.into(), value.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_snake_case() {
        let all = [
            (Event::AuthFailed, "auth_failed"),
            (Event::Accepted, "accepted"),
            (Event::Attempt, "attempt"),
            (Event::Delivered, "delivered"),
            (Event::Deferred, "deferred"),
            (Event::Diverted, "diverted"),
            (Event::Bounced, "bounced"),
            (Event::Expired, "expired"),
            (Event::Dropped, "dropped"),
            (Event::Quarantined, "quarantined"),
            (Event::Admin, "admin"),
            (Event::ConfigReloaded, "config_reloaded"),
            (Event::Started, "started"),
            (Event::Stopped, "stopped"),
        ];
        for (event, name) in all {
            assert_eq!(serde_json::to_value(event).unwrap(), Value::from(name));
            assert_eq!(event.as_str(), name);
            let back: Event = serde_json::from_value(Value::from(name)).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn builder_sets_fields() {
        let rec = Record::new(Event::Accepted)
            .queue_id("q1")
            .user("billing-app")
            .client_ip("192.0.2.1".parse().unwrap())
            .recipient("a@example.org")
            .mx("mx.example.org")
            .ip("2001:db8::1".parse().unwrap())
            .tls(serde_json::json!({"version": "TLSv1_3"}))
            .detail("size", 123)
            .detail("policy", "phi");
        assert_eq!(rec.queue_id.as_deref(), Some("q1"));
        assert_eq!(rec.user.as_deref(), Some("billing-app"));
        assert_eq!(rec.client_ip, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(rec.recipient.as_deref(), Some("a@example.org"));
        assert_eq!(rec.mx.as_deref(), Some("mx.example.org"));
        assert_eq!(rec.ip, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(
            rec.tls.as_ref().map(Json::text),
            Some(r#"{"version":"TLSv1_3"}"#)
        );
        assert_eq!(rec.detail.get("size"), Some(&Value::from(123)));
        assert_eq!(rec.detail.get("policy"), Some(&Value::from("phi")));
    }
}
