//! The operator's views of delivery, for the admin API: deliveries (outbound rows) by
//! filter, with their attempts; destinations with their backlog; an event with every
//! destination's row and attempt. Also the bulk changes an operator makes to deliveries
//! (retry, cancel, purge), which select by the same filter as the listing, so a dry run
//! reports exactly the rows the real run changes.
//!
//! Lists are keyset-paged, newest first (`id` / `seq` below the cursor), so a page is
//! stable while new rows arrive. Each filter is one fixed statement with optional
//! parameters (`$n IS NULL OR …`): these are operator queries, rare and bounded by
//! `LIMIT`, not the sender's hot path.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use super::StoreError;

/// Most rows one bulk operation changes; the answer says when more matched.
pub const MAX_BULK: i64 = 100_000;

/// A delivery's state as the operator sees it: the row's status, with `pending` split by
/// whether a request for it is open right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Pending,
    InFlight,
    Delivered,
    Dead,
    Cancelled,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 5] = [
        DeliveryState::Pending,
        DeliveryState::InFlight,
        DeliveryState::Delivered,
        DeliveryState::Dead,
        DeliveryState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::InFlight => "in_flight",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
            DeliveryState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// The row status and, for pending rows, whether a request must be open.
    fn columns(self) -> (&'static str, Option<bool>) {
        match self {
            DeliveryState::Pending => ("pending", Some(false)),
            DeliveryState::InFlight => ("pending", Some(true)),
            DeliveryState::Delivered => ("delivered", None),
            DeliveryState::Dead => ("dead", None),
            DeliveryState::Cancelled => ("cancelled", None),
        }
    }
}

/// Which deliveries an operation applies to; every field narrows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeliveryFilter {
    pub destination: Option<String>,
    pub state: Option<DeliveryState>,
    pub event_id: Option<String>,
    /// Only rows created before this.
    pub created_before: Option<DateTime<Utc>>,
}

/// One delivery (outbound row).
#[derive(Clone, Debug, QueryableByName, Serialize)]
pub struct Delivery {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub destination: String,
    #[diesel(sql_type = Text)]
    pub event_id: String,
    #[diesel(sql_type = Text)]
    pub room_id: String,
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// `pending`, `in_flight`, `delivered`, `dead` or `cancelled`.
    #[diesel(sql_type = Text)]
    pub state: String,
    /// Requests sent for it so far.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    pub updated_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub delivered_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    /// Why it is dead or cancelled.
    #[diesel(sql_type = Nullable<Text>)]
    pub dead_reason: Option<String>,
}

/// The row's columns, with `state` derived (see [`DeliveryState`]).
const DELIVERY_COLUMNS: &str = "o.id, o.destination, o.event_id, e.room_id, e.event_type, \
    CASE WHEN o.status = 'pending' AND EXISTS (SELECT 1 FROM delivery_attempts a \
      WHERE a.outbound_id = o.id AND a.finished_at IS NULL) THEN 'in_flight' ELSE o.status END \
      AS state, \
    o.attempts, o.created_at, o.updated_at, o.delivered_at, o.last_error, o.dead_reason";

/// The filter as a WHERE clause over `o` (outbound_queue): `$1` destination, `$2` status,
/// `$3` in flight, `$4` event id, `$5` created before, `$6` id below (the cursor).
const DELIVERY_WHERE: &str = "($1::text IS NULL OR o.destination = $1) \
    AND ($2::text IS NULL OR o.status = $2) \
    AND ($3::bool IS NULL OR EXISTS (SELECT 1 FROM delivery_attempts a \
      WHERE a.outbound_id = o.id AND a.finished_at IS NULL) = $3) \
    AND ($4::text IS NULL OR o.event_id = $4) \
    AND ($5::timestamptz IS NULL OR o.created_at < $5) \
    AND ($6::bigint IS NULL OR o.id < $6)";

macro_rules! bind_filter {
    ($q:expr, $f:expr, $below:expr) => {{
        let (status, open) = match $f.state.map(DeliveryState::columns) {
            Some((s, o)) => (Some(s), o),
            None => (None, None),
        };
        $q.bind::<Nullable<Text>, _>($f.destination.clone())
            .bind::<Nullable<Text>, _>(status)
            .bind::<Nullable<Bool>, _>(open)
            .bind::<Nullable<Text>, _>($f.event_id.clone())
            .bind::<Nullable<Timestamptz>, _>($f.created_before)
            .bind::<Nullable<BigInt>, _>($below)
    }};
}

