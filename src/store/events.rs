//! `federation_events`: storing envelopes and reading them back byte-exact.
//!
//! Inserts are multi-row and idempotent on `event_id`: a row that exists is left alone
//! (`inserted: false`) unless it was *rejected*, or it is a pending or held copy whose
//! signature nobody has checked yet and the new copy's signature was checked — then the
//! new copy replaces it. A forged or unverifiable copy must never make a correctly
//! signed event with the same id answer `inserted: false` (DESIGN.md).

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::Value;

use super::prepared::prepared;
use super::schema::federation_events as fe;
use super::StoreError;
use crate::protocol::envelope::Signatures;
use crate::protocol::{Envelope, EventId, EventType, RoomId, ServerName, StateKey, UserId};

/// Verification state of a stored event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventStatus {
    Pending,
    Accepted,
    Rejected,
    Held,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::Accepted => "accepted",
            EventStatus::Rejected => "rejected",
            EventStatus::Held => "held",
        }
    }
}

/// An envelope about to be stored.
pub struct NewEvent<'a> {
    pub envelope: &'a Envelope,
    /// The transport origin that handed it to us; `None` for our own events.
    pub received_from: Option<&'a ServerName>,
    pub status: EventStatus,
    /// The envelope signature was verified against the origin's key before storing
    /// (always for our own events; for a relayed event only if the origin's keys could
    /// be had). A checked copy replaces an unchecked pending or held one.
    pub signature_checked: bool,
}

/// The columns an event is read back with.
#[derive(Queryable, Selectable)]
#[diesel(table_name = fe, check_for_backend(diesel::pg::Pg))]
struct Row {
    event_id: String,
    room_id: String,
    event_type: String,
    sender: String,
    origin_server: String,
    origin_ts: i64,
    content: String,
    depth: i64,
    state_key: Option<String>,
    signatures: String,
    status: String,
    fanned_out_at: Option<chrono::DateTime<chrono::Utc>>,
    seq: i64,
    received_at: chrono::DateTime<chrono::Utc>,
    received_from: Option<String>,
    released_at: Option<chrono::DateTime<chrono::Utc>>,
    signature_checked: bool,
}

/// A stored event with its status.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub envelope: Envelope,
    pub status: String,
    /// Fan-out already wrote this event's outbound rows (a later fanout job is a
    /// duplicate and does nothing).
    pub fanned_out: bool,
    /// Storage order (`federation_events.seq`): the order dependants are sent in.
    pub seq: i64,
    /// When it was stored here.
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// The server that handed it to us (`None` for our own events).
    pub received_from: Option<String>,
    /// It was held (its origin or relayer quarantined) and released: fan-out never
    /// defers it (`outbound::deferrable`).
    pub released: bool,
    /// Its envelope signature was verified against the origin's key before it was
    /// stored (`NewEvent::signature_checked`): the verify job does not check it again,
    /// unless it was held and released since (`released`).
    pub signature_checked: bool,
}

fn corrupt(id: &str, what: &str) -> StoreError {
    StoreError::Corrupt(format!("event {id}: {what}"))
}

fn from_row(r: Row) -> Result<StoredEvent, StoreError> {
    let id = r.event_id.clone();
    let content: Value = serde_json::from_str(&r.content).map_err(|_| corrupt(&id, "content"))?;
    let signatures: Signatures =
        serde_json::from_str(&r.signatures).map_err(|_| corrupt(&id, "signatures"))?;
    let bad = |e: crate::protocol::IdError| corrupt(&id, &e.to_string());
    Ok(StoredEvent {
        envelope: Envelope {
            event_id: EventId::try_from(r.event_id).map_err(bad)?,
            room_id: RoomId::try_from(r.room_id).map_err(bad)?,
            event_type: EventType::parse(&r.event_type).map_err(bad)?,
            sender: UserId::try_from(r.sender).map_err(bad)?,
            origin_server: ServerName::try_from(r.origin_server).map_err(bad)?,
            origin_ts: r.origin_ts,
            content,
            depth: r.depth,
            state_key: r
                .state_key
                .map(|s| StateKey::parse(&s))
                .transpose()
                .map_err(bad)?,
            signatures,
        },
        status: r.status,
        fanned_out: r.fanned_out_at.is_some(),
        seq: r.seq,
        received_at: r.received_at,
        received_from: r.received_from,
        released: r.released_at.is_some(),
        signature_checked: r.signature_checked,
    })
}

