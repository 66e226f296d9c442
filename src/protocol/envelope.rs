//! The signed event envelope: its wire body, its signing bytes, and its signatures.
//!
//! Two byte forms matter and both are serde_json's own output, which is why parafed
//! serialises with serde_json (1.0.154+, no `preserve_order`, no `arbitrary_precision`):
//!
//! * the **wire body** — compact JSON, top-level fields in struct order
//!   (`event_id … signatures`), `"state_key":null` written out, every object inside
//!   `content` and `signatures` sorted by key bytes. Paracord hashes exactly this
//!   re-serialisation for its transport signature, so it is the only body a Paracord peer
//!   accepts, and a fixed point of parse → serialise;
//! * the **signing bytes** — the same envelope without `signatures`, keys sorted at every
//!   level, compact. The envelope signature is ed25519 over these bytes.
//!
//! Parsing goes through the id types, so an `Envelope` always holds well-formed ids; it is
//! stricter than Paracord in the places PROTOCOL.md marks (ids, hex, sender ↔ origin).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::hex;
use super::ids::{EventId, IdError, KeyId, RoomId, ServerName, UserId};
use super::keys::{Keypair, PublicKey};
use super::limits::{self, LimitError};

/// Most signatures one envelope may carry (all servers and keys together). An honest
/// envelope has one; the bound keeps verification cost constant.
pub const MAX_SIGNATURES: usize = 16;

/// Checks text fields that are not ids (event type, state key): bounded, no controls.
fn check_text(kind: &'static str, s: &str, allow_empty: bool) -> Result<(), IdError> {
    if s.is_empty() && !allow_empty {
        return Err(IdError {
            kind,
            reason: "must not be empty",
        });
    }
    if s.len() > super::ids::MAX_ID_BYTES {
        return Err(IdError {
            kind,
            reason: "longer than 255 bytes",
        });
    }
    if s.chars().any(char::is_control) {
        return Err(IdError {
            kind,
            reason: "contains a control character",
        });
    }
    Ok(())
}

macro_rules! text_newtype {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $allow_empty:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check_text($kind, s, $allow_empty)?;
                Ok(Self(s.to_owned()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                check_text($kind, &s, $allow_empty).map_err(serde::de::Error::custom)?;
                Ok(Self(s))
            }
        }
    };
}

text_newtype!(
    /// An event type (`m.message`, `m.member.join`, or any type a peer invents: unknown
    /// types are stored and forwarded as they are).
    EventType,
    "event type",
    false
);

text_newtype!(
    /// A state key; `""` is a real value, distinct from an absent (`null`) state key.
    StateKey,
    "state key",
    true
);

/// The `signatures` member: `{"<server>":{"<key_id>":"<hex>"}}`, or Paracord's flat
/// `{"<key_id>":"<hex>"}`. Kept as the JSON map it arrived as, so the wire body
/// re-serialises byte for byte; its shape and size are checked when parsed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Signatures(Map<String, Value>);

impl Signatures {
    /// `{"<server>":{"<key_id>":"<sig_hex>"}}`.
    pub fn single(server: &ServerName, key_id: &KeyId, sig_hex: String) -> Self {
        let mut inner = Map::new();
        inner.insert(key_id.as_str().to_owned(), Value::String(sig_hex));
        let mut outer = Map::new();
        outer.insert(server.as_str().to_owned(), Value::Object(inner));
        Self(outer)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// The `(key id text, signature text)` pairs that count for `origin`: those under
    /// `signatures[origin]` when that is an object, else the flat top-level pairs.
    pub fn for_origin<'a>(&'a self, origin: &ServerName) -> Vec<(&'a str, &'a str)> {
        match self.0.get(origin.as_str()) {
            Some(Value::Object(inner)) => inner
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.as_str(), s)))
                .collect(),
            _ => self
                .0
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.as_str(), s)))
                .collect(),
        }
    }
}

