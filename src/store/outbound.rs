//! `outbound_queue`: one row per (destination, event) to deliver.
//!
//! A row is `pending` until it is settled: `delivered`, `dead` (refused for good, or
//! expired; the reason kept) or `cancelled` (the peer was blocked). Rows carry their
//! event's storage order (`event_seq`) and ordering keys, so a destination's backlog is
//! read oldest first and `delivery::order` can tell which rows may be in flight together.
//! The destination's own state is in `store::destinations`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::schema::outbound_queue as oq;
use super::StoreError;

/// What fan-out writes for one event.
pub struct NewOutbound<'a> {
    pub event_id: &'a str,
    /// The event's storage order (`federation_events.seq`).
    pub event_seq: i64,
    /// Ordering keys (`delivery::order`).
    pub provides: &'a [i64],
    pub waits: &'a [i64],
}

/// A waiting row, with what ordering needs.
#[derive(Clone, Debug, QueryableByName)]
pub struct Waiting {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub event_id: String,
    /// Attempts made so far.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = BigInt)]
    pub event_seq: i64,
    #[diesel(sql_type = Array<BigInt>)]
    pub order_provides: Vec<i64>,
    #[diesel(sql_type = Array<BigInt>)]
    pub order_waits: Vec<i64>,
    #[diesel(sql_type = Text)]
    pub room_id: String,
    /// When the event was stored here (end-to-end latency starts there).
    #[diesel(sql_type = Timestamptz)]
    pub received_at: DateTime<Utc>,
    /// An earlier event of the same room, stored after `unsettled_since`, is not yet
    /// verified, held, or not yet fanned out (it may still get a row here): see
    /// `events::unsettled_before`.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub earlier_unsettled: bool,
}

/// Most outbound rows written by one statement: a batch of events to a room of many
/// servers is written in several (a statement's arrays stay a few megabytes).
pub const MAX_ROWS_PER_STATEMENT: usize = 10_000;

/// Writes the outbound rows of a batch of events (idempotent: a row that exists is left
/// alone), makes sure each destination has a state row, and marks `fanned_out` (the
/// events whose fan-out this completes) fanned out — with the last rows, in the same
/// statement, so a crash in between leaves them to the reconciler, which writes the
/// same rows again. Returns the rows written now and the destinations that got one.
///
/// A few statements per batch, whatever its size (up to [`MAX_ROWS_PER_STATEMENT`]
/// rows each): the fan-out of one event no longer costs a commit per statement.
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    batch: &[(NewOutbound<'_>, Vec<String>)],
    fanned_out: &[&str],
) -> Result<Enqueued, StoreError> {
    // Sorted by destination, then event: concurrent fan-outs that add rows for the same
    // destinations take their locks in one order and cannot deadlock (see
    // `events::insert`).
    let mut rows: Vec<(&str, &NewOutbound)> = batch
        .iter()
        .flat_map(|(e, ds)| ds.iter().map(move |d| (d.as_str(), e)))
        .collect();
    rows.sort_unstable_by(|a, b| (a.0, a.1.event_seq).cmp(&(b.0, b.1.event_seq)));
    rows.dedup_by(|a, b| a.0 == b.0 && a.1.event_id == b.1.event_id);
    let mut names: Vec<&str> = rows.iter().map(|r| r.0).collect();
    names.dedup();
    super::destinations::ensure(conn, &names).await?;
    #[derive(QueryableByName)]
    struct Dest {
        #[diesel(sql_type = Text)]
        destination: String,
        #[diesel(sql_type = BigInt)]
        rows: i64,
    }
    let array = |v: &[i64]| {
        let items: Vec<String> = v.iter().map(i64::to_string).collect();
        format!("{{{}}}", items.join(","))
    };
    let mut fresh = Vec::new();
    let mut written = 0;
    let chunks: Vec<&[(&str, &NewOutbound)]> = if rows.is_empty() {
        vec![&[]]
    } else {
        rows.chunks(MAX_ROWS_PER_STATEMENT).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let marked: &[&str] = if i == last { fanned_out } else { &[] };
        let dests: Vec<&str> = chunk.iter().map(|r| r.0).collect();
        let ids: Vec<&str> = chunk.iter().map(|r| r.1.event_id).collect();
        let seqs: Vec<i64> = chunk.iter().map(|r| r.1.event_seq).collect();
        // Ordering keys travel as array literals: one array per column keeps this a
        // single prepared statement, and Postgres cannot unnest arrays of arrays.
        let provides: Vec<String> = chunk.iter().map(|r| array(r.1.provides)).collect();
        let waits: Vec<String> = chunk.iter().map(|r| array(r.1.waits)).collect();
        let got: Vec<Dest> = diesel::sql_query(
            "WITH ins AS ( \
               INSERT INTO outbound_queue \
                 (destination, event_id, event_seq, order_provides, order_waits) \
               SELECT d, e, s, p::bigint[], w::bigint[] \
                 FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[]) \
                      AS x(d, e, s, p, w) \
               ON CONFLICT DO NOTHING \
               RETURNING destination), \
             marked AS ( \
               UPDATE federation_events SET fanned_out_at = now() \
                WHERE event_id = ANY($6) AND fanned_out_at IS NULL) \
             SELECT destination, count(*) AS rows FROM ins GROUP BY destination",
        )
        .bind::<Array<Text>, _>(&dests)
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<BigInt>, _>(&seqs)
        .bind::<Array<Text>, _>(&provides)
        .bind::<Array<Text>, _>(&waits)
        .bind::<Array<Text>, _>(marked)
        .load(conn)
        .await?;
        written += got.iter().map(|d| d.rows as usize).sum::<usize>();
        fresh.extend(got.into_iter().map(|d| d.destination));
    }
    fresh.sort_unstable();
    fresh.dedup();
    Ok(Enqueued {
        rows: written,
        destinations: fresh,
    })
}

/// What [`enqueue`] wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// Rows written now (rows that existed are not counted).
    pub rows: usize,
    /// The destinations that got a new row, sorted.
    pub destinations: Vec<String>,
}

