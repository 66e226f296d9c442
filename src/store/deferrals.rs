//! `outbound_deferrals`: per (destination, room), the events fan-out left without an
//! outbound row because the destination was not healthy (`delivery::deferral` has the
//! rules; `outbound::WRITE_CTES` writes these rows). Fan-out leaves one row here per
//! destination and room, not one outbound row per destination and event; the drain
//! writes the rows a window ahead of what it sends, once it may send again.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::prepared::prepared;
use super::StoreError;

/// A SQL condition, over a destination named by the expression `{dest}`, true when one
/// of its deferrals has something to do: the room's first event after the cursor is
/// settled (its row, or nothing, can be written), held, or older than the time in the
/// parameter `{pass}` (the last two are passed over). The scheduler (`destinations::due`) and the
/// drain (`outbound::has_waiting`) ask it; an event still being verified is not work
/// yet (its fan-out schedules the destination).
pub(crate) fn has_work(dest: &str, pass: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM outbound_deferrals f \
          CROSS JOIN LATERAL (SELECT e.status, e.fanned_out_at, e.received_at \
                                FROM federation_events e \
                               WHERE e.room_id = f.room_id AND e.seq > f.from_seq \
                                 AND (f.until_seq IS NULL OR e.seq <= f.until_seq) \
                               ORDER BY e.seq LIMIT 1) n \
          WHERE f.destination = {dest} \
            AND (n.status IN ('rejected', 'held') \
                 OR (n.status = 'accepted' AND n.fanned_out_at IS NOT NULL) \
                 OR n.received_at < {pass}))"
    )
}

/// A deferral as stored, with the destination's membership of the room now.
#[derive(Clone, Debug, PartialEq, Eq, diesel::QueryableByName)]
pub struct Stored {
    #[diesel(sql_type = Text)]
    pub room_id: String,
    /// Events of the room with a greater `seq` are owed.
    #[diesel(sql_type = BigInt)]
    pub from_seq: i64,
    /// Set when the destination left the room: the last event owed.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub until_seq: Option<i64>,
    #[diesel(sql_type = Bool)]
    pub joined: bool,
    /// How many fan-outs skipped the destination because of it (see the migration):
    /// what [`advance`] checks before ending it.
    #[diesel(sql_type = BigInt)]
    pub touched: i64,
}

/// The destination's deferrals, by room. A deferral of a server no longer in the room
/// that has no end yet (started by a fan-out that raced the leave, which found nothing
/// to close) ends at the last event fanned out before it left.
pub async fn of(
    conn: &mut AsyncPgConnection,
    destination: &str,
) -> Result<Vec<Stored>, StoreError> {
    Ok(of_many(conn, &[destination])
        .await?
        .remove(destination)
        .unwrap_or_default())
}

/// [`of`] for many destinations in one statement (a probe round): each destination's
/// deferrals by room; destinations without any are missing. The destinations are
/// joined, not searched with `= ANY($1)`, for the reason [`FAN_OUT_VIEW_STATEMENT`]
/// gives for its lists, and reach the planner as `(SELECT $1)`: every drain asks with one name
/// (through [`of`]), a probe round with many, and a list whose length the planner saw
/// would be planned anew on each run (`store::prepared`).
pub async fn of_many(
    conn: &mut AsyncPgConnection,
    destinations: &[&str],
) -> Result<std::collections::HashMap<String, Vec<Stored>>, StoreError> {
    use diesel::QueryableByName;
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        destination: String,
        #[diesel(embed)]
        stored: Stored,
    }
    let mut by = std::collections::HashMap::<String, Vec<Stored>>::new();
    if destinations.is_empty() {
        return Ok(by);
    }
    let rows: Vec<Row> = prepared(
        diesel::sql_query(
            "SELECT f.destination, f.room_id, f.from_seq, \
                COALESCE(f.until_seq, CASE WHEN s.state IS DISTINCT FROM 'joined' THEN \
                  (SELECT COALESCE(max(e.seq), f.from_seq) FROM federation_events e \
                    WHERE e.room_id = f.room_id AND e.seq > f.from_seq \
                      AND e.fanned_out_at <= COALESCE(s.updated_at, f.created_at)) END) \
                  AS until_seq, \
                COALESCE(s.state = 'joined', false) AS joined, f.touched \
           FROM (SELECT DISTINCT unnest((SELECT $1::text[]))) AS d(name) \
           JOIN outbound_deferrals f ON f.destination = d.name \
           LEFT JOIN room_servers s \
             ON s.room_id = f.room_id AND s.server_name = f.destination \
          ORDER BY f.destination, f.room_id",
        )
        .bind::<Array<Text>, _>(destinations),
    )
    .load(conn)
    .await?;
    for r in rows {
        by.entry(r.destination).or_default().push(r.stored);
    }
    Ok(by)
}

