//! AES-256-GCM sealing of queue records, bound to their queue id and kind.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::id::QueueId;
use crate::keys::{Keyring, KEY_ID_LEN};

/// Format version of a sealed record.
const VERSION: u8 = 1;
/// Bytes before the ciphertext: version, key id, nonce.
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
/// AES-GCM tag length.
const TAG_LEN: usize = 16;
/// Bytes sealing adds to a record (header and tag).
#[cfg(test)]
pub(crate) const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// What a sealed record holds (bound into the associated data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Envelope and per-recipient state.
    Meta,
    /// The message body.
    Body,
    /// An audit record in the outbox.
    Outbox,
}

impl Kind {
    fn tag(self) -> u8 {
        match self {
            Kind::Meta => b'm',
            Kind::Body => b'b',
            Kind::Outbox => b'o',
        }
    }
}

/// Why a sealed record could not be opened or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CryptoError {
    /// The record names a key that is not in the keyring.
    UnknownKey(String),
    /// Authentication failed or the record is malformed: tampered or swapped.
    Authentication,
    /// The random number generator failed.
    Random,
    /// The key could not be used.
    Key,
}

fn aad(id: QueueId, kind: Kind) -> [u8; 34] {
    let mut aad = [0u8; 34];
    aad[..16].copy_from_slice(b"sealpost-queue-1");
    aad[16] = kind.tag();
    aad[17] = VERSION;
    aad[18..].copy_from_slice(&id.as_u128().to_be_bytes());
    aad
}

/// Seeds the random generator nonces come from, so the first enqueue does not pay for it.
///
/// aws-lc seeds its process-wide generator from CPU jitter on the first draw: 50 ms or more
/// on a 2-core VM, on whichever thread asks first. Done lazily, that was the first message
/// after every start, and every session waiting behind that thread.
pub(crate) fn warm_up() -> Result<(), CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| CryptoError::Random)
}

/// Encrypts `plaintext` under the primary key: version | key id | nonce | ciphertext+tag.
pub(crate) fn seal(
    keys: &Keyring,
    id: QueueId,
    kind: Kind,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let key = keys.primary();
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| CryptoError::Random)?;
    let sealing =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key.bytes).map_err(|_| CryptoError::Key)?);
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.push(VERSION);
    out.extend_from_slice(&key.id);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = sealing
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(id, kind)),
            out.get_mut(HEADER_LEN..).ok_or(CryptoError::Key)?,
        )
        .map_err(|_| CryptoError::Key)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// The key id a sealed record names, if it is well-formed.
pub(crate) fn key_id(sealed: &[u8]) -> Option<&[u8]> {
    if sealed.len() < HEADER_LEN + TAG_LEN || sealed.first() != Some(&VERSION) {
        return None;
    }
    sealed.get(1..1 + KEY_ID_LEN)
}

/// Decrypts and authenticates a sealed record for `id` and `kind`.
pub(crate) fn open(
    keys: &Keyring,
    id: QueueId,
    kind: Kind,
    sealed: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let key_id = key_id(sealed).ok_or(CryptoError::Authentication)?;
    let key = keys
        .find(key_id)
        .ok_or_else(|| CryptoError::UnknownKey(hex::encode(key_id)))?;
    let nonce: [u8; NONCE_LEN] = sealed
        .get(1 + KEY_ID_LEN..HEADER_LEN)
        .and_then(|n| n.try_into().ok())
        .ok_or(CryptoError::Authentication)?;
    let opening =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key.bytes).map_err(|_| CryptoError::Key)?);
    let mut buf = sealed
        .get(HEADER_LEN..)
        .ok_or(CryptoError::Authentication)?
        .to_vec();
    let len = opening
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(id, kind)),
            &mut buf,
        )
        .map_err(|_| CryptoError::Authentication)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::from_raw([1u8; 32], &[])
    }

    #[test]
    fn round_trip_and_layout() {
        let keys = ring();
        let id = QueueId::generate();
        let sealed = seal(&keys, id, Kind::Body, b"hello world").unwrap();
        assert_eq!(sealed[0], VERSION);
        assert_eq!(sealed.len(), HEADER_LEN + 11 + TAG_LEN);
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(
            open(&keys, id, Kind::Body, &sealed).unwrap(),
            b"hello world"
        );
        // fresh nonce each time
        let again = seal(&keys, id, Kind::Body, b"hello world").unwrap();
        assert_ne!(sealed, again);
    }

    #[test]
    fn swapped_id_kind_or_flipped_byte_fails_authentication() {
        let keys = ring();
        let id = QueueId::generate();
        let other = QueueId::generate();
        let sealed = seal(&keys, id, Kind::Meta, b"record").unwrap();
        assert_eq!(
            open(&keys, other, Kind::Meta, &sealed),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            open(&keys, id, Kind::Body, &sealed),
            Err(CryptoError::Authentication)
        );
        for i in [HEADER_LEN - 1, HEADER_LEN, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                open(&keys, id, Kind::Meta, &bad),
                Err(CryptoError::Authentication),
                "byte {i}"
            );
        }
        assert_eq!(
            open(&keys, id, Kind::Meta, &sealed[..10]),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn unknown_key_is_not_an_authentication_failure() {
        let a = Keyring::from_raw([1u8; 32], &[]);
        let b = Keyring::from_raw([2u8; 32], &[]);
        let id = QueueId::generate();
        let sealed = seal(&a, id, Kind::Meta, b"x").unwrap();
        assert!(matches!(
            open(&b, id, Kind::Meta, &sealed),
            Err(CryptoError::UnknownKey(_))
        ));
        let both = Keyring::from_raw([2u8; 32], &[[1u8; 32]]);
        assert_eq!(open(&both, id, Kind::Meta, &sealed).unwrap(), b"x");
    }
}
