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

/// Starts one attempt for each outbound row in `ids` (to `destination`), in one
/// statement: each row's attempt count goes up by one and an open attempt row is
/// written with that number.
pub async fn begin(
    conn: &mut AsyncPgConnection,
    destination: &str,
    ids: &[i64],
) -> Result<Vec<Started>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(diesel::sql_query(
        "WITH bumped AS ( \
           UPDATE outbound_queue SET attempts = attempts + 1, updated_at = now() \
           WHERE id = ANY($1) RETURNING id, event_id, attempts) \
         INSERT INTO delivery_attempts (outbound_id, destination, event_id, request_kind, attempt) \
         SELECT id, $2, event_id, 'event', attempts FROM bumped \
         RETURNING id, outbound_id, attempt",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Text, _>(destination)
    .load(conn)
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
    diesel::sql_query(
        "UPDATE delivery_attempts a SET status_code = r.status, error_class = r.class, \
           latency_ms = r.latency, response_excerpt = r.excerpt, finished_at = now() \
         FROM UNNEST($1::bigint[], $2::int[], $3::text[], $4::int[], $5::text[]) \
           AS r(id, status, class, latency, excerpt) \
         WHERE a.id = r.id",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Nullable<Integer>>, _>(status)
    .bind::<Array<Nullable<Text>>, _>(class)
    .bind::<Array<Integer>, _>(latency)
    .bind::<Array<Nullable<Text>>, _>(excerpt)
    .execute(conn)
    .await?;
    Ok(())
}

/// Closes every open attempt to `destination` as [`INTERRUPTED`]. Called by a drain
/// that has just taken the destination's lease: nobody else sends to it, so an open
/// attempt belongs to a sender that stopped mid-request. Returns how many.
pub async fn close_open(
    conn: &mut AsyncPgConnection,
    destination: &str,
) -> Result<usize, StoreError> {
    Ok(diesel::update(
        da::table
            .filter(da::destination.eq(destination))
            .filter(da::request_kind.eq("event"))
            .filter(da::finished_at.is_null()),
    )
    .set((
        da::finished_at.eq(diesel::dsl::now),
        da::error_class.eq(INTERRUPTED),
        da::response_excerpt
            .eq("no answer recorded: the sending worker stopped mid-request; the peer may have it"),
    ))
    .execute(conn)
    .await?)
}