/// Ordering keys as a Postgres array literal (`{1,2,3}`): how the statements that write
/// outbound rows carry them, here and in `outbound` (one text array per column; Postgres
/// cannot unnest arrays of arrays).
pub(crate) fn array_literal(v: &[i64]) -> String {
    let items: Vec<String> = v.iter().map(i64::to_string).collect();
    format!("{{{}}}", items.join(","))
}

/// One row the drain writes for a deferral.
pub struct Caught<'a> {
    pub event_id: &'a str,
    pub event_seq: i64,
    /// Ordering keys (`delivery::order`).
    pub provides: &'a [i64],
    pub waits: &'a [i64],
    /// When the event was stored here: the row's `created_at`, so its age (and expiry,
    /// `delivery.max_age_secs`) counts from then, as for a row fan-out wrote.
    pub received_at: DateTime<Utc>,
}

/// What [`advance`] does with the deferral once its rows are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Its cursor moves on.
    Move,
    /// It goes: the destination left the room and the cursor reached its end.
    Finish,
    /// It goes if the destination answers (healthy, not new), no fan-out touched it
    /// since it was read (`touched` as read), and no event of the room is stored after
    /// the cursor; else its cursor moves on. Its destination's later events of the room
    /// get rows from fan-out again.
    End { touched: i64 },
}

