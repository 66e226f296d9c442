//! Identifier types that can only hold valid values.
//!
//! Everything a peer names — its server, its keys, events, rooms and users — arrives as
//! text chosen by an outsider. These types are the single place that text is checked, so
//! code holding a `RoomId` never has to ask whether it is empty, oversized, full of control
//! characters or missing its domain. The rules follow PROTOCOL.md: ids are non-empty, at
//! most 255 bytes, free of NUL and other control characters, and carry a sigil and a
//! `:domain` suffix; server names are DNS-like and compared exactly.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest id, in bytes, that parafed accepts (PROTOCOL.md "at most 255 bytes").
pub const MAX_ID_BYTES: usize = 255;

/// Why a piece of text is not a valid identifier. The message names the kind of id and the
/// rule it broke, so an error body built from it tells the sender what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {reason}")]
pub struct IdError {
    pub kind: &'static str,
    pub reason: &'static str,
}

fn err(kind: &'static str, reason: &'static str) -> IdError {
    IdError { kind, reason }
}

/// Length and character rules shared by every id.
fn check_common(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(err(kind, "must not be empty"));
    }
    if s.len() > MAX_ID_BYTES {
        return Err(err(kind, "longer than 255 bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(err(kind, "contains a control character"));
    }
    Ok(())
}

/// A DNS-like name: labels of ASCII letters, digits and `-` joined by dots, optionally
/// followed by `:port`. Used for server names and for the domain part of ids.
fn check_dns_like(kind: &'static str, s: &str) -> Result<(), IdError> {
    check_common(kind, s)?;
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(kind, "port must be 1 to 5 decimal digits"));
        }
        if p.parse::<u32>().map_or(true, |n| n == 0 || n > 65535) {
            return Err(err(kind, "port out of range"));
        }
    }
    if host.is_empty() {
        return Err(err(kind, "host name must not be empty"));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(err(kind, "host name has an empty label"));
        }
        if label.len() > 63 {
            return Err(err(kind, "host name label longer than 63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(err(
                kind,
                "host name may hold only ASCII letters, digits, '-' and '.'",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(err(kind, "host name label starts or ends with '-'"));
        }
    }
    Ok(())
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The id as text, exactly as it was received.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Consumes the id, giving back its text.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse(&s)?;
                Ok(Self(s))
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
                Self::try_from(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_newtype!(
    /// A server's name (`alpha.test`, `chat.example.org:8448`). Compared exactly, case
    /// included, as Paracord compares origins.
    ServerName
);

impl ServerName {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check_dns_like("server name", s)?;
        Ok(Self(s.to_owned()))
    }
}

string_newtype!(
    /// A signing key's id: `ed25519:<name>`, where the name is 1–64 characters of ASCII
    /// letters, digits and `_`, `-`, `.` (Paracord uses `ed25519:auto`).
    KeyId
);

impl KeyId {
    pub const ALGORITHM_PREFIX: &'static str = "ed25519:";

    pub fn parse(s: &str) -> Result<Self, IdError> {
        const K: &str = "key id";
        check_common(K, s)?;
        let Some(name) = s.strip_prefix(Self::ALGORITHM_PREFIX) else {
            return Err(err(K, "must start with 'ed25519:'"));
        };
        if name.is_empty() || name.len() > 64 {
            return Err(err(K, "name after 'ed25519:' must be 1 to 64 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(err(
                K,
                "name after 'ed25519:' may hold only ASCII letters, digits, '_', '-' and '.'",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The part after `ed25519:`.
    pub fn name(&self) -> &str {
        &self.0[Self::ALGORITHM_PREFIX.len()..]
    }
}

/// Splits `<sigil><local>:<domain>`; `last` chooses whether the domain follows the last
/// colon (event ids, whose opaque part may itself hold colons) or the first (rooms, users).
fn split_sigiled<'a>(
    kind: &'static str,
    s: &'a str,
    sigil: char,
    last: bool,
) -> Result<(&'a str, &'a str), IdError> {
    check_common(kind, s)?;
    let Some(rest) = s.strip_prefix(sigil) else {
        return Err(err(
            kind,
            match sigil {
                '$' => "must start with '$'",
                '!' => "must start with '!'",
                _ => "must start with '@'",
            },
        ));
    };
    let split = if last {
        rest.rsplit_once(':')
    } else {
        rest.split_once(':')
    };
    let Some((local, domain)) = split else {
        return Err(err(kind, "must end in ':<domain>'"));
    };
    if local.is_empty() {
        return Err(err(kind, "part before ':<domain>' must not be empty"));
    }
    check_dns_like(kind, domain).map_err(|e| IdError {
        kind,
        reason: match e.reason {
            "must not be empty" => "domain must not be empty",
            _ => "domain is not a valid host name",
        },
    })?;
    Ok((local, domain))
}

string_newtype!(
    /// An event id, `$<opaque>:<domain>`. The opaque part may hold colons and any
    /// non-control Unicode (Paracord puts raw emoji in reaction ids); the domain is what
    /// follows the last colon.
    EventId
);

impl EventId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        split_sigiled("event id", s, '$', true)?;
        Ok(Self(s.to_owned()))
    }

    pub fn domain(&self) -> &str {
        self.0.rsplit_once(':').map_or("", |(_, d)| d)
    }
}

string_newtype!(
    /// A room id, `!<guild_id>:<domain>`. The domain is the server hosting the room.
    RoomId
);

impl RoomId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        split_sigiled("room id", s, '!', false)?;
        Ok(Self(s.to_owned()))
    }

    /// The host's domain: the room is hosted by the server whose `domain` this is.
    pub fn domain(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, d)| d)
    }

    /// The guild id (the part between `!` and the first `:`).
    pub fn guild_id(&self) -> &str {
        self.0[1..].split_once(':').map_or("", |(g, _)| g)
    }
}