/// Stores events; returns, per input, whether it was stored now (`true`) or an event
/// with that id was already held (`false`). Duplicates within one call count once.
pub async fn insert(
    conn: &mut AsyncPgConnection,
    events: &[NewEvent<'_>],
) -> Result<Vec<bool>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    // One row per event id: Postgres refuses to touch a row twice in one statement.
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&NewEvent> = events
        .iter()
        .filter(|e| seen.insert(e.envelope.event_id.as_str()))
        .collect();
    // Rows are written in event-id order. Two group commits that share event ids (a peer
    // retrying, two peers relaying the same event) then lock them in the same order: in
    // arrival order they could each hold an id the other waits for — a deadlock, which
    // Postgres breaks by failing one batch, every request of it.
    // UNNEST of one array per column: one statement whatever the batch size, so the
    // prepared statement is reused, and the conflict rule can carry a WHERE.
    let col = |f: &dyn Fn(&Envelope) -> String| -> Vec<String> {
        unique.iter().map(|e| f(e.envelope)).collect()
    };
    let event_ids = col(&|e| e.event_id.to_string());
    let room_ids = col(&|e| e.room_id.to_string());
    let types = col(&|e| e.event_type.to_string());
    let senders = col(&|e| e.sender.to_string());
    let origins = col(&|e| e.origin_server.to_string());
    let contents = col(&|e| serde_json::to_string(&e.content).unwrap_or_default());
    let signatures = col(&|e| serde_json::to_string(&e.signatures).unwrap_or_default());
    let origin_ts: Vec<i64> = unique.iter().map(|e| e.envelope.origin_ts).collect();
    let depths: Vec<i64> = unique.iter().map(|e| e.envelope.depth).collect();
    let state_keys: Vec<Option<String>> = unique
        .iter()
        .map(|e| e.envelope.state_key.as_ref().map(|s| s.as_str().to_owned()))
        .collect();
    let from: Vec<Option<String>> = unique
        .iter()
        .map(|e| e.received_from.map(|s| s.to_string()))
        .collect();
    let statuses: Vec<String> = unique
        .iter()
        .map(|e| e.status.as_str().to_owned())
        .collect();
    let checked: Vec<bool> = unique.iter().map(|e| e.signature_checked).collect();
    #[derive(QueryableByName)]
    struct Stored {
        #[diesel(sql_type = Text)]
        event_id: String,
    }
    let stored: Vec<Stored> = prepared(
        diesel::sql_query(
            "INSERT INTO federation_events (event_id, room_id, event_type, sender, origin_server, \
           origin_ts, content, depth, state_key, signatures, received_from, status, \
           received_at, enqueued_at, signature_checked) \
         SELECT e, r, t, s, o, ts, c, d, sk, sig, rf, st, now(), now(), ck \
           FROM UNNEST((SELECT $1::text[]), (SELECT $2::text[]), (SELECT $3::text[]), \
                       (SELECT $4::text[]), (SELECT $5::text[]), (SELECT $6::bigint[]), \
                       (SELECT $7::text[]), (SELECT $8::bigint[]), (SELECT $9::text[]), \
                       (SELECT $10::text[]), (SELECT $11::text[]), (SELECT $12::text[]), \
                       (SELECT $13::bool[])) \
                AS x(e, r, t, s, o, ts, c, d, sk, sig, rf, st, ck) \
          ORDER BY e \
         ON CONFLICT (event_id) DO UPDATE SET \
           room_id = EXCLUDED.room_id, event_type = EXCLUDED.event_type, \
           sender = EXCLUDED.sender, origin_server = EXCLUDED.origin_server, \
           origin_ts = EXCLUDED.origin_ts, content = EXCLUDED.content, \
           depth = EXCLUDED.depth, state_key = EXCLUDED.state_key, \
           signatures = EXCLUDED.signatures, received_from = EXCLUDED.received_from, \
           status = EXCLUDED.status, reject_reason = NULL, \
           received_at = EXCLUDED.received_at, verified_at = NULL, \
           enqueued_at = EXCLUDED.enqueued_at, fanned_out_at = NULL, seq = DEFAULT, \
           signature_checked = EXCLUDED.signature_checked \
         WHERE federation_events.status = 'rejected' \
            OR (EXCLUDED.signature_checked AND NOT federation_events.signature_checked \
                AND federation_events.status IN ('pending', 'held')) \
         RETURNING event_id",
        )
        .bind::<Array<Text>, _>(&event_ids)
        .bind::<Array<Text>, _>(&room_ids)
        .bind::<Array<Text>, _>(&types)
        .bind::<Array<Text>, _>(&senders)
        .bind::<Array<Text>, _>(&origins)
        .bind::<Array<BigInt>, _>(&origin_ts)
        .bind::<Array<Text>, _>(&contents)
        .bind::<Array<BigInt>, _>(&depths)
        .bind::<Array<Nullable<Text>>, _>(&state_keys)
        .bind::<Array<Text>, _>(&signatures)
        .bind::<Array<Nullable<Text>>, _>(&from)
        .bind::<Array<Text>, _>(&statuses)
        .bind::<Array<diesel::sql_types::Bool>, _>(&checked),
    )
    .load(conn)
    .await?;
    let stored: Vec<String> = stored.into_iter().map(|s| s.event_id).collect();
    let stored: std::collections::HashSet<&str> = stored.iter().map(String::as_str).collect();
    let mut first = std::collections::HashSet::new();
    Ok(events
        .iter()
        .map(|e| {
            let id = e.envelope.event_id.as_str();
            stored.contains(id) && first.insert(id)
        })
        .collect())
}

