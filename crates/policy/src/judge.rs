//! The decision: does this evidence let mail be sent under this policy?

use crate::profile::NIST_VERSIONS;
use crate::{Evidence, PolicySpec, TlsRequirement, Verdict, NIST_CIPHER_SUITES, NIST_GROUPS};

/// A peer that passed the policy; the only key that unlocks MAIL/RCPT/DATA.
#[derive(Debug, Clone)]
pub struct AcceptedPeer {
    evidence: Evidence,
    policy: String,
}

impl AcceptedPeer {
    /// The evidence, with its final verdict (`verified` or `encrypted_unverified`).
    pub fn evidence(&self) -> &Evidence {
        &self.evidence
    }

    /// The name of the policy the peer passed.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// The final verdict.
    pub fn verdict(&self) -> Verdict {
        self.evidence.reason
    }

    /// Gives up the evidence (for the audit log).
    pub fn into_evidence(self) -> Evidence {
        self.evidence
    }
}

/// A peer that failed the policy, with the verdict and the evidence (its reason set to it).
#[derive(Debug, Clone)]
pub struct Rejected {
    /// Why the peer was rejected.
    pub verdict: Verdict,
    /// What was seen, with `reason` = `verdict` (boxed: evidence is large).
    pub evidence: Box<Evidence>,
}

/// Decides from the evidence alone whether mail may be sent under `spec`.
///
/// The decision is re-derived from the recorded facts (version, suite, group, certificate
/// check, pins), so evidence from a connector of another policy cannot pass a stricter one.
pub fn judge(spec: &PolicySpec, evidence: Evidence) -> Result<AcceptedPeer, Rejected> {
    match decide(spec, &evidence) {
        Ok(verdict) => Ok(AcceptedPeer {
            evidence: evidence.with_verdict(verdict, None),
            policy: spec.name.clone(),
        }),
        Err((verdict, detail)) => Err(Rejected {
            verdict,
            evidence: Box::new(evidence.with_verdict(verdict, detail)),
        }),
    }
}

type Decision = Result<Verdict, (Verdict, Option<String>)>;

