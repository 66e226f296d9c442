//! The fleet-wide numbers behind parafed's gauges (`parafed_destinations`,
//! `parafed_deliveries_waiting`, `parafed_outbound_deferrals`, `parafed_events_held`,
//! `parafed_peers_quarantined`).
//!
//! Two statements, each answered from an index or a small table: destinations are one
//! row each (a `GROUP BY` over `destination_health`, joined to the operator's
//! `peer_trust` decisions); the waiting and held counts use the partial indexes
//! `outbound_queue_destination_waiting` and `federation_events_held`. Every worker runs them
//! every `worker.gauges_interval_ms` (docs/operations.md gives the cost).

use std::collections::BTreeMap;

use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::StoreError;

/// The counts, as of one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetCounts {
    /// Destinations by state: `healthy`, `backing_off`, `held`, `paused`, and `blocked`
    /// (the peer is blocked by the operator; counted there instead of under its
    /// delivery state). Every state is present, at zero if need be.
    pub destinations: BTreeMap<&'static str, i64>,
    /// Deliveries not yet settled (rows).
    pub waiting: i64,
    /// Deferrals (`store::deferrals`): (destination, room) pairs owed the room's events
    /// without a row per event.
    pub deferrals: i64,
    /// Inbound events held (quarantine).
    pub held: i64,
    /// Quarantined peers put there automatically / by an operator.
    pub quarantined_automatic: i64,
    pub quarantined_operator: i64,
}

/// The destination states the gauges report.
pub const DESTINATION_STATES: [&str; 5] = ["healthy", "backing_off", "held", "paused", "blocked"];

#[derive(QueryableByName)]
struct StateCount {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Totals {
    #[diesel(sql_type = BigInt)]
    waiting: i64,
    #[diesel(sql_type = BigInt)]
    deferrals: i64,
    #[diesel(sql_type = BigInt)]
    held: i64,
    #[diesel(sql_type = BigInt)]
    quarantined_automatic: i64,
    #[diesel(sql_type = BigInt)]
    quarantined_operator: i64,
}

/// Reads the counts.
pub async fn fleet_counts(conn: &mut AsyncPgConnection) -> Result<FleetCounts, StoreError> {
    let states: Vec<StateCount> = diesel::sql_query(
        "SELECT CASE WHEN t.state = 'block' THEN 'blocked' ELSE d.state END AS state, \
                count(*) AS n \
         FROM destination_health d LEFT JOIN peer_trust t ON t.server_name = d.destination \
         GROUP BY 1",
    )
    .load(conn)
    .await?;
    let t: Totals = diesel::sql_query(
        "SELECT (SELECT count(*) FROM outbound_queue WHERE status = 'pending') AS waiting, \
                (SELECT count(*) FROM outbound_deferrals) AS deferrals, \
                (SELECT count(*) FROM federation_events WHERE status = 'held') AS held, \
                (SELECT count(*) FROM peer_trust WHERE state = 'quarantine' AND automatic \
                   AND (until IS NULL OR until > now())) \
                  AS quarantined_automatic, \
                (SELECT count(*) FROM peer_trust WHERE state = 'quarantine' AND NOT automatic \
                   AND (until IS NULL OR until > now())) \
                  AS quarantined_operator",
    )
    .get_result(conn)
    .await?;
    let mut destinations: BTreeMap<&'static str, i64> =
        DESTINATION_STATES.iter().map(|s| (*s, 0)).collect();
    for s in states {
        if let Some(name) = DESTINATION_STATES.iter().find(|n| **n == s.state) {
            destinations.insert(name, s.n);
        }
    }
    Ok(FleetCounts {
        destinations,
        waiting: t.waiting,
        deferrals: t.deferrals,
        held: t.held,
        quarantined_automatic: t.quarantined_automatic,
        quarantined_operator: t.quarantined_operator,
    })
}