/// An event a peer may read (pending or accepted; never rejected or held ones).
pub async fn get_readable(
    conn: &mut AsyncPgConnection,
    event_id: &str,
) -> Result<Option<StoredEvent>, StoreError> {
    Ok(get(conn, event_id)
        .await?
        .filter(|e| matches!(e.status.as_str(), "pending" | "accepted")))
}

/// Any stored event, whatever its status.
pub async fn get(
    conn: &mut AsyncPgConnection,
    event_id: &str,
) -> Result<Option<StoredEvent>, StoreError> {
    let row: Option<Row> = fe::table
        .filter(fe::event_id.eq(event_id))
        .select(Row::as_select())
        .first(conn)
        .await
        .optional()?;
    row.map(from_row).transpose()
}

/// The rows of events by id, in no particular order; ids not held are absent. Every
/// verify run reads its events with this statement, and every drain round the
/// envelopes it sends: the list is handed over as `(SELECT $1)`, so that its length
/// does not keep Postgres planning it anew on every run (`store::prepared`, "Values
/// the planner must not see").
async fn rows_by_id(conn: &mut AsyncPgConnection, ids: &[&str]) -> Result<Vec<Row>, StoreError> {
    Ok(prepared(
        fe::table
            .filter(
                diesel::dsl::sql::<diesel::sql_types::Bool>(
                    "\"federation_events\".\"event_id\" = ANY((SELECT ",
                )
                .bind::<Array<Text>, _>(ids)
                .sql(")::text[])"),
            )
            .select(Row::as_select()),
    )
    .load(conn)
    .await?)
}

/// Stored events by id, whatever their status, in one query; ids not held are absent.
pub async fn get_many(
    conn: &mut AsyncPgConnection,
    event_ids: &[&str],
) -> Result<std::collections::HashMap<String, StoredEvent>, StoreError> {
    if event_ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let rows = rows_by_id(conn, event_ids).await?;
    rows.into_iter()
        .map(|r| from_row(r).map(|e| (e.envelope.event_id.to_string(), e)))
        .collect()
}

/// Readable events of a room with `depth > since_depth`, by depth, at most `limit`.
pub async fn room_since(
    conn: &mut AsyncPgConnection,
    room_id: &str,
    since_depth: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    let rows: Vec<Row> = fe::table
        .filter(fe::room_id.eq(room_id))
        .filter(fe::depth.gt(since_depth))
        .filter(fe::status.eq_any(["pending", "accepted"]))
        .order((fe::depth.asc(), fe::event_id.asc()))
        .limit(limit)
        .select(Row::as_select())
        .load(conn)
        .await?;
    rows.into_iter().map(from_row).collect()
}

