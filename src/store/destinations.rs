//! `destination_health`: one row per destination holding its delivery state (see
//! `delivery::destination` for the states and their transitions) and its drain lease.
//!
//! The state columns are written in one place, [`update`]: load, apply a transition,
//! save only if nobody saved in between (`version`), else load again and re-apply — so a
//! drain that loaded the row before an operator paused the destination cannot undo the
//! pause. The lease columns are separate: the worker holding the lease is the only one
//! sending to the destination, so at most `window` requests are ever in flight to it.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::prepared::prepared;
use super::schema::destination_health as dh;
use super::StoreError;

/// A destination's stored state, column for column.
#[derive(Clone, Debug, PartialEq, Queryable, QueryableByName, Selectable, serde::Serialize)]
#[diesel(table_name = dh, check_for_backend(diesel::pg::Pg))]
pub struct Health {
    pub destination: String,
    /// `healthy`, `backing_off`, `held` or `paused`.
    pub state: String,
    /// Consecutive destination failures (while backing off).
    pub consecutive_failures: i32,
    /// 403s in a row.
    pub consecutive_forbidden: i32,
    /// Nothing is sent before this (backing off, held).
    pub backoff_until: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_status_code: Option<i32>,
    /// Why nothing is sent although nothing failed (held: quarantine; paused: operator).
    pub paused_reason: Option<String>,
    /// Who paused it.
    pub paused_by: Option<String>,
    /// Bumped by every save of the state.
    pub version: i64,
}

