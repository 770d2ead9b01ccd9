//! Semantic checks of a parsed configuration; each problem names its key.

use crate::model::{Config, FallbackStep, ListenerMode, TlsRequirement};
use crate::Problem;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

/// Most outbound connections `delivery.max_connections` (and its per-domain limit) may allow:
/// the engine holds up to six times as many messages, bodies included, in memory.
const MAX_DELIVERY_CONNECTIONS: usize = 10_000;

struct Collector<'a> {
    problems: Vec<Problem>,
    origin: &'a dyn Fn(&str) -> String,
}

impl Collector<'_> {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        let origin = (self.origin)(&key);
        self.problems.push(Problem {
            key,
            origin,
            message: message.into(),
        });
    }

    fn file_exists(&mut self, key: String, path: &Path) {
        if let Err(e) = std::fs::metadata(path) {
            self.add(key, format!("cannot read {}: {e}", path.display()));
        }
    }

    fn positive(&mut self, key: &str, d: Duration) {
        if d.is_zero() {
            self.add(key, "must be longer than zero");
        }
    }
}

/// True for a plausible DNS host name (letters, digits, hyphens, dots; no empty labels).
pub(crate) fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn sender_pattern_ok(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    match p.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && (local == "*" || !local.contains('*'))
                && (is_hostname(domain) || domain.strip_prefix("*.").is_some_and(is_hostname))
        }
        None => false,
    }
}