/// Events of a room stored after `after_seq` (and at most `until_seq`), in storage
/// order, at most `limit`, whatever their status: what a deferral's drain decides over
/// (`delivery::deferral`). Read by `federation_events_room_seq`.
pub async fn room_after(
    conn: &mut AsyncPgConnection,
    room_id: &str,
    after_seq: i64,
    until_seq: Option<i64>,
    limit: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    let rows: Vec<Row> = fe::table
        .filter(fe::room_id.eq(room_id))
        .filter(fe::seq.gt(after_seq))
        .filter(fe::seq.le(until_seq.unwrap_or(i64::MAX)))
        .order(fe::seq.asc())
        .limit(limit)
        .select(Row::as_select())
        .load(conn)
        .await?;
    rows.into_iter().map(from_row).collect()
}

/// One judged event of a verify batch: the copy that was judged (`seq`: if another copy
/// replaced it meanwhile — a correctly signed one over an unchecked forgery — its
/// verdict is not applied) and whether a fanout job still has to fan it out
/// (`fan_out_later`: it is left unmarked, for that job and the reconciler).
pub struct Judged<'a> {
    pub event_id: &'a str,
    pub seq: i64,
    pub fan_out_later: bool,
}

/// Accepts judged events, appends them to the inbound feed and writes the outbound rows
/// of those `fan_out` names (each event with its destinations), atomically: an event is
/// accepted, in the feed and fanned out together, or none of it. Events not
/// `fan_out_later` are marked fanned out by the update that accepts them (one row
/// version, not two). Copies no longer pending (settled by another worker, or replaced)
/// are left alone, and get no outbound rows. Returns the ids accepted now, in storage
/// order — the feed's order — and what was written to the outbound queue.
///
/// One statement when the rows fit in one (`outbound::MAX_ENTRIES_PER_STATEMENT`, the
/// usual case); else a transaction of the accept and `outbound::enqueue`.
pub async fn accept(
    conn: &mut AsyncPgConnection,
    judged: &[Judged<'_>],
    fan_out: &super::outbound::Fanned<'_>,
) -> Result<(Vec<String>, super::outbound::Enqueued), StoreError> {
    use super::outbound::{self, bind_columns, Columns, Enqueued, Written};
    if judged.is_empty() {
        return Ok(Default::default());
    }
    if outbound::statements(&fan_out.rows).len() > 1 {
        return conn
            .transaction::<_, StoreError, _>(async |conn| {
                let (accepted, _) = accept_with(conn, judged, &Default::default()).await?;
                let now: std::collections::HashSet<&str> =
                    accepted.iter().map(String::as_str).collect();
                // The events accepted now, each with its conditional list
                // (`Fanned::conditional`, beside `rows`; none when it is shorter).
                let (rows, conditional): (Vec<(outbound::NewOutbound, Vec<String>)>, Vec<_>) =
                    fan_out
                        .rows
                        .iter()
                        .enumerate()
                        .filter(|(_, (e, _))| now.contains(e.event_id))
                        .map(|(i, r)| {
                            let c = fan_out.conditional.get(i).cloned().unwrap_or_default();
                            (r.clone(), c)
                        })
                        .unzip();
                let fanned = outbound::Fanned {
                    rows,
                    conditional,
                    start: fan_out.start.clone(),
                    deferred: fan_out.deferred,
                    covered_healthy: fan_out.covered_healthy.clone(),
                    new: fan_out.new.clone(),
                };
                let written = outbound::enqueue(conn, &fanned, &[]).await?;
                Ok((accepted, written))
            })
            .await;
    }
    return accept_with(conn, judged, fan_out).await;

    /// The one statement: accept, feed, and the rows of the events accepted now.
    async fn accept_with(
        conn: &mut AsyncPgConnection,
        judged: &[Judged<'_>],
        fan_out: &outbound::Fanned<'_>,
    ) -> Result<(Vec<String>, Enqueued), StoreError> {
        #[derive(QueryableByName)]
        struct Out {
            #[diesel(sql_type = Nullable<Text>)]
            event_id: Option<String>,
            #[diesel(sql_type = BigInt)]
            seq: i64,
            #[diesel(sql_type = Nullable<Text>)]
            destination: Option<String>,
            #[diesel(sql_type = BigInt)]
            rows: i64,
            #[diesel(sql_type = diesel::sql_types::Bool)]
            healthy: bool,
        }
        let ids: Vec<&str> = judged.iter().map(|j| j.event_id).collect();
        let seqs: Vec<i64> = judged.iter().map(|j| j.seq).collect();
        let later: Vec<bool> = judged.iter().map(|j| j.fan_out_later).collect();
        let c = Columns::of(&fan_out.rows, &fan_out.conditional, &fan_out.start);
        // The feed entries are written by the same statement: their position is its
        // transaction's id (`feed`), and they are numbered in storage order.
        let out: Vec<Out> = prepared(bind_columns!(
            diesel::sql_query(format!(
                "WITH settled AS ( \
               UPDATE federation_events e SET status = 'accepted', reject_reason = NULL, \
                      verified_at = now(), \
                      fanned_out_at = CASE WHEN x.later THEN NULL ELSE now() END \
                 FROM UNNEST((SELECT $1::text[]), (SELECT $2::bigint[]), (SELECT $3::bool[])) \
                      AS x(id, s, later) \
                WHERE e.event_id = x.id AND e.seq = x.s AND e.status = 'pending' \
               RETURNING e.event_id, e.room_id, e.seq), \
             fed AS ( \
               INSERT INTO inbound_feed (event_id, room_id) \
               SELECT event_id, room_id FROM settled ORDER BY seq \
               ON CONFLICT (event_id) DO NOTHING), \
             {rows}, \
             {ctes}, \
             written AS ({written}) \
             SELECT event_id, seq, NULL::text AS destination, 0::bigint AS rows, \
                    false AS healthy \
               FROM settled \
             UNION ALL \
             SELECT NULL, 0, destination, rows, healthy FROM written",
                rows = outbound::input_ctes(4, "WHERE x.e IN (SELECT event_id FROM settled)"),
                ctes = outbound::WRITE_CTES,
                written = outbound::WRITTEN,
            ))
            .bind::<Array<Text>, _>(&ids)
            .bind::<Array<BigInt>, _>(&seqs)
            .bind::<Array<diesel::sql_types::Bool>, _>(&later),
            c
        ))
        .load(conn)
        .await?;
        let mut accepted: Vec<(i64, String)> = Vec::new();
        let mut written = Vec::new();
        for o in out {
            match (o.event_id, o.destination) {
                (Some(id), _) => accepted.push((o.seq, id)),
                (None, Some(destination)) => written.push(Written {
                    destination,
                    rows: o.rows,
                    healthy: o.healthy,
                }),
                (None, None) => {}
            }
        }
        accepted.sort_unstable();
        let mut enqueued = Enqueued::default();
        enqueued.add(written);
        Ok((
            accepted.into_iter().map(|(_, id)| id).collect(),
            enqueued.finish(fan_out),
        ))
    }
}

/// Rejects judged events, each with its reason, in one statement; copies no longer
/// pending are left alone. Returns, for each event rejected now, the server that handed
/// it to us (the one an offense is counted against).
pub async fn reject(
    conn: &mut AsyncPgConnection,
    rejected: &[(&str, i64, &str)],
) -> Result<Vec<(String, Option<String>)>, StoreError> {
    if rejected.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = rejected.iter().map(|r| r.0).collect();
    let seqs: Vec<i64> = rejected.iter().map(|r| r.1).collect();
    let reasons: Vec<&str> = rejected.iter().map(|r| r.2).collect();
    #[derive(QueryableByName)]
    struct Rejected {
        #[diesel(sql_type = Text)]
        event_id: String,
        #[diesel(sql_type = Nullable<Text>)]
        received_from: Option<String>,
    }
    let rows: Vec<Rejected> = prepared(
        diesel::sql_query(
            "UPDATE federation_events e SET status = 'rejected', reject_reason = x.reason, \
                verified_at = now() \
           FROM UNNEST((SELECT $1::text[]), (SELECT $2::bigint[]), (SELECT $3::text[])) \
                AS x(id, s, reason) \
          WHERE e.event_id = x.id AND e.seq = x.s AND e.status = 'pending' \
         RETURNING e.event_id, e.received_from",
        )
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<BigInt>, _>(&seqs)
        .bind::<Array<Text>, _>(&reasons),
    )
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.event_id, r.received_from))
        .collect())
}

