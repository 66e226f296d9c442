//! `outbound_queue`: one row per (destination, event) to deliver.
//!
//! A row is `pending` until it is settled: `delivered`, `dead` (refused for good, or
//! expired; the reason kept) or `cancelled` (the peer was blocked). Rows carry their
//! event's storage order (`event_seq`) and ordering keys, so a destination's backlog is
//! read oldest first and `delivery::order` can tell which rows may be in flight together.
//! The destination's own state is in `store::destinations`.

use std::collections::HashSet;

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
    /// The event's room: deferrals are kept per (destination, room).
    pub room_id: &'a str,
    /// Ordering keys (`delivery::order`).
    pub provides: &'a [i64],
    pub waits: &'a [i64],
}

/// Whether an event stored at `received_at` may be deferred when fanned out at `now`
/// (a destination that is not healthy gets a deferral instead of a row; an older event
/// fanned out late — re-queued by the reconciler — always gets rows): a drain passes
/// over an unsettled event only once it is older than twice `dependency_wait`
/// (`delivery::deferral`), so an event younger
/// than one `dependency_wait` cannot have been passed over, even by a drain whose clock
/// runs ahead by almost that much. A held event is passed over at once, so a `released`
/// one is never deferred.
pub fn deferrable(
    hosted_here: bool,
    released: bool,
    received_at: DateTime<Utc>,
    now: DateTime<Utc>,
    dependency_wait: std::time::Duration,
) -> bool {
    let wait = chrono::Duration::from_std(dependency_wait).unwrap_or(chrono::Duration::MAX);
    hosted_here && !released && received_at > now - wait
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
    /// An event of the room of one of the list's rows, stored before that row's event
    /// and after `unsettled_since`, is not yet verified, held, or not yet fanned out (it
    /// may still get a row here): see `events::unsettled_before`. From [`waiting`] the
    /// same for every row of the read — true when any row of it has such an event, so a
    /// subset of the rows may be flagged without one (the look it calls for is then one
    /// too many, never one too few); from [`waiting_of`], per row.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub earlier_unsettled: bool,
}

/// Most array entries one statement carries (events plus the destinations of their
/// distinct target lists): a batch of events to a room of many servers is written in
/// several statements (a statement's arrays stay a few megabytes).
pub const MAX_ENTRIES_PER_STATEMENT: usize = 10_000;

/// A batch of events with their destinations, as the arrays the statements unnest (see
/// [`input_ctes`]): one entry per event (`ev`: id, seq, ordering keys as array literals,
/// destination list) and one per destination of each distinct list (`tg`: list,
/// destination), and the deferrals to start (`Deferrals::start`). The events of a room
/// mostly share their list, so a room of many servers costs its servers once per
/// statement, not once per event. Ordering keys travel as array literals: Postgres
/// cannot unnest arrays of arrays.
pub(crate) struct Columns<'a> {
    pub event_ids: Vec<&'a str>,
    pub seqs: Vec<i64>,
    pub rooms: Vec<&'a str>,
    pub provides: Vec<String>,
    pub waits: Vec<String>,
    pub lists: Vec<i32>,
    /// The event's conditional list (`Fanned::conditional`).
    pub conditional: Vec<i32>,
    pub list_ids: Vec<i32>,
    pub destinations: Vec<&'a str>,
    pub defer_destinations: Vec<&'a str>,
    pub defer_rooms: Vec<&'a str>,
    pub defer_from: Vec<i64>,
}

impl<'a> Columns<'a> {
    pub(crate) fn of(
        batch: &'a [(NewOutbound<'a>, Vec<String>)],
        conditional: &'a [Vec<String>],
        start: &'a [Deferred],
    ) -> Self {
        let array = super::deferrals::array_literal;
        let mut known: std::collections::HashMap<&[String], i32> = Default::default();
        let mut c = Columns {
            event_ids: Vec::with_capacity(batch.len()),
            seqs: Vec::with_capacity(batch.len()),
            rooms: Vec::with_capacity(batch.len()),
            provides: Vec::with_capacity(batch.len()),
            waits: Vec::with_capacity(batch.len()),
            lists: Vec::with_capacity(batch.len()),
            conditional: Vec::with_capacity(batch.len()),
            list_ids: Vec::new(),
            destinations: Vec::new(),
            defer_destinations: start.iter().map(|d| d.destination.as_str()).collect(),
            defer_rooms: start.iter().map(|d| d.room_id.as_str()).collect(),
            defer_from: start.iter().map(|d| d.from_seq).collect(),
        };
        const NONE: &[String] = &[];
        for (i, (e, to)) in batch.iter().enumerate() {
            let cond = conditional.get(i).map_or(NONE, Vec::as_slice);
            let mut list_of = |to: &'a [String]| {
                let next = known.len() as i32;
                *known.entry(to).or_insert_with(|| {
                    for d in to {
                        c.list_ids.push(next);
                        c.destinations.push(d.as_str());
                    }
                    next
                })
            };
            let list = list_of(to.as_slice());
            let cond = list_of(cond);
            c.event_ids.push(e.event_id);
            c.seqs.push(e.event_seq);
            c.rooms.push(e.room_id);
            c.provides.push(array(e.provides));
            c.waits.push(array(e.waits));
            c.lists.push(list);
            c.conditional.push(cond);
        }
        c
    }
}

