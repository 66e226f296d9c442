//! The two unauthenticated documents a server publishes: `/.well-known/paracord/server`
//! and `/_paracord/federation/v1/keys`. Field order is alphabetical, as Paracord writes
//! them, so our own documents are byte-compatible with its.

use serde::{Deserialize, Serialize};

use super::ids::{KeyId, ServerName};
use super::keys::{KeyError, PublicKey};

pub const WELL_KNOWN_PATH: &str = "/.well-known/paracord/server";
pub const FEDERATION_PREFIX: &str = "/_paracord/federation/v1";
pub const PROTOCOL_VERSION: &str = "federation-v1";
/// Most keys parafed reads from one `/keys` document.
pub const MAX_PUBLISHED_KEYS: usize = 32;

/// `GET /.well-known/paracord/server`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WellKnown {
    /// The domain user and room ids use; may differ from `server_name`.
    pub domain: String,
    pub enabled: bool,
    /// A path relative to the server's base URL, or an absolute URL.
    pub federation_endpoint: String,
    pub server_name: ServerName,
    pub version: String,
}

impl WellKnown {
    /// The absolute federation endpoint, given the base URL the document was read from.
    pub fn endpoint_url(&self, base_url: &str) -> String {
        if self.federation_endpoint.starts_with("http://")
            || self.federation_endpoint.starts_with("https://")
        {
            self.federation_endpoint.trim_end_matches('/').to_owned()
        } else {
            format!(
                "{}/{}",
                base_url.trim_end_matches('/'),
                self.federation_endpoint.trim_matches('/')
            )
        }
    }
}

/// One key in a `/keys` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedKey {
    pub key_id: KeyId,
    pub public_key: String,
    pub server_name: ServerName,
    /// Unix ms after which the reader should refetch (not a hard expiry: PROTOCOL.md).
    pub valid_until: i64,
}

impl PublishedKey {
    pub fn public_key(&self) -> Result<PublicKey, KeyError> {
        PublicKey::from_hex(&self.public_key)
    }
}

/// `GET /_paracord/federation/v1/keys`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysDocument {
    pub keys: Vec<PublishedKey>,
    pub server_name: ServerName,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_resolution() {
        let mut w = WellKnown {
            domain: "d".into(),
            enabled: true,
            federation_endpoint: "/_paracord/federation/v1".into(),
            server_name: ServerName::parse("a.test").unwrap(),
            version: PROTOCOL_VERSION.into(),
        };
        assert_eq!(
            w.endpoint_url("http://127.0.0.1:1/"),
            "http://127.0.0.1:1/_paracord/federation/v1"
        );
        w.federation_endpoint = "https://x.test/fed/".into();
        assert_eq!(w.endpoint_url("http://ignored"), "https://x.test/fed");
    }
}
