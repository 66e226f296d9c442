//! `outbound_queue`: one row per (destination, event) to deliver.
//!
//! A row is `pending` until it is settled: `delivered`, `dead` (refused for good, or
//! expired; the reason kept) or `cancelled` (the peer was blocked). Rows carry their
//! event's storage order (`event_seq`) and ordering keys, so a destination's backlog is
//! read oldest first and `delivery::order` can tell which rows may be in flight together.
//! The destination's own state is in `store::destinations`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::prepared::prepared;
use super::schema::outbound_queue as oq;
use super::StoreError;

/// What fan-out writes for one event.
#[derive(Clone, Debug)]
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
    /// Attempts finished so far (one still in flight is not counted: see
    /// `attempts::begin`).
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

/// The rows of a batch, one per (destination, event), sorted by destination, then
/// event: concurrent fan-outs that add rows for the same destinations take their locks
/// in one order and cannot deadlock (see `events::insert`).
pub(crate) fn sorted_rows<'a, 'b>(
    batch: &'b [(NewOutbound<'a>, Vec<String>)],
) -> Vec<(&'b str, &'b NewOutbound<'a>)> {
    let mut rows: Vec<(&str, &NewOutbound)> = batch
        .iter()
        .flat_map(|(e, ds)| ds.iter().map(move |d| (d.as_str(), e)))
        .collect();
    rows.sort_unstable_by(|a, b| (a.0, a.1.event_seq).cmp(&(b.0, b.1.event_seq)));
    rows.dedup_by(|a, b| a.0 == b.0 && a.1.event_id == b.1.event_id);
    rows
}

/// A chunk of rows as the five arrays the statements unnest (`rows` of
/// [`WRITE_CTES`]). Ordering keys travel as array literals: one array per column keeps
/// a statement prepared once, and Postgres cannot unnest arrays of arrays.
pub(crate) struct Columns<'a> {
    pub destinations: Vec<&'a str>,
    pub event_ids: Vec<&'a str>,
    pub seqs: Vec<i64>,
    pub provides: Vec<String>,
    pub waits: Vec<String>,
}

impl<'a> Columns<'a> {
    pub(crate) fn of(chunk: &[(&'a str, &NewOutbound<'a>)]) -> Self {
        let array = |v: &[i64]| {
            let items: Vec<String> = v.iter().map(i64::to_string).collect();
            format!("{{{}}}", items.join(","))
        };
        Columns {
            destinations: chunk.iter().map(|r| r.0).collect(),
            event_ids: chunk.iter().map(|r| r.1.event_id).collect(),
            seqs: chunk.iter().map(|r| r.1.event_seq).collect(),
            provides: chunk.iter().map(|r| array(r.1.provides)).collect(),
            waits: chunk.iter().map(|r| array(r.1.waits)).collect(),
        }
    }
}

/// The common part of the statements that write outbound rows, given a CTE `rows (d,
/// e, s, p, w)` (destination, event id, event seq, ordering keys as array literals):
/// destinations new to us get a state row (healthy), then the rows are inserted (a row
/// that exists is left alone). Two CTEs, `ensured` and `ins`; [`WRITTEN`] reads the
/// latter.
pub(crate) const WRITE_CTES: &str = "\
    ensured AS ( \
      INSERT INTO destination_health (destination) \
      SELECT d FROM rows r \
       WHERE NOT EXISTS (SELECT 1 FROM destination_health h WHERE h.destination = r.d) \
       GROUP BY d ORDER BY d \
      ON CONFLICT DO NOTHING), \
    ins AS ( \
      INSERT INTO outbound_queue (destination, event_id, event_seq, order_provides, order_waits) \
      SELECT d, e, s, p::bigint[], w::bigint[] FROM rows \
      ON CONFLICT DO NOTHING \
      RETURNING destination)";

/// After [`WRITE_CTES`]: per destination that got rows now, how many and whether it is
/// healthy (a destination whose state row this statement made is: that row is not
/// visible to the statement's own reads). Columns of [`Written`].
pub(crate) const WRITTEN: &str = "\
    SELECT i.destination, count(*) AS rows, \
           COALESCE((SELECT h.state = 'healthy' FROM destination_health h \
                      WHERE h.destination = i.destination), true) AS healthy \
      FROM ins i GROUP BY i.destination";

