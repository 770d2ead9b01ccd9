//! Turning a TLS verdict and its evidence into a sentence a sender understands, and a status code.

use crate::Action;
use sealpost_policy::{Evidence, TlsRequirement, Verdict};

/// The enhanced status code for a delivery that stopped at this verdict.
///
/// No or refused STARTTLS: X.7.10 (encryption needed); anything wrong with the TLS session or the
/// certificate: X.7.5 (cryptographic failure); a connection problem: X.4.1/X.4.2.
pub fn status_for(verdict: Verdict, action: Action) -> &'static str {
    let permanent = action == Action::Failed;
    match (verdict, permanent) {
        (Verdict::StarttlsNotOffered | Verdict::StarttlsRefused, true) => "5.7.10",
        (Verdict::StarttlsNotOffered | Verdict::StarttlsRefused, false) => "4.7.10",
        (Verdict::Timeout, true) => "5.4.1",
        (Verdict::Timeout, false) => "4.4.1",
        (Verdict::ConnectionLost, true) => "5.4.2",
        (Verdict::ConnectionLost, false) => "4.4.2",
        (Verdict::Verified | Verdict::EncryptedUnverified, true) => "5.0.0",
        (Verdict::Verified | Verdict::EncryptedUnverified, false) => "4.0.0",
        (_, true) => "5.7.5",
        (_, false) => "4.7.5",
    }
}

fn date_only(rfc3339: &str) -> &str {
    rfc3339.split('T').next().unwrap_or(rfc3339)
}

/// One sentence saying what the recipient's server did and why Sealpost did not deliver.
pub fn explain(e: &Evidence) -> String {
    let mx = &e.mx;
    let leaf = e.tls.as_ref().and_then(|t| t.leaf.as_ref());
    let what = match e.reason {
        Verdict::StarttlsNotOffered => format!("the recipient's server {mx} does not offer encryption (no STARTTLS)"),
        Verdict::StarttlsRefused => format!("the recipient's server {mx} refused to start encryption (STARTTLS)"),
        Verdict::ProtocolVersion => format!(
            "the recipient's server {mx} only speaks old TLS versions (1.0/1.1); TLS 1.2 or later is required"
        ),
        Verdict::NoSharedCipher => format!(
            "the recipient's server {mx} offers no encryption method approved by NIST SP 800-52 (AES-GCM with ECDHE on P-256/P-384)"
        ),
        Verdict::Expired => match leaf {
            Some(l) => format!(
                "the recipient's server {mx} presented a certificate that expired on {}",
                date_only(&l.not_after)
            ),
            None => format!("the recipient's server {mx} presented an expired certificate"),
        },
        Verdict::NotYetValid => match leaf {
            Some(l) => format!(
                "the recipient's server {mx} presented a certificate that is not valid before {}",
                date_only(&l.not_before)
            ),
            None => format!("the recipient's server {mx} presented a certificate that is not valid yet"),
        },
        Verdict::UnknownIssuer => match leaf {
            Some(l) if l.self_signed => format!(
                "the recipient's server {mx} presented a self-signed certificate ({}), which nobody vouches for",
                l.subject
            ),
            Some(l) => format!(
                "the recipient's server {mx} presented a certificate issued by \"{}\", which is not a trusted certificate authority",
                l.issuer
            ),
            None => format!("the recipient's server {mx} presented a certificate from an untrusted issuer"),
        },
        Verdict::NameMismatch => match leaf {
            Some(l) if !l.sans.is_empty() => format!(
                "the recipient's server {mx} presented a certificate for {} instead of {mx}",
                l.sans.join(", ")
            ),
            _ => format!("the recipient's server {mx} presented a certificate for another name"),
        },
        Verdict::WeakKey => format!(
            "the recipient's server {mx} presented a certificate with a weak key ({})",
            leaf.map(|l| l.key.as_str()).unwrap_or("unknown")
        ),
        Verdict::WeakSignature => format!(
            "the recipient's server {mx} presented a certificate signed with a weak algorithm ({})",
            leaf.map(|l| l.signature.as_str()).unwrap_or("unknown")
        ),
        Verdict::BadSignature => format!("the recipient's server {mx} presented a certificate whose signature does not verify"),
        Verdict::FingerprintMismatch => format!(
            "the recipient's server {mx} presented a certificate that is not the one pinned for this destination (SHA-256 {})",
            e.tls.as_ref().and_then(|t| t.chain_sha256.first()).map(String::as_str).unwrap_or("unknown")
        ),
        Verdict::HandshakeFailed => format!(
            "the TLS handshake with the recipient's server {mx} failed ({})",
            e.detail.as_deref().unwrap_or("no detail")
        ),
        Verdict::ConnectionLost => format!("the connection to the recipient's server {mx} was lost"),
        Verdict::Timeout => format!("the recipient's server {mx} did not answer in time"),
        Verdict::Verified | Verdict::EncryptedUnverified => {
            return format!("a secure connection to the recipient's server {mx} was established");
        }
    };
    let requirement = match e.requirement {
        TlsRequirement::Verified => {
            "requires a verified TLS connection (TLS 1.2 or later, NIST-approved encryption, and a certificate that is trusted, current and names the server)"
        }
        TlsRequirement::Encrypted => "requires an encrypted connection (TLS 1.2 or later with NIST-approved encryption)",
    };
    format!(
        "{what}; Sealpost did not deliver because the policy `{}` {requirement}",
        e.policy
    )
}
