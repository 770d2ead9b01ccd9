//! Sealpost configuration: the TOML schema, loading with figment (file + `SEALPOST_` environment,
//! `__` for nesting), defaults, and validation whose every error names the key, where the value
//! came from, and what was expected.

mod model;
mod units;
mod validate;

pub use model::*;
pub use units::{format_duration, parse_duration, parse_size, ByteSize, HumanDuration};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use std::fmt;
use std::path::{Path, PathBuf};

/// Prefix of environment variables that override config keys (`SEALPOST_QUEUE__MAX_RECIPIENTS`).
pub const ENV_PREFIX: &str = "SEALPOST_";

/// The configuration a newcomer runs: `config/sealpost.toml`, embedded in the binary.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../../config/sealpost.toml");

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `queue.retry[2]` or `users[0].password_hash`.
    pub key: String,
    /// Where the value came from: `file /etc/sealpost/sealpost.toml` or `environment variable SEALPOST_…`.
    pub origin: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` ({}): {}", self.key, self.origin, self.message)
    }
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or a value has the wrong type or an unknown key.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// figment's message, which names the key and the source.
        message: String,
    },
    /// Values parse but are not acceptable.
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

impl Config {
    /// Loads `path`, applies `SEALPOST_` environment overrides, fills defaults and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env_prefix(path, ENV_PREFIX)
    }

    /// Like [`Config::load`] with another environment prefix (tests use their own).
    pub fn load_with_env_prefix(path: &Path, prefix: &str) -> Result<Config, ConfigError> {
        // figment silently treats a missing file as empty: check first, for a clear error.
        std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let figment = Figment::new()
            .merge(Toml::file(path))
            .merge(Env::prefixed(prefix).split("__"));
        Self::from_figment(figment, path, prefix)
    }

    /// Loads the embedded default configuration (with environment overrides).
    pub fn load_default() -> Result<Config, ConfigError> {
        let figment = Figment::new()
            .merge(Toml::string(DEFAULT_CONFIG_TOML))
            .merge(Env::prefixed(ENV_PREFIX).split("__"));
        Self::from_figment(
            figment,
            Path::new("<embedded config/sealpost.toml>"),
            ENV_PREFIX,
        )
    }

    fn from_figment(figment: Figment, path: &Path, prefix: &str) -> Result<Config, ConfigError> {
        let mut config: Config = figment.extract().map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: describe_figment_error(e),
        })?;
        config.fill_defaults();
        let origin = |key: &str| origin_of(&figment, key, path, prefix);
        let problems = validate::validate(&config, &origin);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    fn fill_defaults(&mut self) {
        self.policies
            .entry("phi".to_string())
            .or_insert_with(Policy::phi_default);
    }

    /// Path of the queue key file (explicit or `state_dir/queue.key`).
    pub fn queue_key_file(&self) -> PathBuf {
        self.queue
            .key_file
            .clone()
            .unwrap_or_else(|| self.server.state_dir.join("queue.key"))
    }

    /// Directory of the queue store (`state_dir/queue`).
    pub fn queue_dir(&self) -> PathBuf {
        self.server.state_dir.join("queue")
    }

    /// Path of the current audit file (explicit or `state_dir/audit/audit.jsonl`).
    pub fn audit_path(&self) -> PathBuf {
        self.audit
            .path
            .clone()
            .unwrap_or_else(|| self.server.state_dir.join("audit").join("audit.jsonl"))
    }

    /// Path of the admin socket (explicit or `state_dir/admin.sock`).
    pub fn admin_socket(&self) -> PathBuf {
        self.server
            .admin_socket
            .clone()
            .unwrap_or_else(|| self.server.state_dir.join("admin.sock"))
    }

    /// The policy a user's mail gets when no header selects another.
    pub fn user_policy<'a>(&'a self, user: &'a User) -> &'a str {
        user.policy.as_deref().unwrap_or("phi")
    }
}

fn describe_figment_error(e: figment::Error) -> String {
    // figment's Display already names the key path and the source ("in file X" / "`SEALPOST_` env");
    // one error per line when there are several.
    // figment prefixes keys with its profile name ("default."); our keys have no profiles.
    e.into_iter()
        .map(|err| err.to_string().replace("key \"default.", "key \""))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Names where the value of `key` came from: the file or the environment variable.
fn origin_of(figment: &Figment, key: &str, path: &Path, prefix: &str) -> String {
    // Keys such as `users[0].name` have no figment path for the index; look up the table.
    let lookup = key.split('[').next().unwrap_or(key);
    match figment.find_metadata(lookup) {
        Some(meta) if meta.name.to_ascii_lowercase().contains("env") => format!(
            "environment variable {}{}",
            prefix,
            lookup.to_ascii_uppercase().replace('.', "__")
        ),
        Some(meta) => match &meta.source {
            Some(figment::Source::File(p)) => format!("file {}", p.display()),
            _ => format!("file {}", path.display()),
        },
        None => format!("default value, file {}", path.display()),
    }
}

#[cfg(test)]
mod tests;