/// Deliveries matching `f`, newest first, with ids below `below`.
pub async fn deliveries(
    conn: &mut AsyncPgConnection,
    f: &DeliveryFilter,
    below: Option<i64>,
    limit: i64,
) -> Result<Vec<Delivery>, StoreError> {
    let q = diesel::sql_query(format!(
        "SELECT {DELIVERY_COLUMNS} FROM outbound_queue o \
         JOIN federation_events e ON e.event_id = o.event_id \
         WHERE {DELIVERY_WHERE} ORDER BY o.id DESC LIMIT $7"
    ));
    Ok(bind_filter!(q, f, below)
        .bind::<BigInt, _>(limit)
        .load(conn)
        .await?)
}

/// One delivery by id.
pub async fn delivery(
    conn: &mut AsyncPgConnection,
    id: i64,
) -> Result<Option<Delivery>, StoreError> {
    let rows: Vec<Delivery> = diesel::sql_query(format!(
        "SELECT {DELIVERY_COLUMNS} FROM outbound_queue o \
         JOIN federation_events e ON e.event_id = o.event_id WHERE o.id = $1"
    ))
    .bind::<BigInt, _>(id)
    .load(conn)
    .await?;
    Ok(rows.into_iter().next())
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Ids of the deliveries matching `f` that `change` applies to (at most [`MAX_BULK`] + 1,
/// so the caller can tell more matched), oldest first. Rows the change does not apply to
/// are left out here, not after the cut, so a rerun always makes progress.
pub async fn matching_ids(
    conn: &mut AsyncPgConnection,
    f: &DeliveryFilter,
    change: Change,
) -> Result<Vec<i64>, StoreError> {
    let statuses: Vec<&str> = change.applies_to().to_vec();
    let q = diesel::sql_query(format!(
        "SELECT o.id FROM outbound_queue o WHERE {DELIVERY_WHERE} AND o.status = ANY($8) \
         ORDER BY o.id LIMIT $7"
    ));
    let rows: Vec<Id> = bind_filter!(q, f, None::<i64>)
        .bind::<BigInt, _>(MAX_BULK + 1)
        .bind::<Array<Text>, _>(statuses)
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// A change an operator makes to deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Dead or cancelled → pending: sent again, in order for its room (rows keep their
    /// event's storage order), with a fresh maximum age and attempt count.
    Retry,
    /// Pending → cancelled (kept, visible as cancelled).
    Cancel,
    /// Delete settled rows (dead, cancelled or delivered) and their attempts.
    Purge,
}

impl Change {
    /// The row statuses the change applies to; other rows are left alone.
    pub fn applies_to(self) -> &'static [&'static str] {
        match self {
            Change::Retry => &["dead", "cancelled"],
            Change::Cancel => &["pending"],
            Change::Purge => &["dead", "cancelled", "delivered"],
        }
    }
}

#[derive(QueryableByName)]
struct Changed {
    #[diesel(sql_type = Text)]
    destination: String,
}

/// Applies `change` to the rows among `ids` it applies to; returns the destinations of
/// the rows changed (one entry per row), so the caller can schedule their drains.
pub async fn apply(
    conn: &mut AsyncPgConnection,
    change: Change,
    ids: &[i64],
    reason: &str,
) -> Result<Vec<String>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let statuses: Vec<&str> = change.applies_to().to_vec();
    let rows: Vec<Changed> = match change {
        Change::Retry => {
            diesel::sql_query(
                "UPDATE outbound_queue SET status = 'pending', attempts = 0, dead_reason = NULL, \
                   delivered_at = NULL, created_at = now(), updated_at = now() \
                 WHERE id = ANY($1) AND status = ANY($2) RETURNING destination",
            )
            .bind::<Array<BigInt>, _>(ids)
            .bind::<Array<Text>, _>(statuses)
            .load(conn)
            .await?
        }
        Change::Cancel => diesel::sql_query(
            "UPDATE outbound_queue SET status = 'cancelled', dead_reason = $3, updated_at = now() \
                 WHERE id = ANY($1) AND status = ANY($2) RETURNING destination",
        )
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Text>, _>(statuses)
        .bind::<Text, _>(reason)
        .load(conn)
        .await?,
        Change::Purge => {
            diesel::sql_query(
                // Their attempts go with them (ON DELETE CASCADE).
                "DELETE FROM outbound_queue WHERE id = ANY($1) AND status = ANY($2) \
                 RETURNING destination",
            )
            .bind::<Array<BigInt>, _>(ids)
            .bind::<Array<Text>, _>(statuses)
            .load(conn)
            .await?
        }
    };
    Ok(rows.into_iter().map(|r| r.destination).collect())
}