/// A deferral fan-out starts (`delivery::deferral::fan_out`): `destination` is owed the
/// events of `room_id` after `from_seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deferred {
    pub destination: String,
    pub room_id: String,
    pub from_seq: i64,
}

/// `batch` cut into runs of events (index ranges) whose arrays fit one statement
/// ([`MAX_ENTRIES_PER_STATEMENT`]); one event with more destinations than that is a run
/// of its own. An empty batch is one empty run.
pub(crate) fn statements(batch: &[(NewOutbound<'_>, Vec<String>)]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut size = 0;
    let mut lists: std::collections::HashSet<&[String]> = Default::default();
    for (i, (_, to)) in batch.iter().enumerate() {
        let cost = 1 + if lists.contains(to.as_slice()) {
            0
        } else {
            to.len()
        };
        if i > start && size + cost > MAX_ENTRIES_PER_STATEMENT {
            runs.push(start..i);
            start = i;
            size = 0;
            lists.clear();
        }
        size += 1 + if lists.insert(to.as_slice()) {
            to.len()
        } else {
            0
        };
    }
    runs.push(start..batch.len());
    runs
}

/// The unnested arrays of [`Columns`], parameters `$n..$n+11` in the order of its
/// fields: CTEs `ev` (narrowed by `filter`: `""`, or `WHERE …` over `x`), `tg`,
/// `touched`, `rows (d, e, s, p, w)` — one per (destination, event) — `starts` (the
/// deferrals to start, in rooms with an event in `ev`: in `events::accept`, one accepted
/// now) and `deferred`, which starts them (two fan-outs that start one at once keep the
/// lower start). `touched` bumps the deferral of each conditional pair (a healthy destination
/// skipped because of it; locked first, in key order, so two fan-outs cannot deadlock on
/// them); a pair whose deferral is gone or no longer covers the event (a drain ended it:
/// `deferrals::advance`) gets its row here. A start below a deferral's cursor moves the
/// cursor back (an earlier event fanned out after a later one started it:
/// `delivery::deferral::fan_out`).
pub(crate) fn input_ctes(n: usize, filter: &str) -> String {
    let p = |i: usize| format!("${}", n + i);
    format!(
        "ev AS (SELECT * FROM UNNEST((SELECT {}::text[]), (SELECT {}::bigint[]), \
                (SELECT {}::text[]), (SELECT {}::text[]), (SELECT {}::text[]), \
                (SELECT {}::int[]), (SELECT {}::int[])) AS x(e, s, r, p, w, t, c) {filter}), \
         tg AS (SELECT * FROM UNNEST((SELECT {}::int[]), (SELECT {}::text[])) AS y(t, d)), \
         cond AS (SELECT tg.d, ev.e, ev.s, ev.r, ev.p, ev.w FROM ev JOIN tg ON tg.t = ev.c), \
         locked AS ( \
           SELECT f.destination, f.room_id FROM outbound_deferrals f \
            WHERE (f.destination, f.room_id) IN (SELECT d, r FROM cond) \
            ORDER BY f.destination, f.room_id FOR UPDATE), \
         touched AS ( \
           UPDATE outbound_deferrals f SET touched = f.touched + 1 FROM locked k \
            WHERE f.destination = k.destination AND f.room_id = k.room_id \
           RETURNING f.destination, f.room_id, f.from_seq, f.until_seq), \
         rows AS (SELECT tg.d, ev.e, ev.s, ev.p, ev.w FROM ev JOIN tg ON tg.t = ev.t \
           UNION ALL \
           SELECT c.d, c.e, c.s, c.p, c.w FROM cond c \
            WHERE NOT EXISTS (SELECT 1 FROM touched k \
                               WHERE k.destination = c.d AND k.room_id = c.r \
                                 AND k.until_seq IS NULL AND c.s > k.from_seq)), \
         starts AS ( \
           SELECT * FROM UNNEST((SELECT {}::text[]), (SELECT {}::text[]), \
                                (SELECT {}::bigint[])) AS z(d, r, s) \
            WHERE EXISTS (SELECT 1 FROM ev WHERE ev.r = z.r)), \
         deferred AS ( \
           INSERT INTO outbound_deferrals AS f (destination, room_id, from_seq) \
           SELECT d, r, s FROM starts ORDER BY d, r \
           ON CONFLICT (destination, room_id) DO UPDATE SET from_seq = EXCLUDED.from_seq \
            WHERE EXCLUDED.from_seq < f.from_seq)",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        p(8),
        p(9),
        p(10),
        p(11)
    )
}

/// Binds [`Columns`] in the order [`input_ctes`] numbers them.
macro_rules! bind_columns {
    ($query:expr, $c:expr) => {
        $query
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&$c.event_ids)
            .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(&$c.seqs)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&$c.rooms)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&$c.provides)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&$c.waits)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Integer>, _>(&$c.lists)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Integer>, _>(&$c.conditional)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Integer>, _>(&$c.list_ids)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&$c.destinations)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&$c.defer_destinations)
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&$c.defer_rooms)
            .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(&$c.defer_from)
    };
}
pub(crate) use bind_columns;