impl<'de> Deserialize<'de> for Signatures {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let map = Map::<String, Value>::deserialize(d)?;
        let mut count = 0usize;
        for v in map.values() {
            match v {
                Value::String(_) => count += 1,
                Value::Object(inner) => {
                    if !inner.values().all(Value::is_string) {
                        return Err(D::Error::custom(
                            "signatures: every signature must be a hex string",
                        ));
                    }
                    count += inner.len();
                }
                _ => {
                    return Err(D::Error::custom(
                        "signatures: expected {\"<server>\":{\"<key_id>\":\"<hex>\"}}",
                    ))
                }
            }
            if count > MAX_SIGNATURES {
                return Err(D::Error::custom("signatures: more than 16 signatures"));
            }
        }
        Ok(Self(map))
    }
}

/// A federation event as it travels between servers. Field order is the wire order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: EventId,
    pub room_id: RoomId,
    pub event_type: EventType,
    pub sender: UserId,
    pub origin_server: ServerName,
    pub origin_ts: i64,
    pub content: Value,
    /// Kept exactly as signed (Paracord rewrites `depth <= 0`, which breaks its own
    /// signature; parafed never does).
    pub depth: i64,
    #[serde(default)]
    pub state_key: Option<StateKey>,
    pub signatures: Signatures,
}

/// The envelope minus `signatures`, with fields in sorted order: serialising it gives the
/// canonical signing bytes without cloning `content` (a `Value` serialises its maps
/// sorted already).
#[derive(Serialize)]
struct SigningView<'a> {
    content: &'a Value,
    depth: i64,
    event_id: &'a EventId,
    event_type: &'a EventType,
    origin_server: &'a ServerName,
    origin_ts: i64,
    room_id: &'a RoomId,
    sender: &'a UserId,
    state_key: &'a Option<StateKey>,
}

/// Why a wire body is not an acceptable envelope. The HTTP edge answers `Syntax`, `Id`
/// and `Limit` with 400 and `Shape` with 422, as Paracord does.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("event body is not valid JSON: {0}")]
    Syntax(serde_json::Error),
    #[error("event body does not have the envelope's shape: {0}")]
    Shape(serde_json::Error),
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Limit(#[from] LimitError),
}

impl EnvelopeError {
    /// Sorts a serde_json error: malformed JSON, or JSON of the wrong shape. Our id types
    /// report through `IdError`'s message, which starts with "invalid "; those are id
    /// errors (400), not shape errors.
    pub fn from_json(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => EnvelopeError::Syntax(e),
            Category::Data => EnvelopeError::Shape(e),
        }
    }
}

/// The envelope with every id as plain text: parsing into this first separates
/// "wrong shape" (422) from "well-shaped but invalid id" (400).
#[derive(Deserialize)]
struct LooseEnvelope {
    event_id: String,
    room_id: String,
    event_type: String,
    sender: String,
    origin_server: String,
    origin_ts: i64,
    content: Value,
    depth: i64,
    #[serde(default)]
    state_key: Option<String>,
    signatures: Signatures,
}

impl TryFrom<LooseEnvelope> for Envelope {
    type Error = IdError;
    fn try_from(l: LooseEnvelope) -> Result<Self, IdError> {
        Ok(Envelope {
            event_id: EventId::try_from(l.event_id)?,
            room_id: RoomId::try_from(l.room_id)?,
            event_type: EventType::parse(&l.event_type)?,
            sender: UserId::try_from(l.sender)?,
            origin_server: ServerName::try_from(l.origin_server)?,
            origin_ts: l.origin_ts,
            content: l.content,
            depth: l.depth,
            state_key: l.state_key.map(|s| StateKey::parse(&s)).transpose()?,
            signatures: l.signatures,
        })
    }
}