/// One request sent for a delivery (or an invite / join / leave).
#[derive(Clone, Debug, QueryableByName, Serialize)]
pub struct Attempt {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub delivery_id: Option<i64>,
    #[diesel(sql_type = Text)]
    pub destination: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub event_id: Option<String>,
    /// `event`, `invite`, `join` or `leave`.
    #[diesel(sql_type = Text)]
    pub request_kind: String,
    /// The row's attempt number (1 = first request).
    #[diesel(sql_type = Integer)]
    pub attempt: i32,
    #[diesel(sql_type = Nullable<Integer>)]
    pub status_code: Option<i32>,
    /// `None` for a 2xx; else `http_4xx`, `connect`, `timeout`, `interrupted`, …
    #[diesel(sql_type = Nullable<Text>)]
    pub error_class: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    pub latency_ms: Option<i32>,
    /// The start of the peer's answer.
    #[diesel(sql_type = Nullable<Text>)]
    pub response_excerpt: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    pub attempted_at: DateTime<Utc>,
    /// `None` while the request is open.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub finished_at: Option<DateTime<Utc>>,
}

const ATTEMPT_COLUMNS: &str = "id, outbound_id AS delivery_id, destination, event_id, \
    request_kind, attempt, status_code, error_class, latency_ms, response_excerpt, \
    attempted_at, finished_at";

/// Attempts for one delivery, oldest first.
pub async fn attempts_of_delivery(
    conn: &mut AsyncPgConnection,
    id: i64,
) -> Result<Vec<Attempt>, StoreError> {
    Ok(diesel::sql_query(format!(
        "SELECT {ATTEMPT_COLUMNS} FROM delivery_attempts WHERE outbound_id = $1 ORDER BY id"
    ))
    .bind::<BigInt, _>(id)
    .load(conn)
    .await?)
}

/// Attempts for one event, to every destination, oldest first.
pub async fn attempts_of_event(
    conn: &mut AsyncPgConnection,
    event_id: &str,
) -> Result<Vec<Attempt>, StoreError> {
    Ok(diesel::sql_query(format!(
        "SELECT {ATTEMPT_COLUMNS} FROM delivery_attempts WHERE event_id = $1 ORDER BY id LIMIT 1000"
    ))
    .bind::<Text, _>(event_id)
    .load(conn)
    .await?)
}

/// The latest attempts to a destination, newest first.
pub async fn recent_attempts(
    conn: &mut AsyncPgConnection,
    destination: &str,
    limit: i64,
) -> Result<Vec<Attempt>, StoreError> {
    Ok(diesel::sql_query(format!(
        "SELECT {ATTEMPT_COLUMNS} FROM delivery_attempts WHERE destination = $1 \
         ORDER BY attempted_at DESC, id DESC LIMIT $2"
    ))
    .bind::<Text, _>(destination)
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?)
}

/// A destination with its backlog.
#[derive(Clone, Debug, QueryableByName, Serialize)]
pub struct DestinationView {
    #[diesel(sql_type = Text)]
    pub destination: String,
    /// `healthy`, `backing_off`, `held` or `paused`.
    #[diesel(sql_type = Text)]
    pub state: String,
    /// Deliveries waiting: rows, and events a deferral still owes (fan-out left the
    /// destination out while it was down; `store::deferrals`).
    #[diesel(sql_type = BigInt)]
    pub backlog: i64,
    /// When the oldest waiting delivery was created (for one a deferral owes: when its
    /// event was stored).
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub oldest_pending: Option<DateTime<Utc>>,
    #[diesel(sql_type = Integer)]
    pub consecutive_failures: i32,
    /// Nothing is sent before this (backing off, held).
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub backoff_until: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub last_success_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub last_error_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    pub last_status_code: Option<i32>,
    /// Why nothing is sent although nothing failed (held, paused).
    #[diesel(sql_type = Nullable<Text>)]
    pub paused_reason: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub paused_by: Option<String>,
}

// The backlog counts waiting rows and the events the destination's deferrals still owe
// (`store::deferrals`: the room's events after the cursor, less the rejected ones and the
// destination's own; unsettled ones counted as owed).
const DESTINATION_SELECT: &str = "SELECT d.destination, d.state, \
      (SELECT count(*) FROM outbound_queue o WHERE o.destination = d.destination \
         AND o.status = 'pending') \
      + (SELECT count(*) FROM outbound_deferrals f JOIN federation_events e \
           ON e.room_id = f.room_id AND e.seq > f.from_seq \
          AND (f.until_seq IS NULL OR e.seq <= f.until_seq) \
          WHERE f.destination = d.destination AND e.status <> 'rejected' \
            AND e.origin_server <> f.destination \
            AND e.received_from IS DISTINCT FROM f.destination) AS backlog, \
      LEAST((SELECT min(created_at) FROM outbound_queue o WHERE o.destination = d.destination \
               AND o.status = 'pending'), \
            (SELECT min(e.received_at) FROM outbound_deferrals f JOIN federation_events e \
               ON e.room_id = f.room_id AND e.seq > f.from_seq \
              AND (f.until_seq IS NULL OR e.seq <= f.until_seq) \
              WHERE f.destination = d.destination AND e.status <> 'rejected')) \
        AS oldest_pending, \
      d.consecutive_failures, d.backoff_until, d.last_success_at, d.last_error_at, \
      d.last_error, d.last_status_code, d.paused_reason, d.paused_by \
    FROM destination_health d";