/// The common part of the statements that write outbound rows, after [`input_ctes`]:
/// destinations new to us (with rows, or a deferral started) get a state row (healthy),
/// then the rows are inserted (a row
/// that exists is left alone), in (destination, event) order: concurrent fan-outs that
/// add rows for the same destinations take their locks in one order and cannot deadlock
/// (see `events::insert`). Two CTEs, `ensured` and `ins`; [`WRITTEN`] reads the latter.
pub(crate) const WRITE_CTES: &str = "\
    ensured AS ( \
      INSERT INTO destination_health (destination) \
      SELECT d FROM (SELECT d FROM rows UNION SELECT d FROM starts) r \
       WHERE NOT EXISTS (SELECT 1 FROM destination_health h WHERE h.destination = r.d) \
       ORDER BY d \
      ON CONFLICT DO NOTHING), \
    ins AS ( \
      INSERT INTO outbound_queue (destination, event_id, event_seq, order_provides, order_waits) \
      SELECT d, e, s, p::bigint[], w::bigint[] FROM rows ORDER BY d, s \
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

/// A fan-out's batch, decided (`delivery::deferral::fan_out`): the events with the
/// destinations that get a row now, the deferrals to start, and what the others came
/// to.
#[derive(Debug, Default)]
pub struct Fanned<'a> {
    pub rows: Vec<(NewOutbound<'a>, Vec<String>)>,
    /// Per event of `rows`: healthy destinations skipped because of their deferral,
    /// which get the row after all if the deferral ended meanwhile (`input_ctes`).
    pub conditional: Vec<Vec<String>>,
    pub start: Vec<Deferred>,
    /// (destination, event) pairs left to a deferral.
    pub deferred: usize,
    /// Destinations that answer whose deferral covers an event now: their drain writes
    /// the row, and is scheduled like a destination that got one.
    pub covered_healthy: Vec<String>,
    /// Destinations new to us (no state row yet) that got their probe row here.
    pub new: Vec<String>,
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

    /// With what the fan-out decided without the database (pairs deferred, healthy
    /// destinations whose deferral covers an event), sorted and deduplicated, once every
    /// statement was added.
    pub(crate) fn finish(mut self, fanned: &Fanned<'_>) -> Self {
        self.deferred = fanned.deferred;
        self.healthy.extend(fanned.covered_healthy.iter().cloned());
        self.healthy.sort_unstable();
        self.healthy.dedup();
        self.new = fanned.new.clone();
        self.new.sort_unstable();
        self
    }
}