/// Makes sure each destination has a row (a new one is healthy). Pass names sorted:
/// concurrent callers then insert in one order.
///
/// Rows that exist are filtered out before the insert: an `INSERT … ON CONFLICT DO
/// NOTHING` on a row every fan-out names was the slowest statement of the pipeline
/// (it waits on the row's writers); a read by primary key does not.
pub async fn ensure(conn: &mut AsyncPgConnection, names: &[&str]) -> Result<(), StoreError> {
    if names.is_empty() {
        return Ok(());
    }
    prepared(
        diesel::sql_query(
            "INSERT INTO destination_health (destination) \
         SELECT d FROM UNNEST((SELECT $1::text[])) AS d \
          WHERE NOT EXISTS (SELECT 1 FROM destination_health h WHERE h.destination = d) \
         ON CONFLICT DO NOTHING",
        )
        .bind::<Array<Text>, _>(names),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A destination's row, if it has one.
pub async fn get(
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

/// Saves `h` if the stored version is still `h.version`; true when saved.
async fn save(conn: &mut AsyncPgConnection, h: &Health) -> Result<bool, StoreError> {
    let n = diesel::update(
        dh::table
            .filter(dh::destination.eq(&h.destination))
            .filter(dh::version.eq(h.version)),
    )
    .set((
        dh::state.eq(&h.state),
        dh::consecutive_failures.eq(h.consecutive_failures),
        dh::consecutive_forbidden.eq(h.consecutive_forbidden),
        dh::backoff_until.eq(h.backoff_until),
        dh::last_success_at.eq(h.last_success_at),
        dh::last_error_at.eq(h.last_error_at),
        dh::last_error.eq(&h.last_error),
        dh::last_status_code.eq(h.last_status_code),
        dh::paused_reason.eq(&h.paused_reason),
        dh::paused_by.eq(&h.paused_by),
        dh::version.eq(h.version + 1),
        dh::updated_at.eq(Utc::now()),
    ))
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// The one save path of a destination's state: loads its row, applies `change`, saves
/// it unless another process saved first (then loads and applies again). Returns the
/// state saved; `None` when the destination has no row.
pub async fn update<F>(
    conn: &mut AsyncPgConnection,
    destination: &str,
    change: F,
) -> Result<Option<Health>, StoreError>
where
    F: FnMut(Health) -> Result<Health, StoreError>,
{
    update_from(conn, destination, None, change).await
}

/// [`update`], starting from a copy of the row the caller already holds (saves a read
/// when nobody changed it since).
pub async fn update_from<F>(
    conn: &mut AsyncPgConnection,
    destination: &str,
    mut current: Option<Health>,
    mut change: F,
) -> Result<Option<Health>, StoreError>
where
    F: FnMut(Health) -> Result<Health, StoreError>,
{
    for _ in 0..8 {
        let h = match current.take() {
            Some(h) => h,
            None => match get(conn, destination).await? {
                Some(h) => h,
                None => return Ok(None),
            },
        };
        let version = h.version;
        let mut next = change(h)?;
        next.version = version;
        if save(conn, &next).await? {
            next.version = version + 1;
            return Ok(Some(next));
        }
    }
    Err(StoreError::Conflict(format!(
        "destination {destination} changed under every attempt to update it; try again"
    )))
}

/// [`update_from`] for many destinations at once (a probe round's results): each
/// `(row as loaded, change)` is applied and all are saved in one statement, each only if
/// its stored version is still the loaded one; those another process saved first are
/// loaded and changed again one by one, as [`update_from`] does. Returns the states
/// saved, in no particular order (a destination whose row is gone is missing).
pub async fn update_many<F>(
    conn: &mut AsyncPgConnection,
    loaded: Vec<Health>,
    mut change: F,
) -> Result<Vec<Health>, StoreError>
where
    F: FnMut(Health) -> Result<Health, StoreError>,
{
    if loaded.is_empty() {
        return Ok(Vec::new());
    }
    let mut next = Vec::with_capacity(loaded.len());
    for h in loaded {
        let version = h.version;
        let mut n = change(h)?;
        n.version = version;
        next.push(n);
    }
    #[derive(QueryableByName)]
    struct Saved {
        #[diesel(sql_type = Text)]
        destination: String,
    }
    use diesel::sql_types::{Integer, Nullable, Timestamptz};
    let saved: Vec<Saved> = super::prepared::prepared(
        diesel::sql_query(
            "UPDATE destination_health h SET state = r.state, \
               consecutive_failures = r.failures, consecutive_forbidden = r.forbidden, \
               backoff_until = r.backoff_until, last_success_at = r.last_success_at, \
               last_error_at = r.last_error_at, last_error = r.last_error, \
               last_status_code = r.last_status_code, paused_reason = r.paused_reason, \
               paused_by = r.paused_by, version = h.version + 1, updated_at = now() \
             FROM UNNEST((SELECT $1::text[]), (SELECT $2::text[]), (SELECT $3::int[]), \
                         (SELECT $4::int[]), (SELECT $5::timestamptz[]), \
                         (SELECT $6::timestamptz[]), (SELECT $7::timestamptz[]), \
                         (SELECT $8::text[]), (SELECT $9::int[]), (SELECT $10::text[]), \
                         (SELECT $11::text[]), (SELECT $12::bigint[])) \
               AS r(destination, state, failures, forbidden, backoff_until, last_success_at, \
                    last_error_at, last_error, last_status_code, paused_reason, paused_by, \
                    version) \
            WHERE h.destination = r.destination AND h.version = r.version \
            RETURNING h.destination",
        )
        .bind::<Array<Text>, _>(next.iter().map(|h| &h.destination).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(next.iter().map(|h| &h.state).collect::<Vec<_>>())
        .bind::<Array<Integer>, _>(
            next.iter()
                .map(|h| h.consecutive_failures)
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Integer>, _>(
            next.iter()
                .map(|h| h.consecutive_forbidden)
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Timestamptz>>, _>(
            next.iter().map(|h| h.backoff_until).collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Timestamptz>>, _>(
            next.iter().map(|h| h.last_success_at).collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Timestamptz>>, _>(
            next.iter().map(|h| h.last_error_at).collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Text>>, _>(
            next.iter()
                .map(|h| h.last_error.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Integer>>, _>(
            next.iter().map(|h| h.last_status_code).collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Text>>, _>(
            next.iter()
                .map(|h| h.paused_reason.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Text>>, _>(
            next.iter()
                .map(|h| h.paused_by.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<BigInt>, _>(next.iter().map(|h| h.version).collect::<Vec<_>>()),
    )
    .load(conn)
    .await?;
    let saved: std::collections::HashSet<String> =
        saved.into_iter().map(|s| s.destination).collect();
    let mut out = Vec::with_capacity(next.len());
    for mut n in next {
        if saved.contains(&n.destination) {
            n.version += 1;
            out.push(n);
        } else if let Some(h) = update_from(conn, &n.destination.clone(), None, &mut change).await?
        {
            out.push(h);
        }
    }
    Ok(out)
}

/// Takes (or renews) the destination's drain lease for `ttl` unless another live worker
/// holds it. Returns the destination's row when we hold the lease — read by the same
/// statement, so a drain round costs one statement fewer — and `None` when another
/// worker holds it (or the destination has no row).
pub async fn acquire_lease(
    conn: &mut AsyncPgConnection,
    destination: &str,
    owner: &str,
    ttl: chrono::Duration,
) -> Result<Option<Health>, StoreError> {
    let now = Utc::now();
    // Kept prepared (`store::prepared`): every drain round renews its lease with it.
    Ok(prepared(
        diesel::update(
            dh::table.filter(dh::destination.eq(destination)).filter(
                dh::lease_until
                    .is_null()
                    .or(dh::lease_until.lt(now))
                    .or(dh::lease_owner.eq(owner)),
            ),
        )
        .set((dh::lease_owner.eq(owner), dh::lease_until.eq(now + ttl)))
        .returning(Health::as_returning()),
    )
    .get_result(conn)
    .await
    .optional()?)
}

/// [`acquire_lease`] for many destinations in one statement (a probe round: see the
/// worker's `probe`): the rows of those whose lease `owner` now holds, in no particular
/// order; destinations another live worker holds, or without a row, are missing.
pub async fn acquire_leases(
    conn: &mut AsyncPgConnection,
    destinations: &[&str],
    owner: &str,
    ttl: chrono::Duration,
) -> Result<Vec<Health>, StoreError> {
    if destinations.is_empty() {
        return Ok(Vec::new());
    }
    let now = Utc::now();
    // The names are joined, not searched with `= ANY`: a prepared statement's generic
    // plan would search the array once per row of the table (the reason
    // `deferrals::FAN_OUT_VIEW_STATEMENT` gives). They reach the planner as
    // `(SELECT $1)`, so that the rounds' varying lengths do not make a plan per run
    // (`store::prepared`).
    Ok(prepared(
        diesel::sql_query(
            "UPDATE destination_health h SET lease_owner = $2, lease_until = $3 \
               FROM (SELECT DISTINCT unnest((SELECT $1::text[]))) AS d(name) \
              WHERE h.destination = d.name \
                AND (h.lease_until IS NULL OR h.lease_until < $4 OR h.lease_owner = $2) \
             RETURNING h.*",
        )
        .bind::<Array<Text>, _>(destinations)
        .bind::<Text, _>(owner)
        .bind::<diesel::sql_types::Timestamptz, _>(now + ttl)
        .bind::<diesel::sql_types::Timestamptz, _>(now),
    )
    .load(conn)
    .await?)
}

/// [`release_lease`] for many destinations in one statement.
pub async fn release_leases(
    conn: &mut AsyncPgConnection,
    destinations: &[&str],
    owner: &str,
) -> Result<(), StoreError> {
    if destinations.is_empty() {
        return Ok(());
    }
    // Joined, not `= ANY`, as in [`acquire_leases`].
    prepared(
        diesel::sql_query(
            "UPDATE destination_health h SET lease_owner = NULL, lease_until = NULL \
               FROM (SELECT DISTINCT unnest((SELECT $1::text[]))) AS d(name) \
              WHERE h.destination = d.name AND h.lease_owner = $2",
        )
        .bind::<Array<Text>, _>(destinations)
        .bind::<Text, _>(owner),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Gives the lease back (if we still hold it).
pub async fn release_lease(
    conn: &mut AsyncPgConnection,
    destination: &str,
    owner: &str,
) -> Result<(), StoreError> {
    // Kept prepared (`store::prepared`): every drain ends with it.
    prepared(
        diesel::update(
            dh::table
                .filter(dh::destination.eq(destination))
                .filter(dh::lease_owner.eq(owner)),
        )
        .set((
            dh::lease_owner.eq(None::<String>),
            dh::lease_until.eq(None::<DateTime<Utc>>),
        )),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Destinations with waiting rows (or a deferral with something to do:
/// `deferrals::has_work`, `pass_before` as there) that nobody is draining and that are
/// healthy, or whose backoff or hold has ended, with their state rows (at most
/// `limit`, those whose backoff ended longest ago first): what the scheduler brings
/// back.
pub async fn due(
    conn: &mut AsyncPgConnection,
    limit: i64,
    pass_before: DateTime<Utc>,
) -> Result<Vec<Health>, StoreError> {
    Ok(prepared(
        diesel::sql_query(format!(
            "SELECT h.destination, h.state, h.consecutive_failures, h.consecutive_forbidden, \
                h.backoff_until, h.last_success_at, h.last_error_at, h.last_error, \
                h.last_status_code, h.paused_reason, h.paused_by, h.version \
           FROM destination_health h \
         WHERE (h.state = 'healthy' \
                OR (h.state IN ('backing_off', 'held') AND h.backoff_until <= now())) \
           AND (h.lease_until IS NULL OR h.lease_until < now()) \
           AND (EXISTS (SELECT 1 FROM outbound_queue o \
                        WHERE o.destination = h.destination AND o.status = 'pending') \
                OR {deferred}) \
         ORDER BY h.backoff_until NULLS FIRST LIMIT $1",
            deferred = super::deferrals::has_work("h.destination", "$2")
        ))
        .bind::<BigInt, _>(limit)
        .bind::<diesel::sql_types::Timestamptz, _>(pass_before),
    )
    .load(conn)
    .await?)
}
