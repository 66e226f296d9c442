//! Talking to peers: the pooled HTTP client, where a peer is (its directory entry), and
//! its keys (the key ring). Ingress uses these to authenticate requests; the delivery
//! workers use the same client to send.

pub mod address;
pub mod directory;
pub mod http;
pub mod keyring;
pub mod send;

pub use directory::{PeerDirectory, PeerEndpoint};
pub use http::{HttpClient, HttpError, Response};
pub use keyring::{KeyLookupError, KeyRing};