/// Why an envelope signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the envelope carries no signature from its origin_server")]
    Missing,
    #[error("the envelope is signed only with keys unknown for its origin_server")]
    UnknownKey,
    #[error("an envelope signature is not 128 lowercase hex characters")]
    Malformed,
    #[error("the envelope signature does not match its content")]
    Invalid,
}

impl Envelope {
    /// Parses a wire body and checks the content bounds. Unknown top-level members are
    /// ignored, as Paracord ignores them; use [`Envelope::is_wire_form`] to learn whether
    /// `bytes` was the exact wire form.
    pub fn from_wire(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let loose: LooseEnvelope =
            serde_json::from_slice(bytes).map_err(EnvelopeError::from_json)?;
        let env = Envelope::try_from(loose)?;
        env.check_limits()?;
        Ok(env)
    }

    /// Checks content depth, entry counts and serialised size.
    pub fn check_limits(&self) -> Result<(), LimitError> {
        limits::check_shape(&self.content)?;
        let len = serde_json::to_vec(&self.content).map_or(usize::MAX, |v| v.len());
        limits::check_content(&self.content, len)
    }

    /// The wire body: what a sender POSTs and the bytes its transport signature hashes.
    pub fn to_wire(&self) -> Vec<u8> {
        // Serialising a struct of strings, integers and `Value`s cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// True when `bytes` is exactly this envelope's wire body.
    pub fn is_wire_form(&self, bytes: &[u8]) -> bool {
        self.to_wire() == bytes
    }

    /// The canonical bytes the envelope signature covers.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let view = SigningView {
            content: &self.content,
            depth: self.depth,
            event_id: &self.event_id,
            event_type: &self.event_type,
            origin_server: &self.origin_server,
            origin_ts: self.origin_ts,
            room_id: &self.room_id,
            sender: &self.sender,
            state_key: &self.state_key,
        };
        serde_json::to_vec(&view).unwrap_or_default()
    }

    /// Signs the envelope as `origin_server` with `key`, replacing any signatures.
    pub fn sign(&mut self, key: &Keypair) {
        let sig = key.sign_hex(&self.signing_bytes());
        self.signatures = Signatures::single(&self.origin_server, key.key_id(), sig);
    }

    /// The key ids the origin signed with, in the order they appear (sorted). Callers
    /// fetch keys they lack for these before calling [`Envelope::verify`].
    pub fn signing_key_ids(&self) -> Vec<KeyId> {
        self.signatures
            .for_origin(&self.origin_server)
            .into_iter()
            .filter_map(|(k, _)| KeyId::parse(k).ok())
            .collect()
    }

    /// Verifies the envelope against the origin's keys: at least one signature from a key
    /// `key_for` knows must be valid. Returns the key id that verified.
    pub fn verify(
        &self,
        key_for: impl Fn(&KeyId) -> Option<PublicKey>,
    ) -> Result<KeyId, SignatureError> {
        let pairs = self.signatures.for_origin(&self.origin_server);
        if pairs.is_empty() {
            return Err(SignatureError::Missing);
        }
        let bytes = self.signing_bytes();
        let mut worst = SignatureError::UnknownKey;
        for (kid, sig_hex) in pairs {
            let Ok(kid) = KeyId::parse(kid) else { continue };
            let Some(pk) = key_for(&kid) else { continue };
            let Ok(sig) = hex::decode_exact::<64>(sig_hex) else {
                worst = SignatureError::Malformed;
                continue;
            };
            if pk.verify(&bytes, &sig) {
                return Ok(kid);
            }
            if worst == SignatureError::UnknownKey {
                worst = SignatureError::Invalid;
            }
        }
        Err(worst)
    }

    /// True when `sender` is a user of the origin: its domain is the origin's server name
    /// or the origin's `domain` (from its `/.well-known`). Nobody speaks for another
    /// server's users.
    pub fn sender_belongs_to_origin(&self, origin_domain: Option<&str>) -> bool {
        let d = self.sender.domain();
        d == self.origin_server.as_str() || origin_domain == Some(d)
    }
}

