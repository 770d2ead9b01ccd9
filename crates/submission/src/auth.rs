//! SMTP AUTH: credential decoding (PLAIN, LOGIN), argon2id verification, sender patterns.

use argon2::password_hash::Output;
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use base64::Engine;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Why an AUTH exchange could not be completed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthDecodeError {
    /// The client's response is not valid base64.
    #[error("cannot decode base64 response")]
    Base64,
    /// The decoded PLAIN message does not have three NUL-separated fields.
    #[error("malformed PLAIN response")]
    Malformed,
    /// The decoded fields are not UTF-8.
    #[error("credentials are not UTF-8")]
    Utf8,
}

/// Decodes one base64 line of a SASL exchange.
pub fn decode_b64(line: &str) -> Result<Vec<u8>, AuthDecodeError> {
    base64::engine::general_purpose::STANDARD
        .decode(line.trim())
        .map_err(|_| AuthDecodeError::Base64)
}

/// Decodes a SASL PLAIN response into (authcid, password); authzid must be empty or equal authcid.
pub fn decode_plain(line: &str) -> Result<(String, String), AuthDecodeError> {
    let raw = decode_b64(line)?;
    let mut parts = raw.split(|b| *b == 0);
    let (Some(authz), Some(authc), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthDecodeError::Malformed);
    };
    let authz = std::str::from_utf8(authz).map_err(|_| AuthDecodeError::Utf8)?;
    let authc = std::str::from_utf8(authc).map_err(|_| AuthDecodeError::Utf8)?;
    let pass = std::str::from_utf8(pass).map_err(|_| AuthDecodeError::Utf8)?;
    if !authz.is_empty() && authz != authc {
        // Acting for another identity is not supported: treat as bad credentials.
        return Err(AuthDecodeError::Malformed);
    }
    Ok((authc.to_string(), pass.to_string()))
}

/// A sender pattern from `allowed_senders`: `*`, `*@domain`, `*@*.domain` or an exact address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderPattern {
    /// Any sender.
    Any,
    /// Any local part at exactly this domain (lowercase).
    Domain(String),
    /// Any local part at a subdomain of this domain (lowercase).
    Subdomain(String),
    /// Exactly this address (domain compared case-insensitively, local part exactly).
    Address(String, String),
}

impl SenderPattern {
    /// Parses a pattern already checked by the config validation.
    pub fn parse(p: &str) -> SenderPattern {
        if p == "*" {
            return SenderPattern::Any;
        }
        match p.rsplit_once('@') {
            Some(("*", d)) => match d.strip_prefix("*.") {
                Some(sub) => SenderPattern::Subdomain(sub.to_ascii_lowercase()),
                None => SenderPattern::Domain(d.to_ascii_lowercase()),
            },
            Some((l, d)) => SenderPattern::Address(l.to_string(), d.to_ascii_lowercase()),
            None => SenderPattern::Address(p.to_string(), String::new()),
        }
    }

    /// True if `address` (local@domain) matches.
    pub fn matches(&self, address: &str) -> bool {
        let Some((local, domain)) = address.rsplit_once('@') else {
            return false;
        };
        let domain = domain.to_ascii_lowercase();
        match self {
            SenderPattern::Any => true,
            SenderPattern::Domain(d) => domain == *d,
            SenderPattern::Subdomain(d) => domain
                .strip_suffix(d.as_str())
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
            SenderPattern::Address(l, d) => local == l && domain == *d,
        }
    }
}

/// One configured SMTP credential, ready for verification.
#[derive(Debug, Clone)]
pub struct UserEntry {
    /// User name.
    pub name: String,
    password_hash: String,
    /// Allowed senders; empty allows any.
    pub allowed: Vec<SenderPattern>,
    /// Default policy name.
    pub policy: String,
    /// Recipients per second, if limited.
    pub max_send_rate: Option<f64>,
}

impl UserEntry {
    /// True if this user may send as `address` (envelope sender or From).
    pub fn may_send_as(&self, address: &str) -> bool {
        self.allowed.is_empty() || self.allowed.iter().any(|p| p.matches(address))
    }
}

/// The configured users, by name.
#[derive(Debug, Clone, Default)]
pub struct Users {
    by_name: HashMap<String, UserEntry>,
    /// Argon2 working memory, reused across verifications.
    ///
    /// Allocating ~19 MiB per AUTH on whichever blocking thread ran it left glibc holding one
    /// arena per thread: 50 concurrent logins kept ~680 MB resident. Callers bound concurrency,
    /// so this holds as many buffers as verifications ever ran at once.
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
}

/// Largest argon2 memory a configured hash may ask for (1 GiB, in 1 KiB blocks).
const MAX_BLOCKS: usize = 1 << 20;

/// A hash used to spend the same time on unknown user names as on known ones.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$xqddkAneAAkPHdk9q4OcQQ$3UjyZkIDoWnaglX2X7o0qPHm2jKnxE/t9WNtvcjdWFM";

impl Users {
    /// Builds the table from the configuration.
    pub fn from_config(config: &sealpost_config::Config) -> Users {
        let by_name = config
            .users
            .iter()
            .map(|u| {
                (
                    u.name.clone(),
                    UserEntry {
                        name: u.name.clone(),
                        password_hash: u.password_hash.clone(),
                        allowed: u
                            .allowed_senders
                            .iter()
                            .map(|p| SenderPattern::parse(p))
                            .collect(),
                        policy: config.user_policy(u).to_string(),
                        max_send_rate: u.max_send_rate,
                    },
                )
            })
            .collect();
        Users {
            by_name,
            memory: Arc::default(),
        }
    }