/// Writes a deferral's rows (a row that exists is left alone) and moves its cursor from
/// `from` to `to`, or deletes it (`then`) — one statement. Nothing changes unless the
/// cursor still is at `from`: a fan-out that started the deferral lower meanwhile (an
/// earlier event fanned out late) keeps its start, and the next round reads from there
/// (the rows written now are held back until then). Returns whether it moved or went.
///
/// Why `End` is safe against a fan-out that saw the deferral and skipped the
/// destination: that fan-out bumps `touched` in the statement that relies on the
/// deferral. Committed before this statement: `touched` differs, nothing is deleted.
/// Running: this statement waits for its row lock and re-checks `touched` on the new
/// version. After: the fan-out finds no row to touch and writes the destination's row
/// itself (`outbound::input_ctes`). An event stored before this statement is seen by
/// it and stops the end.
///
/// A fan-out bumps only the deferrals of destinations that answer in its view (a
/// thousand dead servers' deferrals are not written per batch). One that skipped a
/// destination that did not answer is covered because ending needs the destination to
/// answer in this statement's snapshot, and the skipped event was stored before that
/// fan-out's view: seen here, it stops the end. Left open: the destination fails again
/// between this statement's snapshot and that view, and the event is stored after the
/// snapshot, while this statement still runs (waiting for a row lock).
pub async fn advance(
    conn: &mut AsyncPgConnection,
    destination: &str,
    room_id: &str,
    from: i64,
    to: i64,
    then: Then,
    rows: &[Caught<'_>],
) -> Result<bool, StoreError> {
    #[derive(diesel::QueryableByName)]
    struct Moved {
        #[diesel(sql_type = BigInt)]
        moved: i64,
    }
    let array = array_literal;
    let ids: Vec<&str> = rows.iter().map(|r| r.event_id).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.event_seq).collect();
    let provides: Vec<String> = rows.iter().map(|r| array(r.provides)).collect();
    let waits: Vec<String> = rows.iter().map(|r| array(r.waits)).collect();
    let at: Vec<DateTime<Utc>> = rows.iter().map(|r| r.received_at).collect();
    let r: Moved = prepared(
        diesel::sql_query(
            "WITH ins AS ( \
           INSERT INTO outbound_queue \
             (destination, event_id, event_seq, order_provides, order_waits, created_at) \
           SELECT $1, e, s, p::bigint[], w::bigint[], c \
             FROM UNNEST((SELECT $3::text[]), (SELECT $4::bigint[]), (SELECT $5::text[]), \
                         (SELECT $6::text[]), (SELECT $7::timestamptz[])) \
               AS x(e, s, p, w, c) \
           ON CONFLICT DO NOTHING), \
         gone AS ( \
           DELETE FROM outbound_deferrals f \
            WHERE f.destination = $1 AND f.room_id = $2 AND f.from_seq = $8 \
              AND ($10 = 'finish' \
                   OR ($10 = 'end' AND f.touched = $11 AND f.until_seq IS NULL \
                       AND EXISTS (SELECT 1 FROM destination_health h \
                                    WHERE h.destination = $1 AND h.state = 'healthy' \
                                      AND (h.last_success_at IS NOT NULL \
                                           OR h.last_error_at IS NOT NULL)) \
                       AND NOT EXISTS (SELECT 1 FROM federation_events e \
                                        WHERE e.room_id = $2 AND e.seq > $9))) \
           RETURNING 1), \
         moved AS ( \
           UPDATE outbound_deferrals SET from_seq = $9 \
            WHERE destination = $1 AND room_id = $2 AND from_seq = $8 AND $10 <> 'finish' \
              AND NOT EXISTS (SELECT 1 FROM gone) \
           RETURNING 1) \
         SELECT (SELECT count(*) FROM moved) + (SELECT count(*) FROM gone) AS moved",
        )
        .bind::<Text, _>(destination)
        .bind::<Text, _>(room_id)
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<BigInt>, _>(&seqs)
        .bind::<Array<Text>, _>(&provides)
        .bind::<Array<Text>, _>(&waits)
        .bind::<Array<Timestamptz>, _>(&at)
        .bind::<BigInt, _>(from)
        .bind::<BigInt, _>(to)
        .bind::<Text, _>(match then {
            Then::Move => "move",
            Then::Finish => "finish",
            Then::End { .. } => "end",
        })
        .bind::<BigInt, _>(match then {
            Then::End { touched } => touched,
            _ => 0,
        }),
    )
    .get_result(conn)
    .await?;
    Ok(r.moved > 0)
}

