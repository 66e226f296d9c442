//! The transport signature every federation request carries.
//!
//! Four headers — origin, key id, timestamp (Unix ms) and an ed25519 signature in
//! lowercase hex — over the string
//! `UPPER(method) \n path[?query] \n timestamp_ms \n hex(sha256(body))`, where the path is
//! exactly as sent (percent-encoding included) and the body hash is over the bytes on the
//! wire. Parsing is strict (PROTOCOL.md "stricter"): each header must be present once, the
//! timestamp is a bounded decimal integer, and the signature has exactly one spelling, so
//! the replay identity derived from it cannot be dodged by re-spelling the hex.

use sha2::{Digest, Sha256};

use super::hex;
use super::ids::{KeyId, ServerName};
use super::keys::{Keypair, PublicKey};

pub const HEADER_ORIGIN: &str = "x-paracord-origin";
pub const HEADER_KEY_ID: &str = "x-paracord-key-id";
pub const HEADER_TIMESTAMP: &str = "x-paracord-timestamp";
pub const HEADER_SIGNATURE: &str = "x-paracord-signature";

/// Paracord's default skew window.
pub const DEFAULT_MAX_SKEW_MS: i64 = 60_000;

/// sha256 of the empty body, which every GET signs.
pub const EMPTY_BODY_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// What is wrong with a request's transport headers. Each maps to 401 at the edge except
/// `BadSignature` and `MalformedSignature`, which are 403 (as Paracord answers a
/// signature that does not verify, whatever its spelling).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("missing or empty header {0}")]
    MissingHeader(&'static str),
    #[error("header {0} is not valid: {1}")]
    InvalidHeader(&'static str, String),
    #[error("X-Paracord-Timestamp must be Unix milliseconds as a decimal integer")]
    BadTimestamp,
    #[error("X-Paracord-Timestamp is {skew_ms} ms away from this server's clock; the limit is {max_ms} ms")]
    Skew { skew_ms: i128, max_ms: i64 },
    #[error("X-Paracord-Signature does not verify for this method, path, timestamp and body")]
    BadSignature,
    #[error("X-Paracord-Signature must be 128 lowercase hex characters: {0}")]
    MalformedSignature(String),
}

/// The parsed transport headers of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportHeaders {
    pub origin: ServerName,
    pub key_id: KeyId,
    pub timestamp_ms: i64,
    pub signature: [u8; 64],
}

/// Lowercase hex sha256 of `body`.
pub fn body_sha256_hex(body: &[u8]) -> String {
    hex::encode(&Sha256::digest(body))
}

/// The exact string that is signed.
pub fn signing_string(
    method: &str,
    path_and_query: &str,
    timestamp_ms: i64,
    body: &[u8],
) -> String {
    format!(
        "{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path_and_query,
        timestamp_ms,
        body_sha256_hex(body)
    )
}

/// Parses a timestamp header: an optional `-` and 1–19 decimal digits, in i64 range.
/// Surrounding spaces and tabs (HTTP optional white space) are trimmed.
fn parse_timestamp(s: &str) -> Result<i64, TransportError> {
    let t = s.trim_matches(|c| c == ' ' || c == '\t');
    let digits = t.strip_prefix('-').unwrap_or(t);
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TransportError::BadTimestamp);
    }
    t.parse::<i64>().map_err(|_| TransportError::BadTimestamp)
}

impl TransportHeaders {
    /// Parses the four header values (`None` = absent). Each must be present and
    /// non-empty; the caller has already refused duplicated headers.
    pub fn parse(
        origin: Option<&str>,
        key_id: Option<&str>,
        timestamp: Option<&str>,
        signature: Option<&str>,
    ) -> Result<Self, TransportError> {
        fn need<'a>(v: Option<&'a str>, name: &'static str) -> Result<&'a str, TransportError> {
            match v.map(str::trim) {
                Some(s) if !s.is_empty() => Ok(s),
                _ => Err(TransportError::MissingHeader(name)),
            }
        }
        let origin = need(origin, "X-Paracord-Origin")?;
        let key_id = need(key_id, "X-Paracord-Key-Id")?;
        let timestamp = need(timestamp, "X-Paracord-Timestamp")?;
        let signature = need(signature, "X-Paracord-Signature")?;
        Ok(Self {
            origin: ServerName::parse(origin)
                .map_err(|e| TransportError::InvalidHeader("X-Paracord-Origin", e.to_string()))?,
            key_id: KeyId::parse(key_id)
                .map_err(|e| TransportError::InvalidHeader("X-Paracord-Key-Id", e.to_string()))?,
            timestamp_ms: parse_timestamp(timestamp)?,
            signature: hex::decode_exact::<64>(signature)
                .map_err(|e| TransportError::MalformedSignature(e.to_string()))?,
        })
    }

    /// Signs a request as `origin` with `key`.
    pub fn sign(
        key: &Keypair,
        origin: &ServerName,
        method: &str,
        path_and_query: &str,
        timestamp_ms: i64,
        body: &[u8],
    ) -> Self {
        let s = signing_string(method, path_and_query, timestamp_ms, body);
        Self {
            origin: origin.clone(),
            key_id: key.key_id().clone(),
            timestamp_ms,
            signature: key.sign(s.as_bytes()),
        }
    }