fn decide(spec: &PolicySpec, evidence: &Evidence) -> Decision {
    if !evidence.reason.is_accepting() {
        return Err((evidence.reason, None));
    }
    let Some(tls) = evidence.tls.as_ref() else {
        return Err((
            Verdict::HandshakeFailed,
            Some("no TLS handshake was recorded".to_owned()),
        ));
    };
    let allowed =
        |value: &Option<String>, set: &[&str]| value.as_deref().is_some_and(|v| set.contains(&v));
    if !allowed(&tls.version, NIST_VERSIONS) {
        return Err((
            Verdict::ProtocolVersion,
            Some(format!(
                "protocol version {:?} is not TLS 1.2 or 1.3",
                tls.version
            )),
        ));
    }
    if !allowed(&tls.cipher, NIST_CIPHER_SUITES) {
        return Err((
            Verdict::NoSharedCipher,
            Some(format!(
                "cipher suite {:?} is not in the NIST profile",
                tls.cipher
            )),
        ));
    }
    if !allowed(&tls.group, NIST_GROUPS) {
        return Err((
            Verdict::NoSharedCipher,
            Some(format!(
                "key exchange group {:?} is not in the NIST profile",
                tls.group
            )),
        ));
    }
    if spec.requirement == TlsRequirement::Verified {
        match tls.certificate_check {
            Some(Verdict::Verified) => {}
            Some(failed) => return Err((failed, tls.certificate_detail.clone())),
            None => {
                return Err((
                    Verdict::HandshakeFailed,
                    Some("no certificate check was recorded".to_owned()),
                ))
            }
        }
    }
    if !spec.pin_allows(tls.chain_sha256.first().map(String::as_str)) {
        return Err((
            Verdict::FingerprintMismatch,
            Some("leaf fingerprint matches none of the policy's pins".to_owned()),
        ));
    }
    Ok(match spec.requirement {
        TlsRequirement::Verified => Verdict::Verified,
        TlsRequirement::Encrypted => Verdict::EncryptedUnverified,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TlsFacts;

    fn good(requirement: TlsRequirement, reason: Verdict, check: Verdict) -> Evidence {
        Evidence {
            mx: "mx.example.org".into(),
            ip: None,
            policy: "p".into(),
            requirement,
            tls: Some(TlsFacts {
                version: Some("TLSv1.3".into()),
                cipher: Some("TLS13_AES_128_GCM_SHA256".into()),
                group: Some("secp256r1".into()),
                chain_sha256: vec!["11".repeat(32)],
                leaf: None,
                certificate_check: Some(check),
                certificate_detail: None,
            }),
            verified: reason == Verdict::Verified,
            reason,
            detail: None,
        }
    }

    #[test]
    fn verified_evidence_passes_a_verified_policy() {
        let spec = PolicySpec::new("phi", TlsRequirement::Verified);
        let peer = judge(
            &spec,
            good(
                TlsRequirement::Verified,
                Verdict::Verified,
                Verdict::Verified,
            ),
        )
        .unwrap();
        assert_eq!(peer.verdict(), Verdict::Verified);
        assert!(peer.evidence().verified);
        assert_eq!(peer.policy(), "phi");
    }

    #[test]
    fn encrypted_evidence_cannot_pass_a_verified_policy() {
        let spec = PolicySpec::new("phi", TlsRequirement::Verified);
        let ev = good(
            TlsRequirement::Encrypted,
            Verdict::EncryptedUnverified,
            Verdict::UnknownIssuer,
        );
        let rejected = judge(&spec, ev).unwrap_err();
        assert_eq!(rejected.verdict, Verdict::UnknownIssuer);
        assert_eq!(rejected.evidence.reason, Verdict::UnknownIssuer);
        assert!(!rejected.evidence.verified);
    }

    #[test]
    fn encrypted_policy_accepts_as_encrypted_unverified_even_with_a_good_chain() {
        let spec = PolicySpec::new("bulk", TlsRequirement::Encrypted);
        let peer = judge(
            &spec,
            good(
                TlsRequirement::Verified,
                Verdict::Verified,
                Verdict::Verified,
            ),
        )
        .unwrap();
        assert_eq!(peer.verdict(), Verdict::EncryptedUnverified);
        assert!(!peer.evidence().verified);
    }

    #[test]
    fn failures_and_out_of_profile_parameters_are_rejected() {
        let spec = PolicySpec::new("phi", TlsRequirement::Verified);
        let mut ev = good(TlsRequirement::Verified, Verdict::Expired, Verdict::Expired);
        ev.verified = false;
        assert_eq!(judge(&spec, ev).unwrap_err().verdict, Verdict::Expired);

        let mut ev = good(
            TlsRequirement::Verified,
            Verdict::Verified,
            Verdict::Verified,
        );
        ev.tls.as_mut().unwrap().version = Some("TLSv1.1".into());
        assert_eq!(
            judge(&spec, ev).unwrap_err().verdict,
            Verdict::ProtocolVersion
        );

        let mut ev = good(
            TlsRequirement::Verified,
            Verdict::Verified,
            Verdict::Verified,
        );
        ev.tls.as_mut().unwrap().cipher = Some("TLS13_CHACHA20_POLY1305_SHA256".into());
        assert_eq!(
            judge(&spec, ev).unwrap_err().verdict,
            Verdict::NoSharedCipher
        );

        let mut ev = good(
            TlsRequirement::Verified,
            Verdict::Verified,
            Verdict::Verified,
        );
        ev.tls.as_mut().unwrap().group = Some("X25519".into());
        assert_eq!(
            judge(&spec, ev).unwrap_err().verdict,
            Verdict::NoSharedCipher
        );

        let mut ev = good(
            TlsRequirement::Verified,
            Verdict::Verified,
            Verdict::Verified,
        );
        ev.tls = None;
        assert_eq!(
            judge(&spec, ev).unwrap_err().verdict,
            Verdict::HandshakeFailed
        );
    }

    #[test]
    fn pins_are_rechecked_by_the_judge() {
        let mut spec = PolicySpec::new("phi", TlsRequirement::Verified);
        spec.pins.push([0x22; 32]);
        let ev = good(
            TlsRequirement::Verified,
            Verdict::Verified,
            Verdict::Verified,
        );
        assert_eq!(
            judge(&spec, ev.clone()).unwrap_err().verdict,
            Verdict::FingerprintMismatch
        );
        spec.pins.push([0x11; 32]);
        assert!(judge(&spec, ev).is_ok());
    }
}
