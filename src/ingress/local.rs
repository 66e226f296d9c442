//! The local API: what the co-located Paracord app calls (bearer `PARAFED_LOCAL_TOKEN`).
//!
//! * `PUT  /_parafed/local/v1/rooms/{room_id}` — register a room hosted here;
//! * `POST /_parafed/local/v1/events` — federate an event (signed as us, stored, fanned
//!   out), idempotent on `txn_id`;
//! * `GET  /_parafed/local/v1/feed?since=&limit=` — accepted inbound events in commit order,
//!   paged by an opaque position (`since=0`, then each page's `next_since`);
//! * `POST /_parafed/local/v1/{invite,join,leave}` — ask a room's host on behalf of a
//!   local user; the host's answer is returned.

use bytes::Bytes;
use diesel_async::AsyncConnection;
use http::request::Parts;
use http::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::{json_response, ApiError, Body};
use super::request::{bearer, constant_time_eq, parse_query, query_param};
use crate::app::App;
use crate::delivery::attempt;
use crate::protocol::envelope::Signatures;
use crate::protocol::{Envelope, EventId, EventType, RoomId, ServerName, StateKey, UserId};
use crate::queue::{FanoutJob, QueueName};
use crate::remote::send::send_signed;
use crate::store::attempts;
use crate::store::events::{self, EventStatus, NewEvent};
use crate::store::rooms::{self, HostedRoom, Membership};
use crate::store::{feed, local as txns, StoreError};

/// Checks `Authorization: Bearer <token>` against the configured token.
pub fn authorize(expected: Option<&str>, parts: &Parts, env_var: &str) -> Result<(), ApiError> {
    let Some(expected) = expected else {
        return Err(ApiError::forbidden(format!(
            "this API is disabled: set {env_var} to enable it"
        )));
    };
    match bearer(&parts.headers) {
        Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("the bearer token is not valid")),
        None => Err(ApiError::unauthorized("send Authorization: Bearer <token>")),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn local_user(app: &App, s: &str) -> Result<UserId, ApiError> {
    let u = UserId::parse(s).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if u.domain() != app.cfg.domain() {
        return Err(ApiError::bad_request(format!(
            "{u} is not a local user (local users end in :{})",
            app.cfg.domain()
        )));
    }
    Ok(u)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomBody {
    guild_name: String,
    #[serde(default)]
    default_channel_id: Option<String>,
}

pub async fn put_room(app: &App, raw_room: &str, body: Bytes) -> Result<Response<Body>, ApiError> {
    let room = percent_encoding::percent_decode_str(raw_room)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("room id is not valid UTF-8"))?;
    let room = RoomId::parse(&room).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if room.domain() != app.cfg.domain() {
        return Err(ApiError::bad_request(format!(
            "{room} is not on this server's domain"
        )));
    }
    let b: RoomBody = parse_json(&body)?;
    let hosted = HostedRoom {
        room_id: room.to_string(),
        guild_id: room.guild_id().to_owned(),
        guild_name: b.guild_name,
        default_channel_id: b.default_channel_id,
    };
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    rooms::upsert_hosted(&mut conn, &hosted).await?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::to_value(&hosted).unwrap_or(Value::Null),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitEvent {
    txn_id: String,
    room_id: String,
    event_type: String,
    sender: String,
    content: Value,
    #[serde(default)]
    state_key: Option<String>,
    #[serde(default)]
    event_id: Option<String>,
}

pub async fn submit_event(app: &App, body: Bytes) -> Result<Response<Body>, ApiError> {
    let req: SubmitEvent = parse_json(&body)?;
    if req.txn_id.is_empty() || req.txn_id.len() > 255 {
        return Err(ApiError::bad_request("txn_id must be 1 to 255 bytes"));
    }
    let request_hash = hex::encode(Sha256::digest(&body));
    {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        if let Some(t) = txns::find(&mut conn, &req.txn_id).await? {
            return replay_txn(&t, &request_hash);
        }
    }
    let now = crate::time::now_ms();
    let event_id = match &req.event_id {
        Some(id) => EventId::parse(id).map_err(|e| ApiError::bad_request(e.to_string()))?,
        None => {
            let r: u64 = rand::random();
            EventId::parse(&format!("${r:016x}:{}", app.cfg.domain()))
                .map_err(|e| ApiError::bad_request(e.to_string()))?
        }
    };
    let mut env = Envelope {
        event_id,
        room_id: RoomId::parse(&req.room_id).map_err(|e| ApiError::bad_request(e.to_string()))?,
        event_type: EventType::parse(&req.event_type)
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        sender: local_user(app, &req.sender)?,
        origin_server: app.cfg.server_name.clone(),
        origin_ts: now,
        content: req.content,
        depth: now,
        state_key: req
            .state_key
            .as_deref()
            .map(StateKey::parse)
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        signatures: Signatures::default(),
    };
    env.check_limits()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let key = app.signing_key().await?;
    env.sign(&key);
    let response = serde_json::json!({ "event_id": env.event_id, "origin_ts": env.origin_ts });
    let response_text = response.to_string();

    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    // The transaction row and the event commit together: a 202 remembered for a txn_id
    // always means the event is stored. Of two concurrent requests with one txn_id, one
    // records it; the other answers from its record.
    let (txn_id, event_id) = (req.txn_id.clone(), env.event_id.to_string());
    let stored = conn
        .transaction::<_, StoreError, _>(async |c| {
            if !txns::record(c, &txn_id, &request_hash, &event_id, &response_text).await? {
                return Ok(None);
            }
            let new = [NewEvent {
                envelope: &env,
                received_from: None,
                status: EventStatus::Accepted,
                // We signed it ourselves.
                signature_checked: true,
            }];
            if !events::insert(c, &new).await?[0] {
                return Err(StoreError::Conflict(format!(
                    "event {event_id} already exists"
                )));
            }
            Ok(Some(()))
        })
        .await?;
    if stored.is_none() {
        return match txns::find(&mut conn, &req.txn_id).await? {
            Some(t) => replay_txn(&t, &request_hash),
            None => Err(ApiError::unavailable("the database")),
        };
    }
    if let Err(e) = app
        .queue
        .push(
            QueueName::Fanout,
            &FanoutJob {
                event_ids: vec![env.event_id.to_string()],
            },
        )
        .await
    {
        metrics::counter!("parafed_enqueue_failures_total", "queue" => "fanout").increment(1);
        tracing::warn!(event_id = %env.event_id, error = %e, "fanout job not pushed; the reconciler will");
    }
    Ok(json_response(StatusCode::ACCEPTED, &response))
}

fn replay_txn(t: &txns::Transaction, request_hash: &str) -> Result<Response<Body>, ApiError> {
    if t.request_sha256 != request_hash {
        return Err(ApiError::conflict(
            "txn_id was already used for a different request; use a new txn_id",
        ));
    }
    let v: Value = serde_json::from_str(&t.response).unwrap_or(Value::Null);
    Ok(json_response(StatusCode::ACCEPTED, &v))
}

pub async fn get_feed(app: &App, parts: &Parts) -> Result<Response<Body>, ApiError> {
    let q = parse_query(parts.uri.query().unwrap_or(""))?;
    let int = |name: &str, default: i64| -> Result<i64, ApiError> {
        query_param(&q, name).map_or(Ok(default), |v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("{name} must be an integer")))
        })
    };
    let since = match query_param(&q, "since") {
        None => feed::Position::START,
        Some(s) => feed::Position::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "since must be 0 or a next_since value from an earlier page of the feed",
            )
        })?,
    };
    let limit = int("limit", 100)?.clamp(1, 1000);
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let page = feed::page(&mut conn, since, limit).await?;
    let next = page.last().map_or(since, |(pos, _)| *pos).to_string();
    let events: Vec<Value> = page
        .iter()
        .map(|(pos, ev)| serde_json::json!({ "position": pos.to_string(), "event": ev.envelope }))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "events": events, "next_since": next }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundMembership {
    room_id: String,
    #[serde(alias = "sender")]
    user_id: String,
    #[serde(default)]
    max_age_seconds: Option<i64>,
}