/// Returns every problem in `c`; empty means the config is usable.
pub(crate) fn validate(c: &Config, origin: &dyn Fn(&str) -> String) -> Vec<Problem> {
    let mut v = Collector {
        problems: Vec::new(),
        origin,
    };

    if !is_hostname(&c.server.hostname) {
        v.add(
            "server.hostname",
            format!(
                "`{}` is not a valid host name; expected e.g. \"relay.example.org\"",
                c.server.hostname
            ),
        );
    }
    if c.server.state_dir.as_os_str().is_empty() {
        v.add("server.state_dir", "must name a directory");
    }

    if c.listeners.is_empty() {
        v.add("listeners", "at least one [[listeners]] entry is needed");
    }
    let mut seen = BTreeSet::new();
    for (i, l) in c.listeners.iter().enumerate() {
        if !seen.insert(l.address) {
            v.add(
                format!("listeners[{i}].address"),
                format!("{} is used by two listeners", l.address),
            );
        }
        if l.mode != ListenerMode::Plain && !l.allow.is_empty() {
            v.add(
                format!("listeners[{i}].allow"),
                "only `plain` listeners take an allow list (TLS listeners require AUTH from everyone)",
            );
        }
        if let Some(p) = &l.policy {
            if !c.policies.contains_key(p) {
                v.add(
                    format!("listeners[{i}].policy"),
                    format!("no policy named `{p}` in [policies]"),
                );
            }
        }
    }
    if let Some(tls) = &c.tls {
        v.file_exists("tls.certificate".into(), &tls.certificate);
        v.file_exists("tls.private_key".into(), &tls.private_key);
    }

    let s = &c.submission;
    if s.max_connections == 0 {
        v.add("submission.max_connections", "must be at least 1");
    }
    if s.max_connections_per_ip == 0 {
        v.add("submission.max_connections_per_ip", "must be at least 1");
    }
    v.positive("submission.command_timeout", s.command_timeout.0);
    v.positive("submission.data_timeout", s.data_timeout.0);
    v.positive(
        "submission.tls_handshake_timeout",
        s.tls_handshake_timeout.0,
    );
    if s.max_auth_failures == 0 {
        v.add("submission.max_auth_failures", "must be at least 1");
    }
    if s.banner.contains(['\r', '\n']) {
        v.add("submission.banner", "must be one line");
    }

    let mut names = BTreeSet::new();
    for (i, u) in c.users.iter().enumerate() {
        if u.name.is_empty() || u.name.contains(|ch: char| ch.is_control()) {
            v.add(
                format!("users[{i}].name"),
                "must be a non-empty name without control characters",
            );
        }
        if !names.insert(u.name.as_str()) {
            v.add(
                format!("users[{i}].name"),
                format!("user `{}` is defined twice", u.name),
            );
        }
        match argon2::PasswordHash::new(&u.password_hash) {
            Ok(h) if h.algorithm.as_str() == "argon2id" => {}
            Ok(h) => v.add(
                format!("users[{i}].password_hash"),
                format!("uses `{}`; expected an argon2id hash from `sealpost user hash-password`", h.algorithm),
            ),
            Err(_) => v.add(
                format!("users[{i}].password_hash"),
                "is not a PHC string; expected \"$argon2id$v=19$...\" from `sealpost user hash-password`",
            ),
        }
        for (j, p) in u.allowed_senders.iter().enumerate() {
            if !sender_pattern_ok(p) {
                v.add(
                    format!("users[{i}].allowed_senders[{j}]"),
                    format!("`{p}` is not a sender pattern; expected \"*\", \"*@domain\", \"*@*.domain\" or \"name@domain\""),
                );
            }
        }
        if let Some(p) = &u.policy {
            if !c.policies.contains_key(p) {
                v.add(
                    format!("users[{i}].policy"),
                    format!("no policy named `{p}` in [policies]"),
                );
            }
        }
        if let Some(r) = u.max_send_rate {
            if !(r.is_finite() && r > 0.0) {
                v.add(
                    format!("users[{i}].max_send_rate"),
                    "must be a positive number of recipients per second",
                );
            }
        }
    }

    let q = &c.queue;
    if q.max_message_size.0 < 1024 || q.max_message_size.0 > 1 << 30 {
        v.add(
            "queue.max_message_size",
            "must be between 1KB and 1GiB (SES allows 40MB)",
        );
    }
    if q.max_recipients == 0 || q.max_recipients > 1000 {
        v.add(
            "queue.max_recipients",
            "must be between 1 and 1000 (SES allows 50)",
        );
    }
    if q.retry.is_empty() {
        v.add(
            "queue.retry",
            "needs at least one interval, e.g. [\"5m\", \"30m\", \"1h\"]",
        );
    }
    for (i, d) in q.retry.iter().enumerate() {
        v.positive(&format!("queue.retry[{i}]"), d.0);
    }
    v.positive("queue.lifetime", q.lifetime.0);
    if let Some(d) = q.delay_notice {
        v.positive("queue.delay_notice", d.0);
        if d.0 >= q.lifetime.0 {
            v.add(
                "queue.delay_notice",
                "must be shorter than queue.lifetime (the message expires and bounces first)",
            );
        }
    }
    for (i, p) in q.previous_key_files.iter().enumerate() {
        v.file_exists(format!("queue.previous_key_files[{i}]"), p);
    }

    for (i, p) in c.delivery.trust_anchors.iter().enumerate() {
        v.file_exists(format!("delivery.trust_anchors[{i}]"), p);
    }
    if c.delivery.port == 0 {
        v.add("delivery.port", "must be a TCP port (1-65535)");
    }
    for (key, n) in [
        ("delivery.max_connections", c.delivery.max_connections),
        (
            "delivery.max_connections_per_domain",
            c.delivery.max_connections_per_domain,
        ),
    ] {
        if n == 0 {
            v.add(key, "must be at least 1");
        } else if n > MAX_DELIVERY_CONNECTIONS {
            v.add(
                key,
                format!("must be at most {MAX_DELIVERY_CONNECTIONS} (each connection holds messages and their bodies in memory)"),
            );
        }
    }
    v.positive("delivery.connect_timeout", c.delivery.connect_timeout.0);
    v.positive("dns.timeout", c.dns.timeout.0);

    for (name, p) in &c.policies {
        let key = format!("policies.{name}");
        for (j, pin) in p.pins.iter().enumerate() {
            if pin.len() != 64 || hex::decode(pin).is_err() {
                v.add(
                    format!("{key}.pins[{j}]"),
                    "must be 64 hex digits (SHA-256 of the leaf certificate's DER)",
                );
            }
        }
        if p.on_failure.is_empty() {
            v.add(
                format!("{key}.on_failure"),
                "needs at least one step, e.g. [\"hold:4h\", \"bounce\"]",
            );
        }
        for (j, step) in p.on_failure.iter().enumerate() {
            let k = format!("{key}.on_failure[{j}]");
            match step {
                FallbackStep::Hold(d) => v.positive(&k, *d),
                FallbackStep::Bounce => {
                    if j + 1 != p.on_failure.len() {
                        v.add(k, "`bounce` finishes the recipient, so it must be the last step");
                    }
                }
                FallbackStep::Smarthost(n) => {
                    if !c.smarthosts.contains_key(n) {
                        v.add(k, format!("no smarthost named `{n}` in [smarthosts]"));
                    }
                }
                FallbackStep::Portal => v.add(
                    k,
                    "the secure pickup portal is not available in this version; use \"hold:…\", \"bounce\" or \"smarthost:…\"",
                ),
            }
        }
    }
    if c.policies
        .get("phi")
        .is_some_and(|p| p.tls != TlsRequirement::Verified)
    {
        v.add(
            "policies.phi.tls",
            "the default `phi` policy must be \"verified\"",
        );
    }

    for (domain, o) in &c.domains {
        if !is_hostname(domain) {
            v.add(format!("domains.{domain}"), "is not a domain name");
        }
        if !c.policies.contains_key(&o.policy) {
            v.add(
                format!("domains.{domain}.policy"),
                format!("no policy named `{}` in [policies]", o.policy),
            );
        }
    }

    for (name, h) in &c.smarthosts {
        let key = format!("smarthosts.{name}");
        if !is_hostname(&h.host) {
            v.add(
                format!("{key}.host"),
                format!("`{}` is not a host name", h.host),
            );
        }
        if h.port == 0 {
            v.add(format!("{key}.port"), "must be a TCP port (1-65535)");
        }
        if h.mode == ListenerMode::Plain {
            v.add(
                format!("{key}.mode"),
                "a smarthost needs TLS: \"starttls\" or \"implicit\"",
            );
        }
        if h.username.is_some() != h.password_file.is_some() {
            v.add(
                format!("{key}.password_file"),
                "`username` and `password_file` go together",
            );
        }
        if let Some(p) = &h.password_file {
            v.file_exists(format!("{key}.password_file"), p);
        }
        if let Some(p) = &h.policy {
            match c.policies.get(p) {
                None => v.add(
                    format!("{key}.policy"),
                    format!("no policy named `{p}` in [policies]"),
                ),
                Some(pol) if pol.tls != TlsRequirement::Verified => v.add(
                    format!("{key}.policy"),
                    format!("policy `{p}` must be \"verified\" for a smarthost"),
                ),
                Some(_) => {}
            }
        }
    }

    if let Some(http) = c.admin.http {
        if c.listeners.iter().any(|l| l.address == http) {
            v.add("admin.http", format!("{http} is already an SMTP listener"));
        }
    }

    if c.audit.rotate_size.0 < 64 * 1024 {
        v.add("audit.rotate_size", "must be at least 64KB");
    }

    v.problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        assert!(is_hostname("relay.example.org"));
        assert!(is_hostname("localhost"));
        assert!(!is_hostname("-bad.example"));
        assert!(!is_hostname("a..b"));
        assert!(!is_hostname("sp ace"));
    }

    #[test]
    fn sender_patterns() {
        for ok in [
            "*",
            "*@clinic.example",
            "billing@clinic.example",
            "*@*.clinic.example",
        ] {
            assert!(sender_pattern_ok(ok), "{ok}");
        }
        for bad in ["", "clinic.example", "bil*ing@x.org", "*@", "@x.org"] {
            assert!(!sender_pattern_ok(bad), "{bad}");
        }
    }
}
