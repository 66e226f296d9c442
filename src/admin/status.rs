//! `status`: the fleet at a glance — which ingress and worker processes are alive, each
//! queue's depth, age and pause, destinations by state, deliveries by state and the last
//! hour's attempts by outcome, dead letters and held events.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{queues, AdminError};
use crate::app::App;
use crate::queue::heartbeat::Heartbeat;
use crate::store::{self, StoreError};

/// The overview (`GET /status`).
#[derive(Debug, Serialize)]
pub struct Status {
    pub server_name: String,
    pub version: &'static str,
    /// Our active signing key id; `null` when none (run `parafed keys generate`).
    pub active_key: Option<String>,
    /// Processes whose heartbeat arrived in the last 30 s.
    pub processes: Vec<Heartbeat>,
    pub queues: Vec<queues::QueueInfo>,
    /// Destinations per state (`healthy`, `backing_off`, `held`, `paused`).
    pub destinations: BTreeMap<String, i64>,
    /// Deliveries per row status (`pending`, `delivered`, `dead`, `cancelled`).
    pub deliveries: BTreeMap<String, i64>,
    /// Attempts of the last hour per outcome (`delivered`, or the error class).
    pub attempts_last_hour: BTreeMap<String, i64>,
    /// Inbound events per status (`pending`, `accepted`, `rejected`, `held`).
    pub events: BTreeMap<String, i64>,
    /// Dead deliveries and dead jobs (all queues).
    pub dead_letters: DeadLetters,
    /// Inbound events held by quarantine.
    pub held_events: i64,
}

#[derive(Debug, Serialize)]
pub struct DeadLetters {
    pub deliveries: i64,
    pub jobs: u64,
}

pub async fn status(app: &App) -> Result<Status, AdminError> {
    let now = chrono::Utc::now();
    let (counts, active_key, outcomes) = {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        let counts = store::status::counts(&mut conn).await?;
        let key = store::keys::active(&mut conn)
            .await?
            .map(|k| k.key_id().to_string());
        let outcomes =
            store::inspect::attempt_outcomes(&mut conn, now - chrono::Duration::hours(1)).await?;
        (counts, key, outcomes)
    };
    let queues = queues::list(app).await?;
    let processes = app.queue.live_processes(now.timestamp_millis()).await?;
    Ok(Status {
        server_name: app.cfg.server_name.to_string(),
        version: env!("CARGO_PKG_VERSION"),
        active_key,
        processes,
        dead_letters: DeadLetters {
            deliveries: counts.outbound.get("dead").copied().unwrap_or(0),
            jobs: queues.iter().map(|q| q.dead).sum(),
        },
        held_events: counts.events.get("held").copied().unwrap_or(0),
        queues,
        destinations: counts.destinations,
        deliveries: counts.outbound,
        attempts_last_hour: outcomes.into_iter().collect(),
        events: counts.events,
    })
}
