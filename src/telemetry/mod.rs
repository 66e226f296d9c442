//! What a process tells its operator: logs (here) and Prometheus metrics ([`metrics`]).
//!
//! Logging: structured `tracing` output on stderr (stdout is for command data).
//!
//! `PARAFED_LOG` sets the filter (default `info`), `PARAFED_LOG_FORMAT=json` switches to
//! one JSON object per line for log shippers.

pub mod metrics;

pub use metrics::signature_checked;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_env("PARAFED_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("PARAFED_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
