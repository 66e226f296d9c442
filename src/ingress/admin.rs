//! The admin API (bearer `PARAFED_ADMIN_TOKEN`), under `/_parafed/admin/v1/`: thin
//! handlers over the operations in `crate::admin`. Each parses its query string or JSON
//! body (unknown parameters are refused, so a misspelt filter never widens a bulk
//! operation), calls one operation and answers its result as JSON. `docs/admin.md` lists
//! the routes and the shape of every answer; the `parafed admin` command prints them.

use http::request::Parts;
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::{json_bytes_response, ApiError, Body};
use super::request::{parse_query, read_body};
use crate::admin::{self, deliveries, destinations, events, peers, queues};
use crate::app::App;
use crate::store::inspect::{Change, DeliveryFilter};

fn ok(v: &impl serde::Serialize) -> Result<Response<Body>, ApiError> {
    let bytes = serde_json::to_vec(v).map_err(|e| {
        tracing::error!(error = %e, "encoding an admin answer failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            "internal error; it has been logged",
        )
    })?;
    Ok(json_bytes_response(StatusCode::OK, bytes))
}

/// A query string with only the parameters a route knows.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(parts: &Parts, allowed: &[&str]) -> Result<Query, ApiError> {
        let q = parse_query(parts.uri.query().unwrap_or(""))?;
        if let Some((k, _)) = q.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}; this route takes: {}",
                allowed.join(", ")
            )));
        }
        Ok(Query(q))
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn number(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("{name} must be a whole number, not {v:?}"))
                })
            })
            .transpose()
    }
    fn limit(&self) -> Result<i64, ApiError> {
        Ok(admin::limit(self.number("limit")?)?)
    }
}

/// A JSON body (an empty one reads as `{}`); unknown fields are refused. Read like every
/// body here — `Content-Length` required, no `Transfer-Encoding` — so a body is never
/// mistaken for an empty one (which would drop a bulk operation's filter and dry run).
async fn body<T: DeserializeOwned>(parts: &Parts, body: Incoming) -> Result<T, ApiError> {
    let bytes = read_body(&parts.headers, body).await?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// The body of bulk delivery operations: the filter, and whether only to count.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkDeliveries {
    destination: Option<String>,
    state: Option<String>,
    event_id: Option<String>,
    older_than_secs: Option<u64>,
    #[serde(default)]
    dry_run: bool,
}

/// The body of bulk dead-job operations.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkJobs {
    queue: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

/// The body of a destination pause.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reason {
    reason: Option<String>,
}

/// The body of `peers … allow | block | quarantine`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    reason: Option<String>,
    /// The decision lapses after this many seconds (absent: until changed).
    for_secs: Option<u64>,
}

/// The body of `peers … rate-limit`: absent fields lift the peer's own limit.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    per_minute: Option<u32>,
    in_flight: Option<u32>,
}

/// The body of `peers mode`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeBody {
    mode: String,
}

/// The body of calls that take none.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn ago(secs: Option<i64>) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    let Some(s) = secs else { return Ok(None) };
    chrono::Duration::try_seconds(s)
        .filter(|_| s >= 0)
        .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "older_than_secs must be a number of seconds from 0 to a few centuries, not {s}"
            ))
        })
}

fn delivery_filter(
    destination: Option<&str>,
    state: Option<&str>,
    event_id: Option<&str>,
    older_than_secs: Option<i64>,
) -> Result<DeliveryFilter, ApiError> {
    Ok(DeliveryFilter {
        destination: destination.map(str::to_owned),
        state: state.map(deliveries::state).transpose()?,
        event_id: event_id.map(str::to_owned),
        created_before: ago(older_than_secs)?,
    })
}

fn decode(segment: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::bad_request("the path is not valid UTF-8"))
}

fn delivery_id(s: &str) -> Result<i64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("delivery id must be a number, not {s:?}")))
}

