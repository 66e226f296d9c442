//! parafed's integration tests, one binary (the long chaos and scale runs are binaries of
//! their own, `tests/chaos.rs` and `tests/scale.rs`). Every test starts what it needs —
//! throwaway Postgres and Redis from the installed binaries, parafed instances, peers on
//! 127.0.0.1 — through the shared harness in `tests/support/`.
//!
//! One binary rather than one per file: each test binary links the whole of parafed, so
//! fifteen of them cost minutes of linking on a clean build.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod cli;
mod delivery;
mod harness;
mod ingress_api;
mod ingress_fuzz;
mod ingress_load;
mod ingress_paracord;
mod ingress_server;
mod keys_follow;
mod monitoring;
mod pipeline;
mod protocol_props;
mod queue_stream;
mod relay;
mod store;
mod trust;
mod vectors;