    /// The four headers as `(name, value)` pairs, in Paracord's spelling.
    pub fn to_header_pairs(&self) -> [(&'static str, String); 4] {
        [
            ("X-Paracord-Origin", self.origin.to_string()),
            ("X-Paracord-Key-Id", self.key_id.to_string()),
            ("X-Paracord-Timestamp", self.timestamp_ms.to_string()),
            ("X-Paracord-Signature", hex::encode(&self.signature)),
        ]
    }

    /// Refuses a timestamp further than `max_skew_ms` from `now_ms` (overflow-safe).
    pub fn check_skew(&self, now_ms: i64, max_skew_ms: i64) -> Result<(), TransportError> {
        let skew = i128::from(now_ms) - i128::from(self.timestamp_ms);
        if skew.abs() > i128::from(max_skew_ms) {
            return Err(TransportError::Skew {
                skew_ms: skew,
                max_ms: max_skew_ms,
            });
        }
        Ok(())
    }

    /// Verifies the signature over this request's method, path, timestamp and body bytes.
    pub fn verify(
        &self,
        key: &PublicKey,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<(), TransportError> {
        let s = signing_string(method, path_and_query, self.timestamp_ms, body);
        if key.verify(s.as_bytes(), &self.signature) {
            Ok(())
        } else {
            Err(TransportError::BadSignature)
        }
    }

    /// The identity of this signed request for replay refusal: sha256 over origin, key id,
    /// timestamp, method, path and the *decoded* signature bytes.
    pub fn replay_id(&self, method: &str, path_and_query: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.origin.as_str().as_bytes());
        h.update(b"\n");
        h.update(self.key_id.as_str().as_bytes());
        h.update(b"\n");
        h.update(self.timestamp_ms.to_string().as_bytes());
        h.update(b"\n");
        h.update(method.to_ascii_uppercase().as_bytes());
        h.update(b"\n");
        h.update(path_and_query.as_bytes());
        h.update(b"\n");
        h.update(self.signature);
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Keypair {
        Keypair::from_seed(KeyId::parse("ed25519:k").unwrap(), [1; 32])
    }

    #[test]
    fn sign_verify_round_trip() {
        let k = key();
        let o = ServerName::parse("a.test").unwrap();
        let h = TransportHeaders::sign(&k, &o, "post", "/p?q=1", 10, b"{}");
        assert!(h.verify(&k.public_key(), "POST", "/p?q=1", b"{}").is_ok());
        assert_eq!(
            h.verify(&k.public_key(), "POST", "/p", b"{}"),
            Err(TransportError::BadSignature)
        );
        let [o2, k2, t2, s2] = h.to_header_pairs();
        let parsed =
            TransportHeaders::parse(Some(&o2.1), Some(&k2.1), Some(&t2.1), Some(&s2.1)).unwrap();
        assert_eq!(parsed, h);
    }

    #[test]
    fn strict_parsing() {
        let sig = "ab".repeat(64);
        let p = |t: &str, s: &str| {
            TransportHeaders::parse(Some("a.test"), Some("ed25519:k"), Some(t), Some(s))
        };
        assert!(p(" 17 ", &sig).is_ok(), "OWS is trimmed");
        for bad in [
            "",
            "1.5",
            "+1",
            "0x10",
            "99999999999999999999",
            "1e3",
            "--1",
        ] {
            assert!(p(bad, &sig).is_err(), "{bad:?}");
        }
        assert_eq!(
            p("-9223372036854775808", &sig).unwrap().timestamp_ms,
            i64::MIN
        );
        assert!(p("1", &sig.to_uppercase()).is_err());
        assert!(p("1", &sig[..126]).is_err());
        assert_eq!(
            TransportHeaders::parse(None, Some("ed25519:k"), Some("1"), Some(&sig)),
            Err(TransportError::MissingHeader("X-Paracord-Origin"))
        );
    }

    #[test]
    fn skew_is_overflow_safe() {
        let mut h =
            TransportHeaders::sign(&key(), &ServerName::parse("a").unwrap(), "GET", "/", 0, b"");
        h.timestamp_ms = i64::MIN;
        assert!(h.check_skew(i64::MAX, 60_000).is_err());
        h.timestamp_ms = 1_000;
        assert!(h.check_skew(61_000, 60_000).is_ok());
        assert!(h.check_skew(61_001, 60_000).is_err());
    }

    #[test]
    fn replay_id_depends_on_decoded_bytes_and_path() {
        let k = key();
        let o = ServerName::parse("a.test").unwrap();
        let h = TransportHeaders::sign(&k, &o, "POST", "/p", 10, b"{}");
        assert_eq!(h.replay_id("POST", "/p"), h.replay_id("post", "/p"));
        assert_ne!(h.replay_id("POST", "/p"), h.replay_id("POST", "/q"));
    }
}