/// Unfinished work whose job was pushed before its queue's cutoff: pending events
/// (verify, before `verify_cutoff`) and accepted events not yet fanned out (fanout, before
/// `fanout_cutoff`). Their `enqueued_at` is moved to now, so concurrent reconcilers in
/// other workers do not take the same rows.
pub async fn claim_stale(
    conn: &mut AsyncPgConnection,
    verify_cutoff: chrono::DateTime<chrono::Utc>,
    fanout_cutoff: chrono::DateTime<chrono::Utc>,
    limit: i64,
) -> Result<(Vec<String>, Vec<String>), StoreError> {
    #[derive(QueryableByName)]
    struct Stale {
        #[diesel(sql_type = Text)]
        event_id: String,
        #[diesel(sql_type = Text)]
        status: String,
    }
    // Returned in storage order: they are pushed as batches, judged in that order.
    // Not kept prepared (`store::prepared`): it runs once a reconcile interval, and its
    // cutoffs are times whose selectivity a generic plan would not know.
    let rows: Vec<Stale> = (diesel::sql_query(
        "WITH claimed AS ( \
           UPDATE federation_events SET enqueued_at = now() \
           WHERE event_id IN ( \
             SELECT event_id FROM federation_events \
              WHERE (status = 'pending' AND (enqueued_at IS NULL OR enqueued_at < $1)) \
                 OR (status = 'accepted' AND fanned_out_at IS NULL \
                     AND (enqueued_at IS NULL OR enqueued_at < $2)) \
              LIMIT $3 FOR UPDATE SKIP LOCKED) \
           RETURNING event_id, status, seq) \
         SELECT event_id, status FROM claimed ORDER BY seq",
    )
    .bind::<diesel::sql_types::Timestamptz, _>(verify_cutoff)
    .bind::<diesel::sql_types::Timestamptz, _>(fanout_cutoff)
    .bind::<BigInt, _>(limit))
    .load(conn)
    .await?;
    let (verify, fanout): (Vec<Stale>, Vec<Stale>) =
        rows.into_iter().partition(|r| r.status == "pending");
    Ok((
        verify.into_iter().map(|r| r.event_id).collect(),
        fanout.into_iter().map(|r| r.event_id).collect(),
    ))
}

