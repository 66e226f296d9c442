//! parafed: the federation delivery system for Paracord servers.
//!
//! The library holds everything the `parafed` binary and the `parafed-worker` fleet share:
//!
//! * [`protocol`] — the Paracord federation protocol as pure types and bytes;
//! * [`config`] — the TOML configuration with environment overrides;
//! * [`store`] — Postgres, through Diesel: schema, migrations, pool and queries;
//! * [`telemetry`] — logging set-up;
//! * [`backfill`] — the outbound rows a destination's deferrals owe, written when it
//!   may send again (the deliver job) or before an operator's command names it.
//!
//! Ingress (hyper), trust and admin live beside these as they are built; the job handlers
//! and the worker process are the `parafed-jobs` crate in `jobs/`.

pub mod admin;
pub mod app;
pub mod backfill;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod devservers;
pub mod ingress;
pub mod process;
pub mod protocol;
pub mod queue;
pub mod remote;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod trust;
