//! `[smarthosts.NAME]` resolved for delivery: where to connect, how to reach TLS, the policy
//! the connection is judged by, and the AUTH credentials (password read from its file).

use std::collections::HashMap;
use std::path::PathBuf;

use sealpost_config::{Config, ListenerMode};
use sealpost_policy::{PolicySpec, TlsRequirement};

use crate::client::TlsStart;
use crate::engine::ResolvedPolicy;

/// One smarthost as the engine uses it.
#[derive(Debug, Clone)]
pub struct SmarthostTarget {
    /// The name in `[smarthosts.NAME]`.
    pub name: String,
    /// Host name to resolve and the name its certificate must carry.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// STARTTLS or implicit TLS.
    pub start: TlsStart,
    /// The policy the connection is judged by (always `verified`).
    pub spec: PolicySpec,
    /// AUTH user name and password file, if the smarthost needs AUTH.
    pub credentials: Option<(String, PathBuf)>,
}

/// Why a smarthost's password could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The password file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file's first line is empty.
    #[error("{0}: the first line (the password) is empty")]
    Empty(PathBuf),
}

impl SmarthostTarget {
    /// The AUTH user and password (the password file's first line, read now so a rotated
    /// password is picked up), or `None` if no AUTH is configured.
    pub fn credentials(&self) -> Result<Option<(String, String)>, PasswordError> {
        let Some((user, path)) = &self.credentials else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|source| PasswordError::Read {
            path: path.clone(),
            source,
        })?;
        let first = text
            .lines()
            .next()
            .unwrap_or_default()
            .trim_end_matches('\r');
        if first.is_empty() {
            return Err(PasswordError::Empty(path.clone()));
        }
        Ok(Some((user.clone(), first.to_owned())))
    }

    /// The fallback step name, `smarthost:NAME`.
    pub fn step(&self) -> String {
        format!("smarthost:{}", self.name)
    }
}

/// Resolves every `[smarthosts.NAME]` against the policy table. The connection is always
/// judged as `verified` (validation refuses anything else); a named policy adds its pins.
pub fn resolve_smarthosts(
    config: &Config,
    policies: &HashMap<String, ResolvedPolicy>,
) -> HashMap<String, SmarthostTarget> {
    config
        .smarthosts
        .iter()
        .map(|(name, h)| {
            let policy_name = h.policy.as_deref().unwrap_or("phi");
            let mut spec = policies
                .get(policy_name)
                .map(|p| p.spec.clone())
                .unwrap_or_else(|| PolicySpec::new(policy_name, TlsRequirement::Verified));
            spec.requirement = TlsRequirement::Verified;
            let start = match h.mode {
                ListenerMode::Implicit => TlsStart::Implicit,
                // validation refuses `plain`; STARTTLS is required either way
                ListenerMode::Starttls | ListenerMode::Plain => TlsStart::Starttls,
            };
            let credentials = h.username.clone().zip(h.password_file.clone());
            let target = SmarthostTarget {
                name: name.clone(),
                host: h.host.trim_end_matches('.').to_ascii_lowercase(),
                port: h.port,
                start,
                spec,
                credentials,
            };
            (name.clone(), target)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_the_first_line_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        let mut t = SmarthostTarget {
            name: "relay".into(),
            host: "smart.test".into(),
            port: 465,
            start: TlsStart::Implicit,
            spec: PolicySpec::new("phi", TlsRequirement::Verified),
            credentials: None,
        };
        assert!(t.credentials().unwrap().is_none());
        t.credentials = Some(("u".into(), path.clone()));
        assert!(matches!(t.credentials(), Err(PasswordError::Read { .. })));
        std::fs::write(&path, "s3cret\r\nignored\n").unwrap();
        assert_eq!(
            t.credentials().unwrap(),
            Some(("u".to_owned(), "s3cret".to_owned()))
        );
        std::fs::write(&path, "\nsecond").unwrap();
        assert!(matches!(t.credentials(), Err(PasswordError::Empty(_))));
        assert_eq!(t.step(), "smarthost:relay");
    }
}