/// One destination's share of a write ([`WRITTEN`]).
#[derive(QueryableByName)]
pub(crate) struct Written {
    #[diesel(sql_type = Text)]
    pub destination: String,
    #[diesel(sql_type = BigInt)]
    pub rows: i64,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub healthy: bool,
}

impl Enqueued {
    /// Adds what one statement wrote.
    pub(crate) fn add(&mut self, written: Vec<Written>) {
        for w in written {
            self.rows += w.rows as usize;
            if w.healthy {
                self.healthy.push(w.destination);
            }
        }
    }

    /// Sorted and deduplicated, once every statement was added.
    pub(crate) fn sorted(mut self) -> Self {
        self.healthy.sort_unstable();
        self.healthy.dedup();
        self
    }
}

/// Writes the outbound rows of a batch of events (idempotent: a row that exists is left
/// alone), makes sure each destination has a state row, and marks `fanned_out` (the
/// events whose fan-out this completes) fanned out — with the last rows, in the same
/// statement, so a crash in between leaves them to the reconciler, which writes the
/// same rows again. Returns the rows written now and the healthy destinations that got
/// one.
///
/// One statement per [`MAX_ROWS_PER_STATEMENT`] rows, whatever the batch's size: the
/// fan-out of one event no longer costs a commit per statement.
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    batch: &[(NewOutbound<'_>, Vec<String>)],
    fanned_out: &[&str],
) -> Result<Enqueued, StoreError> {
    let rows = sorted_rows(batch);
    let mut written = Enqueued::default();
    let chunks: Vec<&[(&str, &NewOutbound)]> = if rows.is_empty() {
        vec![&[]]
    } else {
        rows.chunks(MAX_ROWS_PER_STATEMENT).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let marked: &[&str] = if i == last { fanned_out } else { &[] };
        let c = Columns::of(chunk);
        let got: Vec<Written> = prepared(
            diesel::sql_query(format!(
                "WITH rows AS ( \
               SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[]) \
                 AS x(d, e, s, p, w)), \
             marked AS ( \
               UPDATE federation_events SET fanned_out_at = now() \
                WHERE event_id = ANY($6) AND fanned_out_at IS NULL), \
             {WRITE_CTES} {WRITTEN}"
            ))
            .bind::<Array<Text>, _>(&c.destinations)
            .bind::<Array<Text>, _>(&c.event_ids)
            .bind::<Array<BigInt>, _>(&c.seqs)
            .bind::<Array<Text>, _>(&c.provides)
            .bind::<Array<Text>, _>(&c.waits)
            .bind::<Array<Text>, _>(marked),
        )
        .load(conn)
        .await?;
        written.add(got);
    }
    Ok(written.sorted())
}

/// What [`enqueue`] (or `events::accept`) wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// Rows written now (rows that existed are not counted).
    pub rows: usize,
    /// The destinations that got a new row and are healthy now (a drain may start at
    /// once), sorted; the others are drained when their backoff ends.
    pub healthy: Vec<String>,
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
    // Not kept prepared either (`store::prepared`): a generic plan would not know that
    // `$2` is minutes ago and could plan the earlier-event check as if a third of the
    // events qualified. Its parse costs a few µs per delivery at a window of 32. (Its
    // plan also needs fresh statistics of outbound_queue: see the migration
    // `2026-11-30-000004_queue_statistics`.)
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
    let r: Exists = prepared(
        diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM outbound_queue \
                        WHERE destination = $1 AND status = 'pending') AS exists",
        )
        .bind::<Text, _>(destination),
    )
    .get_result(conn)
    .await?;
    Ok(r.exists)
}

/// What a drain round decided for one waiting row (`outbound::settle`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The peer took it.
    Delivered,
    /// Refused for good: the row is settled `dead` with this reason.
    Dead(String),
    /// Still waiting; this was the error.
    Waiting(String),
}

impl Settled {
    fn status(&self) -> &'static str {
        match self {
            Settled::Delivered => "delivered",
            Settled::Dead(_) => "dead",
            Settled::Waiting(_) => "pending",
        }
    }

    fn reason(&self) -> Option<&str> {
        match self {
            Settled::Delivered => None,
            Settled::Dead(r) | Settled::Waiting(r) => Some(r),
        }
    }
}

