//! The delivery attempt log: one row per request parafed sends to a peer.
//!
//! A row is written when the request starts ([`begin`], [`begin_one`]) and completed
//! with its result when it ends ([`finish`]): a request cut short by a crash still has
//! its row, closed as [`INTERRUPTED`] by whoever takes over the destination
//! ([`close_open`]) or, for requests outside a drain, by the scheduler
//! (`retention::close_abandoned_attempts`).

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::prepared::prepared;
use super::schema::delivery_attempts as da;
use super::StoreError;

/// `error_class` of an attempt whose sender stopped before its answer was recorded.
pub const INTERRUPTED: &str = "interrupted";

/// An attempt started for an outbound row.
#[derive(Clone, Debug, QueryableByName)]
pub struct Started {
    /// The attempt row.
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = BigInt)]
    pub outbound_id: i64,
    /// The row's attempt number (1 = the first request ever sent for it).
    #[diesel(sql_type = Integer)]
    pub attempt: i32,
}

/// Starts one attempt for each `(outbound row id, attempt number)` in `rows`, in one
/// statement: an open attempt row is written with that number.
/// Rows that no longer exist (purged meanwhile) get none and are missing from the
/// result.
///
/// The outbound row itself is not written here: its `attempts` count goes up when the
/// attempt is settled, in the same statement (`outbound::settle`), or when an attempt
/// left open is closed ([`close_open`]). So the count is always the number of finished
/// attempts, the next number is `attempts + 1`, and a delivered row is written twice in
/// its life (inserted, settled) rather than three times.
///
/// Each attempt is to its row's destination, so one statement may start the requests
/// of many destinations (a probe round).
pub async fn begin(
    conn: &mut AsyncPgConnection,
    rows: &[(i64, i32)],
) -> Result<Vec<Started>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, numbers): (Vec<i64>, Vec<i32>) = rows.iter().copied().unzip();
    Ok(prepared(diesel::sql_query(
        "INSERT INTO delivery_attempts (outbound_id, destination, event_id, request_kind, attempt) \
         SELECT o.id, o.destination, o.event_id, 'event', x.n \
           FROM UNNEST((SELECT $1::bigint[]), (SELECT $2::int[])) AS x(id, n) \
           JOIN outbound_queue o ON o.id = x.id \
         RETURNING id, outbound_id, attempt",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Integer>, _>(numbers)
    ).load(conn)
    .await?)
}

/// Starts one attempt that has no outbound row (an invite, join or leave request);
/// returns the attempt row's id.
pub async fn begin_one(
    conn: &mut AsyncPgConnection,
    destination: &str,
    request_kind: &str,
    attempt: i32,
) -> Result<i64, StoreError> {
    Ok(diesel::insert_into(da::table)
        .values((
            da::destination.eq(destination),
            da::request_kind.eq(request_kind),
            da::attempt.eq(attempt),
        ))
        .returning(da::id)
        .get_result(conn)
        .await?)
}

/// The result of one attempt.
#[derive(Clone, Debug)]
pub struct Finished<'a> {
    pub id: i64,
    pub status_code: Option<i32>,
    pub error_class: Option<&'a str>,
    pub latency_ms: i32,
    pub response_excerpt: Option<&'a str>,
}

/// Completes attempts with their results, in one statement.
pub async fn finish(
    conn: &mut AsyncPgConnection,
    results: &[Finished<'_>],
) -> Result<(), StoreError> {
    if results.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = results.iter().map(|r| r.id).collect();
    let status: Vec<Option<i32>> = results.iter().map(|r| r.status_code).collect();
    let class: Vec<Option<&str>> = results.iter().map(|r| r.error_class).collect();
    let latency: Vec<i32> = results.iter().map(|r| r.latency_ms).collect();
    let excerpt: Vec<Option<&str>> = results.iter().map(|r| r.response_excerpt).collect();
    prepared(
        diesel::sql_query(
            "UPDATE delivery_attempts a SET status_code = r.status, error_class = r.class, \
           latency_ms = r.latency, response_excerpt = r.excerpt, finished_at = now() \
         FROM UNNEST((SELECT $1::bigint[]), (SELECT $2::int[]), (SELECT $3::text[]), \
                     (SELECT $4::int[]), (SELECT $5::text[])) \
           AS r(id, status, class, latency, excerpt) \
         WHERE a.id = r.id",
        )
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Nullable<Integer>>, _>(status)
        .bind::<Array<Nullable<Text>>, _>(class)
        .bind::<Array<Integer>, _>(latency)
        .bind::<Array<Nullable<Text>>, _>(excerpt),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Closes every open attempt to `destination` as [`INTERRUPTED`], and counts each on
/// its outbound row (see [`begin`]), in one statement. Called by a drain that has just
/// taken the destination's lease: nobody else sends to it, so an open attempt belongs to
/// a sender that stopped mid-request. Returns how many.
pub async fn close_open(
    conn: &mut AsyncPgConnection,
    destination: &str,
) -> Result<usize, StoreError> {
    close_open_of(conn, &[destination]).await
}

/// [`close_open`] for many destinations (a probe round holding all their leases), in one
/// statement; returns how many attempts it closed.
pub async fn close_open_of(
    conn: &mut AsyncPgConnection,
    destinations: &[&str],
) -> Result<usize, StoreError> {
    if destinations.is_empty() {
        return Ok(0);
    }
    #[derive(QueryableByName)]
    struct Closed {
        #[diesel(sql_type = BigInt)]
        closed: i64,
    }
    let r: Closed = prepared(diesel::sql_query(
        "WITH closed AS ( \
           UPDATE delivery_attempts SET finished_at = now(), error_class = $2, \
             response_excerpt = 'no answer recorded: the sending worker stopped mid-request; the peer may have it' \
           WHERE destination = ANY((SELECT $1)::text[]) AND request_kind = 'event' AND finished_at IS NULL \
           RETURNING outbound_id), \
         counted AS ( \
           UPDATE outbound_queue o SET attempts = o.attempts + c.n \
             FROM (SELECT outbound_id, count(*)::int AS n FROM closed \
                   WHERE outbound_id IS NOT NULL GROUP BY outbound_id) c \
            WHERE o.id = c.outbound_id) \
         SELECT count(*) AS closed FROM closed",
    )
    .bind::<Array<Text>, _>(destinations)
    .bind::<Text, _>(INTERRUPTED)
    ).get_result(conn)
    .await?;
    Ok(r.closed as usize)
}