/// The envelopes of several events in one query, by id (missing ids are left out).
pub async fn envelopes(
    conn: &mut AsyncPgConnection,
    ids: &[&str],
) -> Result<std::collections::HashMap<String, Envelope>, StoreError> {
    let rows = rows_by_id(conn, ids).await?;
    rows.into_iter()
        .map(|r| from_row(r).map(|e| (e.envelope.event_id.to_string(), e.envelope)))
        .collect()
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = Text)]
    event_id: String,
}

/// Events of `rooms` stored before `before_seq` (and after `since`) that may still get
/// outbound rows: not yet verified, held (a quarantined origin may be released), or
/// accepted and not yet fanned out. Oldest first, at
/// most `limit`; rows that cannot be read back are left out. The deliver job holds back
/// their dependants (`delivery::order`).
pub async fn unsettled_before(
    conn: &mut AsyncPgConnection,
    rooms: &[&str],
    before_seq: i64,
    since: chrono::DateTime<chrono::Utc>,
    limit: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    if rooms.is_empty() {
        return Ok(Vec::new());
    }
    // Literal statuses: the partial index `federation_events_unsettled_room` must stay
    // usable in any plan. Not kept prepared (`store::prepared`): like the drain's read
    // of waiting rows, it bounds `received_at` by a time minutes ago, which a generic
    // plan would take for a third of the table.
    let ids: Vec<String> = (diesel::sql_query(
        "SELECT event_id FROM federation_events \
         WHERE room_id = ANY($1) AND seq < $2 AND received_at > $3 \
           AND (status IN ('pending', 'held') \
                OR (status = 'accepted' AND fanned_out_at IS NULL)) \
         ORDER BY seq LIMIT $4",
    )
    .bind::<Array<Text>, _>(rooms)
    .bind::<BigInt, _>(before_seq)
    .bind::<diesel::sql_types::Timestamptz, _>(since)
    .bind::<BigInt, _>(limit))
    .load::<IdRow>(conn)
    .await?
    .into_iter()
    .map(|r| r.event_id)
    .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<Row> = fe::table
        .filter(fe::event_id.eq_any(&ids))
        .order(fe::seq.asc())
        .select(Row::as_select())
        .load(conn)
        .await?;
    Ok(rows.into_iter().filter_map(|r| from_row(r).ok()).collect())
}