/// Records a drain round in one statement (one commit): the attempts completed with
/// their results, and each row `(id, what happened)` settled — delivered, dead with its
/// reason, or still waiting with its last error — its attempt count raised by the
/// attempts completed now (see `attempts::begin`). An attempt already closed (by a drain
/// that took the destination over while this one's lease had lapsed:
/// `attempts::close_open`) keeps that record and is not counted twice. Rows no longer
/// pending (settled by an operator meanwhile) are left as they are. Returns how many rows
/// turned dead.
///
/// One statement rather than one per kind: each would be its own commit, and a row
/// written once per round (not bumped, then settled) keeps its indexes from growing
/// twice per delivery.
pub async fn settle(
    conn: &mut AsyncPgConnection,
    finished: &[super::attempts::Finished<'_>],
    rows: &[(i64, Settled)],
) -> Result<usize, StoreError> {
    if finished.is_empty() && rows.is_empty() {
        return Ok(0);
    }
    #[derive(QueryableByName)]
    struct Dead {
        #[diesel(sql_type = BigInt)]
        dead: i64,
    }
    let a_ids: Vec<i64> = finished.iter().map(|r| r.id).collect();
    let a_status: Vec<Option<i32>> = finished.iter().map(|r| r.status_code).collect();
    let a_class: Vec<Option<&str>> = finished.iter().map(|r| r.error_class).collect();
    let a_latency: Vec<i32> = finished.iter().map(|r| r.latency_ms).collect();
    let a_excerpt: Vec<Option<&str>> = finished.iter().map(|r| r.response_excerpt).collect();
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let status: Vec<&str> = rows.iter().map(|r| r.1.status()).collect();
    let reasons: Vec<Option<&str>> = rows.iter().map(|r| r.1.reason()).collect();
    let r: Dead = prepared(
        diesel::sql_query(
            "WITH finished AS ( \
           UPDATE delivery_attempts a SET status_code = r.status, error_class = r.class, \
             latency_ms = r.latency, response_excerpt = r.excerpt, finished_at = now() \
           FROM UNNEST($1::bigint[], $2::int[], $3::text[], $4::int[], $5::text[]) \
             AS r(id, status, class, latency, excerpt) \
           WHERE a.id = r.id AND a.finished_at IS NULL \
           RETURNING a.outbound_id), \
         settled AS ( \
           UPDATE outbound_queue o SET status = r.status, \
             attempts = o.attempts + (SELECT count(*) FROM finished f WHERE f.outbound_id = o.id), \
             delivered_at = CASE WHEN r.status = 'delivered' THEN now() ELSE o.delivered_at END, \
             dead_reason = CASE WHEN r.status = 'dead' THEN r.reason ELSE o.dead_reason END, \
             last_error = COALESCE(r.reason, o.last_error), updated_at = now() \
           FROM UNNEST($6::bigint[], $7::text[], $8::text[]) AS r(id, status, reason) \
           WHERE o.id = r.id AND o.status = 'pending' \
           RETURNING o.status) \
         SELECT count(*) FILTER (WHERE status = 'dead') AS dead FROM settled",
        )
        .bind::<Array<BigInt>, _>(a_ids)
        .bind::<Array<Nullable<Integer>>, _>(a_status)
        .bind::<Array<Nullable<Text>>, _>(a_class)
        .bind::<Array<Integer>, _>(a_latency)
        .bind::<Array<Nullable<Text>>, _>(a_excerpt)
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Text>, _>(status)
        .bind::<Array<Nullable<Text>>, _>(reasons),
    )
    .get_result(conn)
    .await?;
    Ok(r.dead as usize)
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
    Ok(prepared(
        diesel::sql_query(
            "UPDATE outbound_queue o SET status = 'dead', dead_reason = r.reason, \
           last_error = r.reason, updated_at = now() \
         FROM UNNEST($1::bigint[], $2::text[]) AS r(id, reason) \
         WHERE o.id = r.id AND o.status = 'pending'",
        )
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Text>, _>(reasons),
    )
    .execute(conn)
    .await?)
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