/// Writes a fan-out's rows (idempotent: a row that exists is left alone) and starts its
/// deferrals, makes sure each destination has a state row, and marks `fanned_out` (the
/// events whose fan-out this completes) fanned out — with the last rows, in the same
/// statement, so a crash in between leaves them to the reconciler, which writes the same
/// rows again. Returns the rows written now and the healthy destinations that got one
/// (or whose deferral covers an event now).
///
/// One statement per [`MAX_ENTRIES_PER_STATEMENT`] array entries, whatever the batch's
/// size.
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    fanned: &Fanned<'_>,
    fanned_out: &[&str],
) -> Result<Enqueued, StoreError> {
    let mut written = Enqueued::default();
    let runs = statements(&fanned.rows);
    let last = runs.len() - 1;
    for (i, run) in runs.into_iter().enumerate() {
        let marked: &[&str] = if i == last { fanned_out } else { &[] };
        // Each statement starts the deferrals of the rooms it has events of: its
        // `starts` keeps no other (`input_ctes`), and a room whose events all fall in a
        // later statement would otherwise lose its deferral, and the destination those
        // events. A room spread over several statements starts it in each, the same
        // start (the lower one is kept).
        let rooms: HashSet<&str> = fanned.rows[run.clone()]
            .iter()
            .map(|(e, _)| e.room_id)
            .collect();
        let start: Vec<Deferred> = fanned
            .start
            .iter()
            .filter(|d| rooms.contains(d.room_id.as_str()))
            .cloned()
            .collect();
        let cond = fanned.conditional.get(run.clone()).unwrap_or(&[]);
        let c = Columns::of(&fanned.rows[run], cond, &start);
        let got: Vec<Written> = prepared(bind_columns!(
            diesel::sql_query(format!(
                "WITH {input}, \
                 marked AS ( \
                   UPDATE federation_events SET fanned_out_at = now() \
                    WHERE event_id = ANY((SELECT $1)::text[]) AND fanned_out_at IS NULL), \
                 {WRITE_CTES} {WRITTEN}",
                input = input_ctes(2, "")
            ))
            .bind::<Array<Text>, _>(marked),
            c
        ))
        .load(conn)
        .await?;
        written.add(got);
    }
    Ok(written.finish(fanned))
}

/// What [`enqueue`] (or `events::accept`) wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// Rows written now (rows that existed are not counted).
    pub rows: usize,
    /// (destination, event) pairs left to a deferral (`store::deferrals`) instead.
    pub deferred: usize,
    /// The destinations that got a new row and are healthy now (a drain may start at
    /// once), sorted; the others are drained when their backoff ends.
    pub healthy: Vec<String>,
    /// Those of them new to us, whose row is their probe, sorted (`Fanned::new`).
    pub new: Vec<String>,
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
    // Kept prepared (`store::prepared`), one statement per limit: planned on every run it
    // cost Postgres 0.5 ms a round, more than running it (0.14 ms), and at a steady
    // 1 000 events/s a round holds a few events (docs/performance.md, twelfth round). Its
    // parameters are handed over as `(SELECT $n)` ("Values the planner must not see"
    // there), so the plan kept is made without them: the earlier-event check below is
    // shaped so that it reads the unsettled-events index whatever `$2` is (the test
    // `store::the_drains_read_looks_for_earlier_unsettled_events_by_index_after_a_burst`
    // checks the plan kept too). (Its plan also needs fresh statistics of outbound_queue:
    // see the migration `2026-11-30-000004_queue_statistics`.)
    //
    // Whether an earlier event is unsettled is asked once per room of the read, at its
    // last row, not per row: the answer is only used as "any row" (`jobs::deliver::
    // choose`), and each ask walks the room's part of `federation_events_unsettled_room`,
    // whose entries for events settled since the last VACUUM are dead but still there.
    // Asked per row, a backlog's read of 64 rows walked them 64 times: 6–13 ms a round
    // over 100 000 events (docs/performance.md, sixth round). The ask is a `LATERAL …
    // LIMIT 1`, not an `EXISTS`: Postgres may turn an `EXISTS` into a semi-join that
    // applies the seq bound as a filter, not as a bound of the index scan. It is ordered
    // by `seq`, the index's order: statistics taken while a burst was being verified say
    // a third of the room is unsettled, and without an order the planner then expects a
    // sequential scan to meet one within a few rows and walks the whole table when none
    // is left (10 ms a round over 30 000 events, a third of Postgres' CPU in a drain:
    // docs/performance.md, tenth round). Newest first: an unsettled event is most likely
    // among the latest.
    Ok(prepared(
        diesel::sql_query(waiting_statement(limit))
            .bind::<Text, _>(destination)
            .bind::<Timestamptz, _>(unsettled_since),
    )
    .load(conn)
    .await?)
}

