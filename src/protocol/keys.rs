//! Key material: our signing keys and peers' verifying keys.
//!
//! A key is an ed25519 seed (32 bytes) named by a `KeyId`. On the wire a public key is its
//! raw 32 bytes in lowercase hex; Paracord's key file is the seed as 64 hex characters and
//! a newline, and `Keypair::from_seed_hex` reads that form so an operator can bring a
//! Paracord key over unchanged.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use super::hex::{self, HexError};
use super::ids::KeyId;

/// Why key material could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid hex: {0}")]
    Hex(#[from] HexError),
    #[error("public key is not a valid ed25519 point")]
    InvalidPoint,
}

/// One of our signing keys: its id and its secret seed.
#[derive(Clone)]
pub struct Keypair {
    key_id: KeyId,
    signing: SigningKey,
}

impl std::fmt::Debug for Keypair {
    // The seed is secret: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypair")
            .field("key_id", &self.key_id)
            .field("public_key", &self.public_key_hex())
            .finish_non_exhaustive()
    }
}

impl Keypair {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate(key_id: KeyId) -> Self {
        let seed: [u8; 32] = rand::random();
        Self::from_seed(key_id, seed)
    }

    pub fn from_seed(key_id: KeyId, seed: [u8; 32]) -> Self {
        Self {
            key_id,
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// Reads a seed as 64 lowercase hex characters; one trailing newline (Paracord's key
    /// file format) is allowed.
    pub fn from_seed_hex(key_id: KeyId, seed_hex: &str) -> Result<Self, KeyError> {
        let trimmed = seed_hex
            .strip_suffix('\n')
            .map(|s| s.strip_suffix('\r').unwrap_or(s))
            .unwrap_or(seed_hex);
        Ok(Self::from_seed(key_id, hex::decode_exact::<32>(trimmed)?))
    }

    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    pub fn seed_hex(&self) -> String {
        hex::encode(&self.signing.to_bytes())
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key())
    }

    pub fn public_key_hex(&self) -> String {
        self.public_key().to_hex()
    }

    /// Signs `msg`, returning the raw 64-byte signature.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// Signs `msg`, returning the signature as lowercase hex (the wire form).
    pub fn sign_hex(&self, msg: &[u8]) -> String {
        hex::encode(&self.sign(msg))
    }
}

/// A peer's (or our own) public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl PublicKey {
    /// Reads 64 lowercase hex characters.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode_exact::<32>(s)?;
        Self::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| KeyError::InvalidPoint)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// True when `sig` is a valid signature of `msg` by this key. Uses ed25519-dalek's
    /// strict verification (no small-order keys, canonical `s`), which every honest
    /// signer — Paracord included — satisfies.
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        self.0
            .verify_strict(msg, &Signature::from_bytes(sig))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_file_round_trip() {
        let id = KeyId::parse("ed25519:test").unwrap();
        let k = Keypair::from_seed_hex(
            id.clone(),
            "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20\n",
        )
        .unwrap();
        assert_eq!(
            k.public_key_hex(),
            "79b5562e8fe654f94078b112e8a98ba7901f853ae695bed7e0e3910bad049664"
        );
        let sig = k.sign(b"m");
        assert!(k.public_key().verify(b"m", &sig));
        assert!(!k.public_key().verify(b"n", &sig));
        assert!(
            format!("{k:?}").find(&k.seed_hex()).is_none(),
            "Debug leaks seed"
        );
        assert!(Keypair::from_seed_hex(id, "00").is_err());
    }
}