/// `kind` is `invite`, `join` or `leave`.
pub async fn outbound_membership(
    app: &App,
    kind: &'static str,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let req: OutboundMembership = parse_json(&body)?;
    let room = RoomId::parse(&req.room_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let user = local_user(app, &req.user_id)?;
    let host =
        ServerName::parse(room.domain()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if host == app.cfg.server_name {
        return Err(ApiError::bad_request(
            "the room is hosted here; no remote request is needed",
        ));
    }
    // Paracord's struct order for each body.
    let wire = match kind {
        "invite" => serde_json::to_vec(&InviteWire {
            origin_server: app.cfg.server_name.as_str(),
            room_id: room.as_str(),
            sender: user.as_str(),
            max_age_seconds: req.max_age_seconds,
        }),
        _ => serde_json::to_vec(&MemberWire {
            origin_server: app.cfg.server_name.as_str(),
            room_id: room.as_str(),
            user_id: user.as_str(),
        }),
    }
    .unwrap_or_default();
    let key = app.signing_key().await?;
    // The attempt is on record before the request leaves: a crash mid-request still
    // leaves its row (closed as interrupted by the scheduler).
    let attempt_id = {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        attempts::begin_one(&mut conn, host.as_str(), kind, 1).await?
    };
    let started = std::time::Instant::now();
    let result = send_signed(
        &app.client,
        &app.directory,
        &key,
        &app.cfg.server_name,
        &host,
        Method::POST,
        &format!("/{kind}"),
        Bytes::from(wire),
    )
    .await;
    let record = attempt::result_of(result.as_ref(), started.elapsed());
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    attempts::finish(
        &mut conn,
        &[attempts::Finished {
            id: attempt_id,
            status_code: record.status_code,
            error_class: record.error_class,
            latency_ms: record.latency_ms,
            response_excerpt: record.response_excerpt.as_deref(),
        }],
    )
    .await?;
    let answer = result.as_ref().ok().map(|r| {
        serde_json::from_slice::<Value>(&r.body)
            .unwrap_or_else(|_| Value::String(attempt::excerpt(&r.body)))
    });
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            return Err(ApiError::peer_unreachable(format!(
                "could not reach {host}: {e}"
            )))
        }
    };
    if resp.status.is_success() {
        let m = match kind {
            "invite" => Membership::Invited,
            "join" => Membership::Joined,
            _ => Membership::Left,
        };
        rooms::set_member(
            &mut conn,
            room.as_str(),
            user.as_str(),
            app.cfg.server_name.as_str(),
            m,
            None,
        )
        .await?;
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "status": resp.status.as_u16(), "response": answer }),
    ))
}

#[derive(serde::Serialize)]
struct InviteWire<'a> {
    origin_server: &'a str,
    room_id: &'a str,
    sender: &'a str,
    max_age_seconds: Option<i64>,
}

#[derive(serde::Serialize)]
struct MemberWire<'a> {
    origin_server: &'a str,
    room_id: &'a str,
    user_id: &'a str,
}