/// The statement [`waiting`] runs for a read of at most `limit` rows (clamped to
/// 1..=10 000): `$1` the destination, `$2` the time before which unsettled events no
/// longer hold rows back. Public so that its plan can be checked (`EXPLAIN`).
pub fn waiting_statement(limit: i64) -> String {
    format!(
        "WITH w AS (SELECT o.id, o.event_id, o.attempts, o.created_at, o.event_seq, \
                           o.order_provides, o.order_waits, e.room_id, e.received_at \
                      FROM (SELECT * FROM outbound_queue \
                             WHERE destination = (SELECT $1::text) \
                               AND status = 'pending' \
                             ORDER BY event_seq, id LIMIT {limit}) o \
                      JOIN federation_events e ON e.event_id = o.event_id), \
              late AS (SELECT 1 FROM (SELECT room_id, max(event_seq) AS last \
                                        FROM w GROUP BY room_id) x \
                       CROSS JOIN LATERAL (SELECT 1 FROM federation_events p \
                              WHERE p.room_id = x.room_id AND p.seq < x.last \
                                AND p.received_at > (SELECT $2::timestamptz) \
                                AND (p.status IN ('pending', 'held') \
                                     OR (p.status = 'accepted' \
                                         AND p.fanned_out_at IS NULL)) \
                              ORDER BY p.seq DESC LIMIT 1) u \
                       LIMIT 1) \
         SELECT w.*, EXISTS (SELECT 1 FROM late) AS earlier_unsettled \
           FROM w ORDER BY w.event_seq, w.id",
        limit = limit.clamp(1, 10_000)
    )
}

/// [`waiting`] for many destinations in one statement (a probe round): each
/// destination's oldest waiting rows, at most `limit` each, in event order; destinations
/// without any are missing.
pub async fn waiting_of(
    conn: &mut AsyncPgConnection,
    destinations: &[&str],
    limit: i64,
    unsettled_since: DateTime<Utc>,
) -> Result<std::collections::HashMap<String, Vec<Waiting>>, StoreError> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        destination: String,
        #[diesel(embed)]
        row: Waiting,
    }
    let mut by = std::collections::HashMap::<String, Vec<Waiting>>::new();
    if destinations.is_empty() {
        return Ok(by);
    }
    // The limit is written into the statement, as in `waiting`. Here the check for
    // earlier unsettled events stays per row (at most a few rows per destination): as
    // one check per destination's list, the planner joined it back to every destination
    // of the round, and the round's read took 9–25 ms instead of 3–4. The check is
    // ordered by `seq` for the reason given in `waiting`; in a subquery of its own,
    // since Postgres drops the `ORDER BY` of an `EXISTS`.
    let rows: Vec<Row> = diesel::sql_query(waiting_of_statement(limit))
        .bind::<Array<Text>, _>(destinations)
        .bind::<Timestamptz, _>(unsettled_since)
        .load(conn)
        .await?;
    for r in rows {
        by.entry(r.destination).or_default().push(r.row);
    }
    Ok(by)
}

/// The statement [`waiting_of`] runs for reads of at most `limit` rows each (clamped
/// to 1..=10 000): `$1` the destinations, `$2` as in [`waiting_statement`]. Public so
/// that its plan can be checked (`EXPLAIN`).
pub fn waiting_of_statement(limit: i64) -> String {
    format!(
        "SELECT o.destination, o.id, o.event_id, o.attempts, o.created_at, o.event_seq, \
                o.order_provides, o.order_waits, e.room_id, e.received_at, \
                EXISTS (SELECT 1 FROM (SELECT 1 FROM federation_events p \
                        WHERE p.room_id = e.room_id AND p.seq < o.event_seq \
                          AND p.received_at > $2 \
                          AND (p.status IN ('pending', 'held') \
                               OR (p.status = 'accepted' AND p.fanned_out_at IS NULL)) \
                        ORDER BY p.seq DESC LIMIT 1) u) \
                  AS earlier_unsettled \
         FROM UNNEST($1::text[]) AS d(name) \
         CROSS JOIN LATERAL (SELECT * FROM outbound_queue \
               WHERE destination = d.name AND status = 'pending' \
               ORDER BY event_seq, id LIMIT {limit}) o \
         JOIN federation_events e ON e.event_id = o.event_id \
         ORDER BY o.destination, o.event_seq, o.id",
        limit = limit.clamp(1, 10_000)
    )
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    exists: bool,
}

