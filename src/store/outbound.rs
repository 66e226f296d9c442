//! The outbound queue and per-destination delivery state.
//!
//! One row per (destination, event) in `outbound_queue`; one row per destination in
//! `destination_health`, which holds everything about how a peer is doing: failures,
//! backoff, the last error, and the drain lease. A dead peer costs one health row and its
//! pending rows — never a set of retrying jobs.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::schema::{destination_health as dh, outbound_queue as oq};
use super::StoreError;

/// A destination's delivery state.
#[derive(Clone, Debug, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = dh, check_for_backend(diesel::pg::Pg))]
pub struct Health {
    pub destination: String,
    pub state: String,
    pub consecutive_failures: i32,
    pub consecutive_forbidden: i32,
    pub backoff_until: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_status_code: Option<i32>,
    /// Why nothing is sent although nothing failed (a quarantined peer).
    pub paused_reason: Option<String>,
}

/// A pending row to send.
#[derive(Clone, Debug, Queryable)]
pub struct Pending {
    pub id: i64,
    pub event_id: String,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

/// Writes the outbound rows of one event (idempotent) and makes sure each destination has
/// a health row. Returns the destinations that got a new row.
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    event_id: &str,
    destinations: &[String],
) -> Result<Vec<String>, StoreError> {
    if destinations.is_empty() {
        return Ok(Vec::new());
    }
    // Sorted, so concurrent fan-outs that add the same new destinations take their locks
    // in one order and cannot deadlock (see `events::insert`).
    let mut destinations: Vec<&String> = destinations.iter().collect();
    destinations.sort_unstable();
    destinations.dedup();
    let health: Vec<_> = destinations
        .iter()
        .map(|d| dh::destination.eq(*d))
        .collect();
    diesel::insert_into(dh::table)
        .values(&health)
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    let rows: Vec<_> = destinations
        .iter()
        .map(|d| (oq::destination.eq(*d), oq::event_id.eq(event_id)))
        .collect();
    Ok(diesel::insert_into(oq::table)
        .values(&rows)
        .on_conflict_do_nothing()
        .returning(oq::destination)
        .get_results(conn)
        .await?)
}

