//! The gauges every worker reports: queue depths and the age of the oldest job per
//! queue (Redis), destinations by state, the delivery backlog, held events and
//! quarantined peers (Postgres), and this worker's heartbeat.
//!
//! The numbers are fleet-wide, so every worker reports the same values: aggregate them
//! with `max`, not `sum` (the alert rules in `prometheus/` do). Cheap enough to run in
//! every worker: one pipelined Redis round trip per queue and two indexed statements
//! (docs/operations.md, "Metrics").

use parafed::queue::QueueName;
use parafed::store::gauges;

use crate::context::{Ctx, JobError};

/// Sets this worker's heartbeat to now.
pub fn heartbeat() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::gauge!("parafed_worker_heartbeat_timestamp_seconds").set(now);
}

/// Reads every fleet-wide number and sets its gauge.
pub async fn collect(ctx: &Ctx) -> Result<(), JobError> {
    let app = &ctx.app;
    let now_ms = chrono::Utc::now().timestamp_millis();
    for q in QueueName::ALL {
        let st = app.queue.stats(q).await?;
        let name = q.as_str();
        for (state, n) in [
            ("ready", st.ready),
            ("in_flight", st.in_flight),
            ("dead", st.dead),
        ] {
            metrics::gauge!("parafed_queue_jobs", "queue" => name, "state" => state).set(n as f64);
        }
        let age = st
            .oldest_ms
            .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
        metrics::gauge!("parafed_queue_oldest_job_age_seconds", "queue" => name).set(age);
    }
    let counts = {
        let mut conn = app.pool.get().await?;
        gauges::fleet_counts(&mut conn).await?
    };
    for (state, n) in &counts.destinations {
        metrics::gauge!("parafed_destinations", "state" => *state).set(*n as f64);
    }
    metrics::gauge!("parafed_deliveries_waiting").set(counts.waiting as f64);
    metrics::gauge!("parafed_outbound_deferrals").set(counts.deferrals as f64);
    metrics::gauge!("parafed_events_held").set(counts.held as f64);
    metrics::gauge!("parafed_peers_quarantined", "automatic" => "true")
        .set(counts.quarantined_automatic as f64);
    metrics::gauge!("parafed_peers_quarantined", "automatic" => "false")
        .set(counts.quarantined_operator as f64);
    Ok(())
}