/// Ends a server's deferral in a room it left: the events fanned out so far stay owed,
/// the later ones are not (`until_seq`). Called when its membership turns `left`
/// (`rooms::refresh_room_server`); a no-op without a deferral.
pub async fn close(
    conn: &mut AsyncPgConnection,
    room_id: &str,
    server_name: &str,
) -> Result<(), StoreError> {
    // The events fanned out so far are the ones it would have had rows for; an event
    // stored earlier but fanned out after the leave is not (fan-out reads the room's
    // servers then).
    diesel::sql_query(
        "UPDATE outbound_deferrals SET until_seq = \
           (SELECT COALESCE(max(seq), 0) FROM federation_events \
             WHERE room_id = $1 AND fanned_out_at IS NOT NULL) \
         WHERE room_id = $1 AND destination = $2 AND until_seq IS NULL",
    )
    .bind::<Text, _>(room_id)
    .bind::<Text, _>(server_name)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes every deferral of `destination` (a peer the operator blocked gets nothing
/// more); returns how many.
pub async fn forget(conn: &mut AsyncPgConnection, destination: &str) -> Result<usize, StoreError> {
    Ok(
        diesel::sql_query("DELETE FROM outbound_deferrals WHERE destination = $1")
            .bind::<Text, _>(destination)
            .execute(conn)
            .await?,
    )
}

/// [`fan_out_view`]'s statement: `$1` the rooms (text[]). Public for the plan tests.
///
/// One statement for what a fan-out reads before it decides: the rooms' joined servers,
/// the state row of each, and each one's deferral in the room. Until the eighteenth
/// round (docs/performance.md) the servers were read first, per room, and their names
/// handed back to a second statement: at a steady rate that was one statement more per
/// verify run, and for a room of a thousand servers a thousand names sent to the worker
/// and a thousand sent back. The servers are read once (`s`, materialized: it is used
/// three times) through `room_servers_joined`.
///
/// Lists are joined, never searched as `= ANY($1)`: every fan-out runs it, a prepared
/// statement, and Postgres soon keeps a generic plan for it, made without the array. For
/// a small table (a thousand destinations) that plan is a sequential scan, and against
/// an array parameter `= ANY` is a linear search for each row: a thousand names a
/// thousand times, 5–11 ms a fan-out, where the join takes 1 ms (docs/performance.md,
/// eleventh round).
pub const FAN_OUT_VIEW_STATEMENT: &str = "\
    WITH s AS MATERIALIZED ( \
      SELECT rs.room_id, rs.server_name \
        FROM (SELECT DISTINCT unnest((SELECT $1::text[]))) AS r(id) \
        JOIN room_servers rs ON rs.room_id = r.id AND rs.state = 'joined') \
    SELECT s.room_id, s.server_name AS destination, NULL::bool AS healthy, \
           NULL::bool AS unreachable, NULL::bigint AS from_seq, NULL::bigint AS until_seq \
      FROM s \
    UNION ALL \
    SELECT NULL, h.destination, h.state = 'healthy', \
           (h.state = 'healthy' AND h.last_success_at IS NULL AND h.last_error_at IS NULL) \
           OR (h.state = 'backing_off' AND h.last_status_code IS NULL), NULL, NULL \
      FROM (SELECT DISTINCT server_name FROM s) AS d(name) \
      JOIN destination_health h ON h.destination = d.name \
    UNION ALL \
    SELECT f.room_id, f.destination, NULL, NULL, f.from_seq, f.until_seq \
      FROM s JOIN outbound_deferrals f \
        ON f.destination = s.server_name AND f.room_id = s.room_id";

/// What a fan-out needs to decide (`delivery::deferral::fan_out`) for the events of
/// rooms hosted here: read by [`fan_out_view`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FanOutView {
    /// Each room's joined servers (us among them, when we are), sorted by name; a room
    /// with none is absent.
    pub servers: std::collections::HashMap<String, Vec<String>>,
    /// Each of those servers' state, as (healthy, unreachable:
    /// `delivery::deferral::Reach`); absent: no state row, new to us.
    pub reach: std::collections::HashMap<String, (bool, bool)>,
    /// Their deferrals in those rooms, (destination, room) → (from_seq, until_seq).
    pub open: std::collections::HashMap<(String, String), (i64, Option<i64>)>,
}

/// The [`FanOutView`] of `rooms`, in one statement ([`FAN_OUT_VIEW_STATEMENT`]).
///
/// # Errors
/// [`StoreError`] when the statement fails.
pub async fn fan_out_view(
    conn: &mut AsyncPgConnection,
    rooms: &[&str],
) -> Result<FanOutView, StoreError> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Nullable<Text>)]
        room_id: Option<String>,
        #[diesel(sql_type = Text)]
        destination: String,
        #[diesel(sql_type = Nullable<Bool>)]
        healthy: Option<bool>,
        #[diesel(sql_type = Nullable<Bool>)]
        unreachable: Option<bool>,
        #[diesel(sql_type = Nullable<BigInt>)]
        from_seq: Option<i64>,
        #[diesel(sql_type = Nullable<BigInt>)]
        until_seq: Option<i64>,
    }
    let mut view = FanOutView::default();
    if rooms.is_empty() {
        return Ok(view);
    }
    let rows: Vec<Row> =
        prepared(diesel::sql_query(FAN_OUT_VIEW_STATEMENT).bind::<Array<Text>, _>(rooms))
            .load(conn)
            .await?;
    for r in rows {
        match (r.room_id, r.from_seq) {
            (Some(room), Some(from)) => {
                view.open.insert((r.destination, room), (from, r.until_seq));
            }
            (Some(room), None) => view.servers.entry(room).or_default().push(r.destination),
            (None, _) => {
                view.reach.insert(
                    r.destination,
                    (r.healthy.unwrap_or(true), r.unreachable.unwrap_or(false)),
                );
            }
        }
    }
    for list in view.servers.values_mut() {
        list.sort_unstable();
    }
    Ok(view)
}
