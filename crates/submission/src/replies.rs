//! Replies whose exact text SES clients may parse.

use sealpost_smtp::{EnhancedStatus as S, Reply};

/// `250 2.0.0 Ok`.
pub fn ok() -> Reply {
    Reply::new(250, Some(S::OK), "Ok")
}

/// SES's refusal of an unverified identity, naming the identities that failed.
pub fn not_verified(identities: &[String]) -> Reply {
    let list: Vec<String> = identities
        .iter()
        .map(|a| a.chars().filter(|c| !c.is_control()).take(256).collect())
        .collect();
    Reply::new(
        554,
        Some(S::NOT_AUTHORIZED),
        &format!(
            "Message rejected: Email address is not verified. The following identities failed the check: {}",
            list.join(", ")
        ),
    )
}

/// `421 4.7.0 Too many concurrent SMTP connections` (SES's text).
pub fn too_many_connections() -> Reply {
    Reply::new(
        421,
        Some(S::TEMP_SECURITY),
        "Too many concurrent SMTP connections",
    )
}

/// Refusal of a client outside a plain listener's allow list.
pub fn access_denied(hostname: &str) -> Reply {
    Reply::new(
        554,
        Some(S::NOT_AUTHORIZED),
        &format!("{hostname} Access denied: plain SMTP is only for allow-listed networks; use STARTTLS or implicit TLS with AUTH"),
    )
}