string_newtype!(
    /// A user id, `@<user>:<domain>`.
    UserId
);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        split_sigiled("user id", s, '@', false)?;
        Ok(Self(s.to_owned()))
    }

    pub fn domain(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, d)| d)
    }

    pub fn localpart(&self) -> &str {
        self.0[1..].split_once(':').map_or("", |(l, _)| l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for ok in ["peer.test", "a", "chat.example.org:8448", "x-1.y"] {
            assert!(ServerName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a..b", ".a", "a.", "-a", "a_b", "a:0", "a:99999", "a:", "a b", "é.test", "a\0",
        ] {
            assert!(ServerName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ServerName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn key_ids() {
        assert_eq!(KeyId::parse("ed25519:auto").unwrap().name(), "auto");
        for bad in [
            "",
            "ed25519:",
            "rsa:x",
            "ed25519:a b",
            "ED25519:x",
            "ed25519:é",
        ] {
            assert!(KeyId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn event_room_user_ids() {
        let e = EventId::parse("$m_reaction_add:90010:👍:1700000000012:peer.test").unwrap();
        assert_eq!(e.domain(), "peer.test");
        let r = RoomId::parse("!7010:peer.test").unwrap();
        assert_eq!((r.guild_id(), r.domain()), ("7010", "peer.test"));
        let u = UserId::parse("@alice:peer.test").unwrap();
        assert_eq!((u.localpart(), u.domain()), ("alice", "peer.test"));
        for bad in [
            "",
            "$",
            "$:peer.test",
            "$x",
            "$x:",
            "x:peer.test",
            "$a\u{0}:b",
            "$a:b c",
        ] {
            assert!(EventId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RoomId::parse("!:a").is_err());
        assert!(
            UserId::parse("@a:b:c").is_err(),
            "user domain must be DNS-like"
        );
        assert!(EventId::parse(&format!("${}:a.test", "x".repeat(250))).is_err());
    }

    #[test]
    fn serde_rejects_invalid() {
        let r: Result<RoomId, _> = serde_json::from_str("\"nope\"");
        assert!(r.unwrap_err().to_string().contains("room id"));
    }
}