/// Paracord's id for a custom event (`build_custom_envelope`):
/// `$<event_type with '.' → '_'>:<stable id, or 12 hex of sha256(content)>:<ts>:<domain>`.
pub fn custom_event_id(
    event_type: &EventType,
    stable_id: Option<&str>,
    content: &Value,
    origin_ts: i64,
    domain: &str,
) -> Result<EventId, IdError> {
    let stable = match stable_id {
        Some(s) => s.to_owned(),
        None => {
            let bytes = serde_json::to_vec(content).unwrap_or_default();
            hex::encode(&Sha256::digest(&bytes))[..12].to_owned()
        }
    };
    EventId::parse(&format!(
        "${}:{}:{}:{}",
        event_type.as_str().replace('.', "_"),
        stable,
        origin_ts,
        domain
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> Keypair {
        Keypair::from_seed(KeyId::parse("ed25519:k").unwrap(), [7; 32])
    }

    fn env() -> Envelope {
        Envelope {
            event_id: EventId::parse("$1:a.test").unwrap(),
            room_id: RoomId::parse("!1:a.test").unwrap(),
            event_type: EventType::parse("m.message").unwrap(),
            sender: UserId::parse("@u:a.test").unwrap(),
            origin_server: ServerName::parse("a.test").unwrap(),
            origin_ts: 5,
            content: json!({"b": 1, "a": [true]}),
            depth: 0,
            state_key: None,
            signatures: Signatures::default(),
        }
    }

    #[test]
    fn sign_verify_and_flat_form() {
        let k = key();
        let mut e = env();
        assert_eq!(
            e.verify(|_| Some(k.public_key())),
            Err(SignatureError::Missing)
        );
        e.sign(&k);
        assert_eq!(e.verify(|_| Some(k.public_key())).unwrap(), *k.key_id());
        assert_eq!(e.verify(|_| None), Err(SignatureError::UnknownKey));
        // Paracord's flat map form.
        let sig = k.sign_hex(&e.signing_bytes());
        e.signatures = serde_json::from_value(json!({ "ed25519:k": sig })).unwrap();
        assert!(e.verify(|_| Some(k.public_key())).is_ok());
        // Upper-case hex is refused (stricter than Paracord).
        e.signatures = serde_json::from_value(json!({ "ed25519:k": sig.to_uppercase() })).unwrap();
        assert_eq!(
            e.verify(|_| Some(k.public_key())),
            Err(SignatureError::Malformed)
        );
        e.sign(&k);
        e.content = json!({"b": 2});
        assert_eq!(
            e.verify(|_| Some(k.public_key())),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn wire_is_fixed_point_and_depth_kept() {
        let mut e = env();
        e.sign(&key());
        let wire = e.to_wire();
        let back = Envelope::from_wire(&wire).unwrap();
        assert_eq!(back.depth, 0);
        assert_eq!(back.to_wire(), wire);
        assert!(back.is_wire_form(&wire));
        assert!(String::from_utf8(wire)
            .unwrap()
            .contains("\"state_key\":null"));
    }

    #[test]
    fn signatures_shape_is_bounded() {
        assert!(serde_json::from_value::<Signatures>(json!({"a": 1})).is_err());
        assert!(serde_json::from_value::<Signatures>(json!({"a": {"k": 1}})).is_err());
        let many: Map<String, Value> = (0..17)
            .map(|i| (format!("ed25519:{i}"), json!("x")))
            .collect();
        assert!(serde_json::from_value::<Signatures>(Value::Object(many)).is_err());
    }

    #[test]
    fn sender_must_belong_to_origin() {
        let mut e = env();
        assert!(e.sender_belongs_to_origin(None));
        e.sender = UserId::parse("@m:else.test").unwrap();
        assert!(!e.sender_belongs_to_origin(Some("a.test")));
        assert!(e.sender_belongs_to_origin(Some("else.test")));
    }
}