// The hot queries below are written as SQL with the status as a literal: bound as a
// parameter, a cached generic plan could not use the partial indexes on `status`.

/// The oldest waiting rows of a destination, in event order, at most `limit`.
pub async fn waiting(
    conn: &mut AsyncPgConnection,
    destination: &str,
    limit: i64,
    unsettled_since: DateTime<Utc>,
) -> Result<Vec<Waiting>, StoreError> {
    // The limit is written into the statement: as a parameter, a cached generic plan
    // does not know the batch is small and hashes all of federation_events instead of
    // looking the few rows up by key (measured: 17 ms against 0.8 ms with 100 000 events).
    Ok(diesel::sql_query(format!(
        "SELECT o.id, o.event_id, o.attempts, o.created_at, o.event_seq, o.order_provides, \
                o.order_waits, e.room_id, e.received_at, \
                EXISTS (SELECT 1 FROM federation_events p \
                        WHERE p.room_id = e.room_id AND p.seq < o.event_seq \
                          AND p.received_at > $2 \
                          AND (p.status IN ('pending', 'held') \
                               OR (p.status = 'accepted' AND p.fanned_out_at IS NULL))) \
                  AS earlier_unsettled \
         FROM (SELECT * FROM outbound_queue \
               WHERE destination = $1 AND status = 'pending' \
               ORDER BY event_seq, id LIMIT {limit}) o \
         JOIN federation_events e ON e.event_id = o.event_id \
         ORDER BY o.event_seq, o.id",
        limit = limit.clamp(1, 10_000)
    ))
    .bind::<Text, _>(destination)
    .bind::<Timestamptz, _>(unsettled_since)
    .load(conn)
    .await?)
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    exists: bool,
}

/// True when the destination has rows waiting.
pub async fn has_waiting(
    conn: &mut AsyncPgConnection,
    destination: &str,
) -> Result<bool, StoreError> {
    let r: Exists = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM outbound_queue \
                        WHERE destination = $1 AND status = 'pending') AS exists",
    )
    .bind::<Text, _>(destination)
    .get_result(conn)
    .await?;
    Ok(r.exists)
}

/// Marks rows delivered, in one statement.
pub async fn delivered(conn: &mut AsyncPgConnection, ids: &[i64]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "UPDATE outbound_queue SET status = 'delivered', delivered_at = now(), updated_at = now() \
         WHERE id = ANY($1) AND status = 'pending'",
    )
    .bind::<Array<BigInt>, _>(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks rows dead, each with its reason, in one statement; returns how many changed.
pub async fn dead(
    conn: &mut AsyncPgConnection,
    rows: &[(i64, String)],
) -> Result<usize, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let (ids, reasons): (Vec<i64>, Vec<String>) = rows.iter().cloned().unzip();
    Ok(diesel::sql_query(
        "UPDATE outbound_queue o SET status = 'dead', dead_reason = r.reason, \
           last_error = r.reason, updated_at = now() \
         FROM UNNEST($1::bigint[], $2::text[]) AS r(id, reason) \
         WHERE o.id = r.id AND o.status = 'pending'",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Text>, _>(reasons)
    .execute(conn)
    .await?)
}

/// Notes the last error of rows that stay waiting, in one statement.
pub async fn note_errors(
    conn: &mut AsyncPgConnection,
    rows: &[(i64, String)],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let (ids, errors): (Vec<i64>, Vec<String>) = rows.iter().cloned().unzip();
    diesel::sql_query(
        "UPDATE outbound_queue o SET last_error = r.error, updated_at = now() \
         FROM UNNEST($1::bigint[], $2::text[]) AS r(id, error) \
         WHERE o.id = r.id AND o.status = 'pending'",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<Text>, _>(errors)
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
            .filter(oq::status.eq("pending")),
    )
    .set((
        oq::status.eq("cancelled"),
        oq::dead_reason.eq(reason),
        oq::updated_at.eq(Utc::now()),
    ))
    .execute(conn)
    .await?)
}

/// Deliveries waiting for `destination`.
pub async fn waiting_count(
    conn: &mut AsyncPgConnection,
    destination: &str,
) -> Result<i64, StoreError> {
    Ok(oq::table
        .filter(oq::destination.eq(destination))
        .filter(oq::status.eq("pending"))
        .count()
        .get_result(conn)
        .await?)
}