/// True when the destination has rows waiting, or a deferral with something to do
/// (`deferrals::has_work`; `pass_before`: unsettled events stored before it are passed
/// over, `delivery::deferral`).
pub async fn has_waiting(
    conn: &mut AsyncPgConnection,
    destination: &str,
    pass_before: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let r: Exists = prepared(
        diesel::sql_query(format!(
            "SELECT EXISTS (SELECT 1 FROM outbound_queue \
                        WHERE destination = $1 AND status = 'pending') \
                 OR {deferred} AS exists",
            deferred = super::deferrals::has_work("$1", "$2")
        ))
        .bind::<Text, _>(destination)
        .bind::<Timestamptz, _>(pass_before),
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

/// The statement [`settle`] runs: `$1`–`$5` the attempts' ids, status codes, error
/// classes, latencies (ms) and response excerpts; `$6`–`$8` the rows' ids, new statuses
/// and reasons. Public so that its plan can be checked (`EXPLAIN`).
///
/// An attempt is looked up by its key and only then checked to be open, the check
/// written `(finished_at IS NULL) IS TRUE`: it means the same, but it does not imply the
/// predicate of the open-attempt index (`delivery_attempts_open`). The statistics count
/// few open attempts, so the planner would otherwise read that whole index instead of
/// looking up the round's ids — and until VACUUM the index holds every attempt begun
/// since: 3.6 ms of a 5.4 ms settle at four busy destinations, against 0.2 ms by key
/// (docs/performance.md, tenth round).
pub const SETTLE_STATEMENT: &str = "\
    WITH finished AS ( \
      UPDATE delivery_attempts a SET status_code = r.status, error_class = r.class, \
        latency_ms = r.latency, response_excerpt = r.excerpt, finished_at = now() \
      FROM UNNEST((SELECT $1::bigint[]), (SELECT $2::int[]), (SELECT $3::text[]), \
                  (SELECT $4::int[]), (SELECT $5::text[])) \
        AS r(id, status, class, latency, excerpt) \
      WHERE a.id = r.id AND (a.finished_at IS NULL) IS TRUE \
      RETURNING a.outbound_id), \
    settled AS ( \
      UPDATE outbound_queue o SET status = r.status, \
        attempts = o.attempts + (SELECT count(*) FROM finished f WHERE f.outbound_id = o.id), \
        delivered_at = CASE WHEN r.status = 'delivered' THEN now() ELSE o.delivered_at END, \
        dead_reason = CASE WHEN r.status = 'dead' THEN r.reason ELSE o.dead_reason END, \
        last_error = COALESCE(r.reason, o.last_error), updated_at = now() \
      FROM UNNEST((SELECT $6::bigint[]), (SELECT $7::text[]), (SELECT $8::text[])) \
        AS r(id, status, reason) \
      WHERE o.id = r.id AND o.status = 'pending' \
      RETURNING o.status) \
    SELECT count(*) FILTER (WHERE status = 'dead') AS dead FROM settled";

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
        diesel::sql_query(SETTLE_STATEMENT)
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
         FROM UNNEST((SELECT $1::bigint[]), (SELECT $2::text[])) AS r(id, reason) \
         WHERE o.id = r.id AND o.status = 'pending'",
        )
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Text>, _>(reasons),
    )
    .execute(conn)
    .await?)
}

/// Cancels every row still waiting for `destination` (a peer the operator blocked) and
/// drops its deferrals (`store::deferrals`: what they owed is never written); returns how
/// many rows were cancelled.
pub async fn cancel_waiting(
    conn: &mut AsyncPgConnection,
    destination: &str,
    reason: &str,
) -> Result<usize, StoreError> {
    super::deferrals::forget(conn, destination).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_young_unreleased_events_of_rooms_hosted_here_are_deferrable() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let wait = std::time::Duration::from_secs(300);
        let ago = |s: i64| now - chrono::Duration::seconds(s);
        // (hosted here, released, age in seconds, deferrable)
        let table = [
            (true, false, 10, true),
            (true, false, 299, true),
            (true, false, 301, false),
            (true, true, 10, false),
            (false, false, 10, false),
        ];
        for (hosted, released, age, want) in table {
            assert_eq!(
                deferrable(hosted, released, ago(age), now, wait),
                want,
                "{hosted} {released} {age}"
            );
        }
    }
}
