//! The Paracord Native Federation Protocol, as bytes and types. Pure: no I/O, no clocks
//! (callers pass `now`), no randomness except key generation.
//!
//! Everything here is checked byte for byte against the Paracord v0.8.5 vectors in
//! `tests/vectors/` (see `tests/it/vectors.rs`), and is stricter than Paracord where
//! PROTOCOL.md says so.

pub mod discovery;
pub mod envelope;
pub mod hex;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod relay;
pub mod transport;

pub use envelope::{Envelope, EventType, Signatures, StateKey};
pub use ids::{EventId, IdError, KeyId, RoomId, ServerName, UserId};
pub use keys::{Keypair, PublicKey};
pub use transport::TransportHeaders;
