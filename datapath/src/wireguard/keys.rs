//! Curve25519 keys in WireGuard's textual form (standard base64 of 32 bytes, what `wg genkey`/`wg pubkey` print).

use std::fmt;
use std::str::FromStr;

use wireguard_control::Key;

/// Why a key string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64 of exactly 32 bytes ({len} characters given)")]
    Malformed { len: usize },
    #[error("the all-zero key is not a usable WireGuard key")]
    Zero,
}

fn parse_key(s: &str) -> Result<Key, KeyError> {
    let s = s.trim();
    // wireguard-control's decoder accepts any base64 that yields 32 bytes; a WireGuard key is always 44 characters.
    if s.len() != 44 {
        return Err(KeyError::Malformed { len: s.len() });
    }
    let key = Key::from_base64(s).map_err(|_| KeyError::Malformed { len: s.len() })?;
    if key.0 == [0u8; 32] {
        return Err(KeyError::Zero);
    }
    Ok(key)
}

/// A node's public key: what remote nodes configure as the peer key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        Key(self.0).to_base64()
    }

    pub(crate) fn to_wg(self) -> Key {
        Key(self.0)
    }

    pub(crate) fn from_wg(key: &Key) -> Self {
        PublicKey(key.0)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        parse_key(s).map(|k| PublicKey(k.0))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A node's private key. Its `Debug` never prints the key; `to_base64` is for writing it to a file `wg` can read.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh random key from the OS RNG, clamped as Curve25519 requires (like `wg genkey`).
    pub fn generate() -> Self {
        PrivateKey(Key::generate_private().0)
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(Key(self.0).get_public().0)
    }

    pub fn to_base64(&self) -> String {
        Key(self.0).to_base64()
    }

    pub(crate) fn to_wg(&self) -> Key {
        Key(self.0)
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        parse_key(s).map(|k| PrivateKey(k.0))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_base64() {
        let private = PrivateKey::generate();
        let text = private.to_base64();
        assert_eq!(text.len(), 44);
        let parsed: PrivateKey = text.parse().expect("parse own output");
        assert_eq!(parsed, private);
        let public = private.public_key();
        assert_eq!(public.to_string().parse::<PublicKey>().expect("parse public"), public);
        assert_ne!(PrivateKey::generate().public_key(), public, "two generated keys differ");
    }

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 section 6.1: Alice's private key and the public key derived from it.
        let alice = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2, 0x66, 0x45, 0xdf, 0x4c,
            0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5, 0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let expected = [
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e, 0xf7, 0x5a, 0x0d, 0xbf,
            0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e, 0xaa, 0x9b, 0x4e, 0x6a,
        ];
        assert_eq!(PrivateKey(alice).public_key().as_bytes(), &expected);
    }

    #[test]
    fn bad_keys_are_errors() {
        assert_eq!("".parse::<PublicKey>(), Err(KeyError::Malformed { len: 0 }));
        assert_eq!("not-a-key".parse::<PublicKey>(), Err(KeyError::Malformed { len: 9 }));
        // 44 characters but not base64.
        assert!(matches!("!".repeat(44).parse::<PublicKey>(), Err(KeyError::Malformed { .. })));
        // The all-zero key decodes but is rejected.
        assert!(matches!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".parse::<PublicKey>(), Err(KeyError::Zero)));
        // Valid base64 of 34 bytes.
        assert!("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ==".parse::<PublicKey>().is_err());
    }

    #[test]
    fn private_key_debug_is_redacted() {
        let private = PrivateKey::generate();
        let shown = format!("{private:?}");
        assert!(!shown.contains(&private.to_base64()));
        assert!(shown.contains("redacted"));
    }
}
