//! Queue encryption keys: loading, permission checks, generation.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;

/// Length of a key id in bytes.
pub const KEY_ID_LEN: usize = 8;
/// Length of a key in bytes (AES-256).
pub const KEY_LEN: usize = 32;

/// Why a key file could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The key file is readable or writable by group or others.
    #[error("key file {path} has mode {mode:04o}: it must not be accessible by group or others (chmod 600)")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold exactly 32 bytes.
    #[error("key file {path} holds {len} bytes; a queue key is exactly 32 raw bytes")]
    Length {
        /// The key file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// The key file already exists (generate never overwrites).
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists {
        /// The key file.
        path: PathBuf,
    },
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
}

/// One AES-256 key with its id.
#[derive(Clone)]
pub(crate) struct Key {
    pub(crate) id: [u8; KEY_ID_LEN],
    pub(crate) bytes: [u8; KEY_LEN],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", hex::encode(self.id))
    }
}

impl Key {
    fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        let hash = digest::digest(&digest::SHA256, &bytes);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&hash.as_ref()[..KEY_ID_LEN]);
        Key { id, bytes }
    }
}

/// The queue's keys: a primary key for new records and older keys that can still be read.
#[derive(Clone, Debug)]
pub struct Keyring {
    primary: Key,
    previous: Vec<Key>,
}

impl Keyring {
    /// Loads the primary key file and older key files; each must be 32 raw bytes, mode 0600 or stricter.
    pub fn load(primary: &Path, previous: &[PathBuf]) -> Result<Keyring, KeyError> {
        let primary = read_key(primary)?;
        let previous = previous
            .iter()
            .map(|p| read_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Keyring { primary, previous })
    }

    /// Creates a new key file with 32 random bytes, mode 0600 (never overwrites), fsync'd.
    pub fn generate(path: &Path) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut bytes = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| KeyError::Random)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Exists {
                        path: path.to_path_buf(),
                    }
                } else {
                    io(e)
                }
            })?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// The id of the primary key (first 8 bytes of its SHA-256), as hex.
    pub fn primary_id(&self) -> String {
        hex::encode(self.primary.id)
    }

    pub(crate) fn primary(&self) -> &Key {
        &self.primary
    }

    pub(crate) fn find(&self, id: &[u8]) -> Option<&Key> {
        std::iter::once(&self.primary)
            .chain(self.previous.iter())
            .find(|k| k.id == id)
    }

    #[cfg(test)]
    pub(crate) fn from_raw(primary: [u8; KEY_LEN], previous: &[[u8; KEY_LEN]]) -> Keyring {
        Keyring {
            primary: Key::from_bytes(primary),
            previous: previous.iter().map(|b| Key::from_bytes(*b)).collect(),
        }
    }
}

fn read_key(path: &Path) -> Result<Key, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() != KEY_LEN as u64 {
        return Err(KeyError::Length {
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    let mut bytes = [0u8; KEY_LEN];
    file.read_exact(&mut bytes).map_err(io)?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest).map_err(io)?;
    if !rest.is_empty() {
        return Err(KeyError::Length {
            path: path.to_path_buf(),
            len: (KEY_LEN + rest.len()) as u64,
        });
    }
    Ok(Key::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn generate_creates_0600_key_and_load_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.key");
        Keyring::generate(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let ring = Keyring::load(&path, &[]).unwrap();
        let bytes = fs::read(&path).unwrap();
        let hash = digest::digest(&digest::SHA256, &bytes);
        assert_eq!(ring.primary_id(), hex::encode(&hash.as_ref()[..8]));
        // never overwrites
        let err = Keyring::generate(&path).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn group_or_world_accessible_key_is_refused_naming_path_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.key");
        Keyring::generate(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keyring::load(&path, &[]).unwrap_err();
        match &err {
            KeyError::Permissions { path: p, mode } => {
                assert_eq!(p, &path);
                assert_eq!(*mode, 0o644);
            }
            other => panic!("expected Permissions, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains(path.to_str().unwrap()), "{text}");
        assert!(text.contains("0644"), "{text}");
        // a previous key is checked the same way
        let good = dir.path().join("good.key");
        Keyring::generate(&good).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o660)).unwrap();
        let err = Keyring::load(&good, std::slice::from_ref(&path)).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o660, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn wrong_length_and_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.key");
        fs::write(&path, [7u8; 31]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = Keyring::load(&path, &[]).unwrap_err();
        assert!(matches!(err, KeyError::Length { len: 31, .. }), "{err:?}");
        let missing = dir.path().join("missing.key");
        let err = Keyring::load(&missing, &[]).unwrap_err();
        assert!(matches!(err, KeyError::Io { .. }), "{err:?}");
    }
}