    /// Verifies a password (argon2id, CPU-bound: call from a blocking thread).
    pub fn verify(&self, name: &str, password: &str) -> Option<UserEntry> {
        let (entry, hash) = match self.by_name.get(name) {
            Some(e) => (Some(e), e.password_hash.as_str()),
            None => (None, DUMMY_HASH),
        };
        let ok = PasswordHash::new(hash)
            .map(|h| self.check(&h, password.as_bytes()))
            .unwrap_or(false);
        match (ok, entry) {
            (true, Some(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// Whether `password` matches the PHC-format argon2 `hash`, using pooled working memory.
    fn check(&self, hash: &PasswordHash<'_>, password: &[u8]) -> bool {
        let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
            return false;
        };
        let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else {
            return false;
        };
        let version = match hash.version.map(Version::try_from).transpose() {
            Ok(v) => v.unwrap_or_default(),
            Err(_) => return false,
        };
        let Ok(params) = Params::try_from(hash) else {
            return false;
        };
        let mut salt_buf = [0u8; 64];
        let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
            return false;
        };
        let blocks = params.block_count();
        if blocks > MAX_BLOCKS {
            return false;
        }
        let mut memory = self
            .memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        let mut out = vec![0u8; expected.len()];
        let hashed = Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
            .is_ok();
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(memory);
        // Output's equality is constant-time
        hashed && Output::new(&out).is_ok_and(|out| out == expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};

    fn users_with(hash: &str) -> Users {
        let entry = UserEntry {
            name: "app".into(),
            password_hash: hash.into(),
            allowed: Vec::new(),
            policy: "phi".into(),
            max_send_rate: None,
        };
        Users {
            by_name: HashMap::from([("app".to_string(), entry)]),
            memory: Arc::default(),
        }
    }

    #[test]
    fn verification_matches_the_reference_and_reuses_its_memory() {
        let salt = SaltString::encode_b64(b"sealpost-salt-16").unwrap();
        for algorithm in [Algorithm::Argon2id, Algorithm::Argon2i, Algorithm::Argon2d] {
            let params = Params::new(1024, 2, 1, None).unwrap();
            let hasher = Argon2::new(algorithm, Version::V0x13, params);
            let hash = hasher
                .hash_password(b"correct horse", &salt)
                .unwrap()
                .to_string();
            let users = users_with(&hash);
            assert!(users.verify("app", "correct horse").is_some(), "{hash}");
            assert!(users.verify("app", "correct horsE").is_none(), "{hash}");
            assert!(users.verify("other", "correct horse").is_none());
            // sequential verifications share one buffer, sized for the largest hash seen
            let pool = users.memory.lock().unwrap();
            assert_eq!(pool.len(), 1);
            assert!(
                pool[0].len() >= 19456,
                "dummy hash of unknown users needs 19 MiB"
            );
        }
        // the default (what `sealpost user hash-password` writes) and a damaged hash
        let hash = Argon2::default()
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        assert!(users_with(&hash).verify("app", "pw").is_some());
        let damaged = hash.replace("m=19456", "m=19457");
        assert!(users_with(&damaged).verify("app", "pw").is_none());
        assert!(users_with("not a hash").verify("app", "pw").is_none());
    }

    #[test]
    fn plain_decoding() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(b"\0app\0secret");
        assert_eq!(decode_plain(&b64), Ok(("app".into(), "secret".into())));
        let b64 = base64::engine::general_purpose::STANDARD.encode(b"app\0app\0secret");
        assert_eq!(decode_plain(&b64), Ok(("app".into(), "secret".into())));
        let b64 = base64::engine::general_purpose::STANDARD.encode(b"other\0app\0secret");
        assert_eq!(decode_plain(&b64), Err(AuthDecodeError::Malformed));
        let b64 = base64::engine::general_purpose::STANDARD.encode(b"app\0secret");
        assert_eq!(decode_plain(&b64), Err(AuthDecodeError::Malformed));
        assert_eq!(decode_plain("!!!"), Err(AuthDecodeError::Base64));
    }

    #[test]
    fn sender_patterns() {
        assert!(SenderPattern::parse("*").matches("a@b.c"));
        let d = SenderPattern::parse("*@Clinic.example");
        assert!(d.matches("x@clinic.EXAMPLE"));
        assert!(!d.matches("x@evilclinic.example"));
        assert!(!d.matches("x@sub.clinic.example"));
        let s = SenderPattern::parse("*@*.clinic.example");
        assert!(s.matches("x@sub.clinic.example"));
        assert!(!s.matches("x@clinic.example"));
        assert!(!s.matches("x@evilclinic.example"));
        let a = SenderPattern::parse("billing@clinic.example");
        assert!(a.matches("billing@CLINIC.example"));
        assert!(!a.matches("Billing@clinic.example"));
    }

    #[test]
    fn verify_known_and_unknown() {
        let text = format!(
            "[server]\nhostname=\"h.example\"\nstate_dir=\"/tmp/x\"\n[[listeners]]\naddress=\"127.0.0.1:1\"\nmode=\"starttls\"\n[[users]]\nname=\"dev\"\npassword_hash=\"{DUMMY_HASH}\"\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let c = sealpost_config::Config::load_with_env_prefix(&p, "SPTEST_AUTH_").unwrap();
        let users = Users::from_config(&c);
        assert!(users.verify("dev", "sealpost-dev").is_some());
        assert!(users.verify("dev", "wrong").is_none());
        assert!(users.verify("nobody", "sealpost-dev").is_none());
    }
}