pub async fn health(
    conn: &mut AsyncPgConnection,
    destination: &str,
) -> Result<Option<Health>, StoreError> {
    Ok(dh::table
        .filter(dh::destination.eq(destination))
        .select(Health::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// Takes the destination's drain lease for `ttl` unless another live worker holds it.
pub async fn acquire_lease(
    conn: &mut AsyncPgConnection,
    destination: &str,
    owner: &str,
    ttl: chrono::Duration,
) -> Result<bool, StoreError> {
    let now = Utc::now();
    let n = diesel::update(
        dh::table.filter(dh::destination.eq(destination)).filter(
            dh::lease_until
                .is_null()
                .or(dh::lease_until.lt(now))
                .or(dh::lease_owner.eq(owner)),
        ),
    )
    .set((dh::lease_owner.eq(owner), dh::lease_until.eq(now + ttl)))
    .execute(conn)
    .await?;
    Ok(n == 1)
}

pub async fn release_lease(
    conn: &mut AsyncPgConnection,
    destination: &str,
    owner: &str,
) -> Result<(), StoreError> {
    diesel::update(
        dh::table
            .filter(dh::destination.eq(destination))
            .filter(dh::lease_owner.eq(owner)),
    )
    .set((
        dh::lease_owner.eq(None::<String>),
        dh::lease_until.eq(None::<DateTime<Utc>>),
    ))
    .execute(conn)
    .await?;
    Ok(())
}

/// The oldest pending rows of a destination, in order.
pub async fn next_batch(
    conn: &mut AsyncPgConnection,
    destination: &str,
    limit: i64,
) -> Result<Vec<Pending>, StoreError> {
    Ok(oq::table
        .filter(oq::destination.eq(destination))
        .filter(oq::status.eq_any(["pending", "inflight"]))
        .order(oq::id.asc())
        .limit(limit)
        .select((oq::id, oq::event_id, oq::attempts, oq::created_at))
        .load(conn)
        .await?)
}

/// True when the destination has rows waiting.
pub async fn has_pending(
    conn: &mut AsyncPgConnection,
    destination: &str,
) -> Result<bool, StoreError> {
    Ok(diesel::select(diesel::dsl::exists(
        oq::table
            .filter(oq::destination.eq(destination))
            .filter(oq::status.eq_any(["pending", "inflight"])),
    ))
    .get_result(conn)
    .await?)
}

/// Outcome of one row's attempt.
pub enum RowOutcome<'a> {
    Delivered,
    Dead(&'a str),
    /// Still pending; the error is remembered.
    Retry(&'a str),
}

pub async fn settle(
    conn: &mut AsyncPgConnection,
    id: i64,
    outcome: RowOutcome<'_>,
) -> Result<(), StoreError> {
    let now = Utc::now();
    let q = diesel::update(oq::table.filter(oq::id.eq(id)));
    match outcome {
        RowOutcome::Delivered => {
            q.set((
                oq::status.eq("delivered"),
                oq::attempts.eq(oq::attempts + 1),
                oq::delivered_at.eq(now),
                oq::updated_at.eq(now),
            ))
            .execute(conn)
            .await?
        }
        RowOutcome::Dead(reason) => {
            q.set((
                oq::status.eq("dead"),
                oq::attempts.eq(oq::attempts + 1),
                oq::dead_reason.eq(reason),
                oq::last_error.eq(reason),
                oq::updated_at.eq(now),
            ))
            .execute(conn)
            .await?
        }
        RowOutcome::Retry(error) => {
            q.set((
                oq::status.eq("pending"),
                oq::attempts.eq(oq::attempts + 1),
                oq::last_error.eq(error),
                oq::updated_at.eq(now),
            ))
            .execute(conn)
            .await?
        }
    };
    Ok(())
}

/// Marks rows delivered in one statement.
pub async fn delivered(conn: &mut AsyncPgConnection, ids: &[i64]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let now = Utc::now();
    diesel::update(oq::table.filter(oq::id.eq_any(ids)))
        .set((
            oq::status.eq("delivered"),
            oq::attempts.eq(oq::attempts + 1),
            oq::delivered_at.eq(now),
            oq::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// A successful delivery: the destination is healthy again.
pub async fn destination_ok(
    conn: &mut AsyncPgConnection,
    destination: &str,
) -> Result<(), StoreError> {
    let now = Utc::now();
    diesel::update(dh::table.filter(dh::destination.eq(destination)))
        .set((
            dh::state.eq("healthy"),
            dh::consecutive_failures.eq(0),
            dh::consecutive_forbidden.eq(0),
            dh::backoff_until.eq(None::<DateTime<Utc>>),
            dh::paused_reason.eq(None::<String>),
            dh::last_success_at.eq(now),
            dh::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Holds the destination back until `until` for a reason that is not a failure (a
/// quarantined peer): nothing is sent, no failure is counted, and the scheduler brings
/// it back then to look again.
pub async fn destination_held(
    conn: &mut AsyncPgConnection,
    destination: &str,
    until: DateTime<Utc>,
    reason: &str,
) -> Result<(), StoreError> {
    diesel::update(dh::table.filter(dh::destination.eq(destination)))
        .set((
            dh::state.eq("backoff"),
            dh::backoff_until.eq(until),
            dh::paused_reason.eq(reason),
            dh::updated_at.eq(Utc::now()),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Cancels every row still waiting for `destination` (a peer the operator blocked);
/// returns how many.
pub async fn cancel_waiting(
    conn: &mut AsyncPgConnection,
    destination: &str,
    reason: &str,
) -> Result<usize, StoreError> {
    Ok(diesel::update(
        oq::table
            .filter(oq::destination.eq(destination))
            .filter(oq::status.eq_any(["pending", "inflight"])),
    )
    .set((
        oq::status.eq("cancelled"),
        oq::dead_reason.eq(reason),
        oq::updated_at.eq(Utc::now()),
    ))
    .execute(conn)
    .await?)
}

/// What a failed request says about its destination.
pub struct DestinationFailure<'a> {
    pub error: &'a str,
    pub status: Option<i32>,
    /// A 403: runs of these are counted (`consecutive_forbidden`).
    pub forbidden: bool,
}

/// Records a failure on the destination. With `backoff_until` the failure concerns the
/// destination (it backs off until then, and counts towards the next backoff); without,
/// it concerned one event (a permanent 4xx) and is only noted.
pub async fn destination_failed(
    conn: &mut AsyncPgConnection,
    destination: &str,
    failure: &DestinationFailure<'_>,
    backoff_until: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    diesel::sql_query(
        "UPDATE destination_health SET \
           state = CASE WHEN $2::timestamptz IS NULL THEN state ELSE 'backoff' END, \
           consecutive_failures = consecutive_failures + (CASE WHEN $2 IS NULL THEN 0 ELSE 1 END), \
           backoff_until = COALESCE($2, backoff_until), \
           consecutive_forbidden = CASE WHEN $5 THEN consecutive_forbidden + 1 ELSE 0 END, \
           last_error_at = now(), last_error = $3, last_status_code = $4, updated_at = now() \
         WHERE destination = $1",
    )
    .bind::<Text, _>(destination)
    .bind::<diesel::sql_types::Nullable<Timestamptz>, _>(backoff_until)
    .bind::<Text, _>(failure.error)
    .bind::<diesel::sql_types::Nullable<diesel::sql_types::Integer>, _>(failure.status)
    .bind::<diesel::sql_types::Bool, _>(failure.forbidden)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(QueryableByName)]
struct DestRow {
    #[diesel(sql_type = Text)]
    destination: String,
}

/// Destinations with waiting rows that nobody is draining and whose backoff (if any) has
/// ended: what the scheduler pushes deliver jobs for.
pub async fn due_destinations(
    conn: &mut AsyncPgConnection,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    let rows: Vec<DestRow> = diesel::sql_query(
        "SELECT h.destination FROM destination_health h \
         WHERE h.state <> 'paused' \
           AND (h.backoff_until IS NULL OR h.backoff_until <= now()) \
           AND (h.lease_until IS NULL OR h.lease_until < now()) \
           AND EXISTS (SELECT 1 FROM outbound_queue o \
                       WHERE o.destination = h.destination AND o.status IN ('pending', 'inflight')) \
         ORDER BY h.backoff_until NULLS FIRST LIMIT $1",
    )
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.destination).collect())
}

/// Rows older than `cutoff` still waiting become dead ("expired").
pub async fn expire(
    conn: &mut AsyncPgConnection,
    cutoff: DateTime<Utc>,
) -> Result<usize, StoreError> {
    Ok(diesel::sql_query(
        "UPDATE outbound_queue SET status = 'dead', dead_reason = 'expired: not delivered within max_age', \
           updated_at = now() \
         WHERE status IN ('pending', 'inflight') AND created_at < $1",
    )
    .bind::<Timestamptz, _>(cutoff)
    .execute(conn)
    .await?)
}

/// Destinations among `names` that are healthy now (not backing off, not paused).
pub async fn healthy_among(
    conn: &mut AsyncPgConnection,
    names: &[String],
) -> Result<Vec<String>, StoreError> {
    let rows: Vec<DestRow> = diesel::sql_query(
        "SELECT destination FROM destination_health \
         WHERE destination = ANY($1) AND state = 'healthy'",
    )
    .bind::<Array<Text>, _>(names)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.destination).collect())
}

/// Deletes history older than `cutoff`: delivery attempts, finished outbound rows and
/// local API transactions. Returns the rows deleted, in that order.
pub async fn prune(
    conn: &mut AsyncPgConnection,
    cutoff: DateTime<Utc>,
) -> Result<(usize, usize, usize), StoreError> {
    let attempts = diesel::sql_query("DELETE FROM delivery_attempts WHERE attempted_at < $1")
        .bind::<Timestamptz, _>(cutoff)
        .execute(conn)
        .await?;
    let rows = diesel::sql_query(
        "DELETE FROM outbound_queue WHERE status IN ('delivered', 'dead', 'cancelled') AND updated_at < $1",
    )
    .bind::<Timestamptz, _>(cutoff)
    .execute(conn)
    .await?;
    let txns = diesel::sql_query("DELETE FROM local_transactions WHERE created_at < $1")
        .bind::<Timestamptz, _>(cutoff)
        .execute(conn)
        .await?;
    Ok((attempts, rows, txns))
}