/// Held events from `peer` — sent by it, or originated by it and relayed — oldest first:
/// each becomes pending (its verify job is the caller's to push, in this order), unless
/// the other party to it is quarantined too.
/// Returns their ids in storage order.
pub async fn release_held(
    conn: &mut AsyncPgConnection,
    peer: &str,
) -> Result<Vec<String>, StoreError> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        event_id: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        seq: i64,
    }
    // An event held for another party too (its origin, or the peer that relayed it,
    // still quarantined) stays held.
    let mut rows: Vec<Row> =
        prepared(diesel::sql_query(RELEASE_HELD_STATEMENT).bind::<Text, _>(peer))
            .load(conn)
            .await?;
    rows.sort_by_key(|r| r.seq);
    Ok(rows.into_iter().map(|r| r.event_id).collect())
}

/// Deletes the held events from `peer` (sent by it, or originated by it); returns how
/// many.
pub async fn purge_held(conn: &mut AsyncPgConnection, peer: &str) -> Result<usize, StoreError> {
    Ok(
        prepared(diesel::sql_query(PURGE_HELD_STATEMENT).bind::<Text, _>(peer))
            .execute(conn)
            .await?,
    )
}

/// How many held events `peer` sent or originated (what [`purge_held`] would delete;
/// [`release_held`] leaves held those whose other party is quarantined too).
pub async fn held_count(conn: &mut AsyncPgConnection, peer: &str) -> Result<i64, StoreError> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        held: i64,
    }
    Ok(
        prepared(diesel::sql_query(HELD_COUNT_STATEMENT).bind::<Text, _>(peer))
            .get_result::<Row>(conn)
            .await?
            .held,
    )
}

/// The statement of [`release_held`] (`$1`: the peer's server name); returns the
/// released events' `event_id, seq`, in no order (the caller sorts them).
///
/// The statuses are literals, here and in [`PURGE_HELD_STATEMENT`] and
/// [`HELD_COUNT_STATEMENT`]: the peer's held events are found through the partial
/// indexes of held events (`federation_events_held_from`, `federation_events_held_origin`),
/// and Postgres uses a partial index only if it can prove the query's conditions imply
/// its predicate when planning (PostgreSQL documentation, "Partial Indexes"): a status
/// bound as a parameter would not do for the generic plan a prepared statement keeps.
/// Public, like the others, so that `tests/it/store.rs` can check their generic plans.
pub const RELEASE_HELD_STATEMENT: &str = "\
    UPDATE federation_events e SET status = 'pending', enqueued_at = now(), \
           released_at = now() \
     WHERE e.status = 'held' AND (e.received_from = $1 OR e.origin_server = $1) \
       AND NOT EXISTS (SELECT 1 FROM peer_trust t \
         WHERE t.state = 'quarantine' AND (t.until IS NULL OR t.until > now()) \
           AND t.server_name <> $1 \
           AND (t.server_name = e.received_from OR t.server_name = e.origin_server)) \
     RETURNING e.event_id, e.seq";

/// The statement of [`purge_held`] (`$1`: the peer's server name).
pub const PURGE_HELD_STATEMENT: &str = "\
    DELETE FROM federation_events \
     WHERE status = 'held' AND (received_from = $1 OR origin_server = $1)";

/// The statement of [`held_count`] (`$1`: the peer's server name): one row, `held`.
pub const HELD_COUNT_STATEMENT: &str = "\
    SELECT count(*) AS held FROM federation_events \
     WHERE status = 'held' AND (received_from = $1 OR origin_server = $1)";