/// Routes one admin request (`rest` is the path after `/_parafed/admin/v1`).
pub async fn route(
    app: &App,
    method: &Method,
    rest: &str,
    parts: &Parts,
    incoming: Incoming,
) -> Result<Response<Body>, ApiError> {
    let decoded: Vec<String> = rest
        .trim_start_matches('/')
        .split('/')
        .map(decode)
        .collect::<Result<_, _>>()?;
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let get = method == Method::GET;
    let post = method == Method::POST;
    if !get && !post {
        return Err(ApiError::method_not_allowed());
    }
    let nq = || Query::parse(parts, &[]);
    match (get, segments.as_slice()) {
        (true, ["status"]) => {
            nq()?;
            ok(&admin::status::status(app).await?)
        }
        (true, ["queues"]) => {
            nq()?;
            ok(&queues::list(app).await?)
        }
        (true, ["queues", q]) => {
            nq()?;
            ok(&queues::stats(app, queues::queue_name(q)?).await?)
        }
        (false, ["queues", q, op @ ("pause" | "resume")]) => {
            nq()?;
            let _: Empty = body(parts, incoming).await?;
            ok(&queues::set_paused(app, queues::queue_name(q)?, *op == "pause").await?)
        }
        (true, ["jobs"]) => {
            let q = Query::parse(
                parts,
                &["queue", "state", "older_than_secs", "cursor", "limit"],
            )?;
            let f = queues::JobFilter {
                queue: q.get("queue").map(queues::queue_name).transpose()?,
                state: q.get("state").map(queues::job_state).transpose()?,
                older_than_secs: q.number("older_than_secs")?.map(|s| s.max(0) as u64),
            };
            ok(&queues::jobs(app, &f, q.get("cursor"), q.limit()?).await?)
        }
        (false, ["jobs", op @ ("redrive" | "purge")]) => {
            nq()?;
            let b: BulkJobs = body(parts, incoming).await?;
            let list = match b.queue.as_deref() {
                Some(q) => vec![queues::queue_name(q)?],
                None => crate::queue::QueueName::ALL.to_vec(),
            };
            ok(&queues::dead_bulk(app, &list, *op == "purge", b.dry_run).await?)
        }
        (true, ["jobs", q, id]) => {
            nq()?;
            ok(&queues::job(app, queues::queue_name(q)?, id).await?)
        }
        (false, ["jobs", q, id, op @ ("retry" | "cancel")]) => {
            nq()?;
            let _: Empty = body(parts, incoming).await?;
            let q = queues::queue_name(q)?;
            if *op == "retry" {
                ok(&queues::retry(app, q, id).await?)
            } else {
                ok(&queues::cancel(app, q, id).await?)
            }
        }
        (true, ["deliveries"]) => {
            let q = Query::parse(
                parts,
                &[
                    "destination",
                    "state",
                    "event_id",
                    "older_than_secs",
                    "cursor",
                    "limit",
                ],
            )?;
            let f = delivery_filter(
                q.get("destination"),
                q.get("state"),
                q.get("event_id"),
                q.number("older_than_secs")?,
            )?;
            ok(&deliveries::list(app, &f, q.get("cursor"), q.limit()?).await?)
        }
        (false, ["deliveries", op @ ("retry" | "cancel" | "purge")]) => {
            nq()?;
            let b: BulkDeliveries = body(parts, incoming).await?;
            if b.destination.is_none()
                && b.state.is_none()
                && b.event_id.is_none()
                && b.older_than_secs.is_none()
            {
                return Err(ApiError::bad_request(
                    "a bulk change needs at least one filter: destination, state, event_id or older_than_secs",
                ));
            }
            let f = delivery_filter(
                b.destination.as_deref(),
                b.state.as_deref(),
                b.event_id.as_deref(),
                b.older_than_secs.map(|s| s.min(i64::MAX as u64) as i64),
            )?;
            ok(&deliveries::change_bulk(app, change(op), &f, b.dry_run).await?)
        }
        (true, ["deliveries", id]) => {
            nq()?;
            ok(&deliveries::show(app, delivery_id(id)?).await?)
        }
        (false, ["deliveries", id, op @ ("retry" | "cancel" | "purge")]) => {
            nq()?;
            let _: Empty = body(parts, incoming).await?;
            ok(&deliveries::change_one(app, change(op), delivery_id(id)?).await?)
        }
        (true, ["destinations"]) => {
            let q = Query::parse(parts, &["state", "cursor", "limit"])?;
            let state = q.get("state").map(destinations::state).transpose()?;
            ok(&destinations::list(app, state, q.get("cursor"), q.limit()?).await?)
        }
        (true, ["destinations", name]) => {
            nq()?;
            ok(&destinations::show(app, name).await?)
        }
        (false, ["destinations", name, op @ ("retry-now" | "pause" | "resume")]) => {
            nq()?;
            let b: Reason = body(parts, incoming).await?;
            let action = match *op {
                "retry-now" => destinations::Action::RetryNow,
                "pause" => destinations::Action::Pause,
                _ => destinations::Action::Resume,
            };
            ok(&destinations::act(app, name, action, b.reason.as_deref()).await?)
        }
        (true, ["events"]) => {
            let q = Query::parse(parts, &["room_id", "origin", "status", "cursor", "limit"])?;
            let f = events::EventFilter {
                room: q.get("room_id").map(str::to_owned),
                origin: q.get("origin").map(str::to_owned),
                status: q
                    .get("status")
                    .map(events::status)
                    .transpose()?
                    .map(str::to_owned),
            };
            ok(&events::list(app, &f, q.get("cursor"), q.limit()?).await?)
        }
        (true, ["events", id]) => {
            nq()?;
            ok(&events::show(app, id).await?)
        }
        (true, ["peers"]) => {
            let q = Query::parse(parts, &["state", "cursor", "limit"])?;
            let state = q.get("state").map(peers::state).transpose()?;
            ok(&peers::list(app, state, q.get("cursor"), q.limit()?).await?)
        }
        (true, ["peers", "mode"]) | (true, ["mode"]) => {
            nq()?;
            ok(&peers::get_mode(app).await?)
        }
        (false, ["peers", "mode"]) => {
            nq()?;
            let b: ModeBody = body(parts, incoming).await?;
            ok(&peers::set_mode(app, peers::mode(&b.mode)?).await?)
        }
        (true, ["peers", name]) => {
            nq()?;
            ok(&peers::show(app, &peers::peer(name)?).await?)
        }
        (false, ["peers", name, op @ ("allow" | "block" | "quarantine")]) => {
            nq()?;
            let b: DecisionBody = body(parts, incoming).await?;
            let verdict = match *op {
                "allow" => peers::Verdict::Allow,
                "block" => peers::Verdict::Block,
                _ => peers::Verdict::Quarantine,
            };
            let name = peers::peer(name)?;
            ok(&peers::decide(app, &name, verdict, b.reason.as_deref(), b.for_secs).await?)
        }
        (false, ["peers", name, op @ ("release" | "purge")]) => {
            nq()?;
            let _: Empty = body(parts, incoming).await?;
            let name = peers::peer(name)?;
            if *op == "release" {
                ok(&peers::release(app, &name).await?)
            } else {
                ok(&peers::purge(app, &name).await?)
            }
        }
        (false, ["peers", name, "rate-limit"]) => {
            nq()?;
            let b: LimitsBody = body(parts, incoming).await?;
            let name = peers::peer(name)?;
            ok(&peers::set_limits(app, &name, b.per_minute, b.in_flight).await?)
        }
        (true, ["keys"]) => {
            nq()?;
            ok(&serde_json::json!({ "keys": admin::keys_list(app).await? }))
        }
        (false, ["keys", "rotate"]) => {
            nq()?;
            let _: Empty = body(parts, incoming).await?;
            ok(&serde_json::json!({ "keys": admin::keys_rotate(app).await? }))
        }
        (true, ["audit"]) => {
            let q = Query::parse(parts, &["action", "cursor", "limit"])?;
            ok(&admin::audit_list(app, q.get("action"), q.get("cursor"), q.limit()?).await?)
        }
        _ => Err(ApiError::not_found(format!(
            "no admin API endpoint {method} /_parafed/admin/v1{rest}; see docs/admin.md"
        ))),
    }
}

fn change(op: &str) -> Change {
    match op {
        "retry" => Change::Retry,
        "cancel" => Change::Cancel,
        _ => Change::Purge,
    }
}