/// Destinations in name order after `after`, in `state` when given.
pub async fn destinations(
    conn: &mut AsyncPgConnection,
    state: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<DestinationView>, StoreError> {
    Ok(diesel::sql_query(format!(
        "{DESTINATION_SELECT} WHERE ($1::text IS NULL OR d.state = $1) \
           AND ($2::text IS NULL OR d.destination > $2) ORDER BY d.destination LIMIT $3"
    ))
    .bind::<Nullable<Text>, _>(state)
    .bind::<Nullable<Text>, _>(after)
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?)
}

/// One destination.
pub async fn destination(
    conn: &mut AsyncPgConnection,
    name: &str,
) -> Result<Option<DestinationView>, StoreError> {
    let rows: Vec<DestinationView> =
        diesel::sql_query(format!("{DESTINATION_SELECT} WHERE d.destination = $1"))
            .bind::<Text, _>(name)
            .load(conn)
            .await?;
    Ok(rows.into_iter().next())
}

/// A stored event, as the operator sees it (the content is left out: it is the
/// community's, and `GET /event` serves it to those entitled).
#[derive(Clone, Debug, QueryableByName, Serialize)]
pub struct EventView {
    #[diesel(sql_type = Text)]
    pub event_id: String,
    #[diesel(sql_type = Text)]
    pub room_id: String,
    #[diesel(sql_type = Text)]
    pub event_type: String,
    #[diesel(sql_type = Text)]
    pub sender: String,
    #[diesel(sql_type = Text)]
    pub origin_server: String,
    /// The transport origin that sent it here; `None` for our own events.
    #[diesel(sql_type = Nullable<Text>)]
    pub received_from: Option<String>,
    /// `pending`, `accepted`, `rejected` or `held`.
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub reject_reason: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    pub received_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub verified_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub fanned_out_at: Option<DateTime<Utc>>,
    /// Storage order.
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
}

const EVENT_SELECT: &str = "SELECT event_id, room_id, event_type, sender, origin_server, \
    received_from, status, reject_reason, received_at, verified_at, fanned_out_at, seq \
    FROM federation_events";

/// Events filtered by room, origin and status, newest first, with `seq` below `below`.
pub async fn events(
    conn: &mut AsyncPgConnection,
    room: Option<&str>,
    origin: Option<&str>,
    status: Option<&str>,
    below: Option<i64>,
    limit: i64,
) -> Result<Vec<EventView>, StoreError> {
    Ok(diesel::sql_query(format!(
        "{EVENT_SELECT} WHERE ($1::text IS NULL OR room_id = $1) \
           AND ($2::text IS NULL OR origin_server = $2) AND ($3::text IS NULL OR status = $3) \
           AND ($4::bigint IS NULL OR seq < $4) ORDER BY seq DESC LIMIT $5"
    ))
    .bind::<Nullable<Text>, _>(room)
    .bind::<Nullable<Text>, _>(origin)
    .bind::<Nullable<Text>, _>(status)
    .bind::<Nullable<BigInt>, _>(below)
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?)
}

/// One event.
pub async fn event(
    conn: &mut AsyncPgConnection,
    event_id: &str,
) -> Result<Option<EventView>, StoreError> {
    let rows: Vec<EventView> = diesel::sql_query(format!("{EVENT_SELECT} WHERE event_id = $1"))
        .bind::<Text, _>(event_id)
        .load(conn)
        .await?;
    Ok(rows.into_iter().next())
}

/// Attempts started since `since` and finished, per outcome class: `delivered`
/// for a 2xx, else the attempt's error class.
pub async fn attempt_outcomes(
    conn: &mut AsyncPgConnection,
    since: DateTime<Utc>,
) -> Result<Vec<(String, i64)>, StoreError> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        outcome: String,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT COALESCE(error_class, 'delivered') AS outcome, count(*) AS n \
         FROM delivery_attempts WHERE attempted_at >= $1 AND finished_at IS NOT NULL GROUP BY 1 ORDER BY 1",
    )
    .bind::<Timestamptz, _>(since)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.outcome, r.n)).collect())
}
