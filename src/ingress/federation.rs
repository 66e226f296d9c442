//! The federation API peers call: discovery documents, events, and membership.
//!
//! Handlers are thin: authenticate (auth.rs), parse into domain types, call the store,
//! answer in Paracord's shapes. Statuses follow Paracord v0.8.5 except where PROTOCOL.md
//! marks parafed stricter.

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Response, StatusCode};
use serde::Deserialize;

use super::auth::{authenticate, Authenticated};
use super::error::{json_bytes_response, json_response, ApiError, Body};
use super::request::{parse_query, query_param};
use crate::app::App;
use crate::protocol::discovery::{FEDERATION_PREFIX, PROTOCOL_VERSION};
use crate::protocol::envelope::SignatureError;
use crate::protocol::{Envelope, EventId, RoomId, ServerName, UserId};
use crate::store::events::{self, EventStatus};
use crate::store::rooms::{self, Membership};
use crate::trust::offenses::{self, Offense};
use crate::trust::Standing;

pub fn well_known(app: &App) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "domain": app.cfg.domain(),
            "enabled": true,
            "federation_endpoint": FEDERATION_PREFIX,
            "server_name": app.cfg.server_name,
            "version": PROTOCOL_VERSION,
        }),
    )
}

pub async fn keys(app: &App) -> Result<Response<Body>, ApiError> {
    let doc = app.keys_document().await.map_err(|e| match e {
        crate::app::AppError::Store(s) => ApiError::from(s),
        other => {
            tracing::error!(error = %other, "cannot publish keys");
            ApiError::unavailable("the key store")
        }
    })?;
    Ok(json_bytes_response(StatusCode::OK, doc))
}

/// The path as the client sent it, query included: what the transport signature covers.
pub fn signed_path(parts: &Parts) -> String {
    parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned())
}

/// The origin's id domain, when we know where it is.
async fn origin_domain(app: &App, origin: &ServerName) -> Option<String> {
    app.directory.resolve(origin).await.ok().map(|p| p.domain)
}

/// Verifies the envelope signature now when the origin's keys can be had; a relayed
/// event whose origin's keys cannot be fetched right now is left to the verify job.
/// Returns whether the signature was checked (and held).
async fn check_envelope_signature(
    app: &App,
    env: &Envelope,
    relayed: bool,
) -> Result<bool, ApiError> {
    let ids = env.signing_key_ids();
    if ids.is_empty() {
        return Err(ApiError::unauthorized(SignatureError::Missing.to_string()));
    }
    for kid in ids.iter().take(4) {
        if app.keyring.key_if_cached(&env.origin_server, kid).is_none() {
            // Bounded by the key ring's single-flight and refetch throttle.
            let _ = app.keyring.key(&env.origin_server, kid).await;
        }
    }
    let mut verdict = env.verify(|k| app.keyring.key_if_cached(&env.origin_server, k));
    if matches!(verdict, Err(SignatureError::Invalid))
        && app.keyring.refresh(&env.origin_server).await
    {
        // The origin may have re-keyed under the same key id: check once more.
        verdict = env.verify(|k| app.keyring.key_if_cached(&env.origin_server, k));
    }
    if !matches!(verdict, Err(SignatureError::UnknownKey) if relayed) {
        crate::telemetry::signature_checked("envelope", verdict.is_ok());
    }
    match verdict {
        Ok(_) => Ok(true),
        Err(SignatureError::UnknownKey) if relayed => Ok(false),
        Err(SignatureError::Missing) => {
            Err(ApiError::unauthorized(SignatureError::Missing.to_string()))
        }
        Err(e) => Err(ApiError::forbidden(e.to_string())),
    }
}

pub async fn post_event(
    app: &App,
    intake: &super::intake::Intake,
    parts: &Parts,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let path = signed_path(parts);
    let auth = authenticate(app, &Method::POST, &path, &parts.headers, &body).await?;

    let env = Envelope::from_wire(&body)?;
    let relayed = env.origin_server != auth.origin;
    if env.origin_server == app.cfg.server_name {
        return Err(ApiError::forbidden(
            "origin_server names this server; peers cannot send our own events back",
        ));
    }
    // Only a room's host relays (protocol::relay), checked before anything is stored.
    let relayer_domain = if relayed {
        origin_domain(app, &auth.origin).await
    } else {
        None
    };
    if let Err(e) = crate::protocol::relay::check(
        &auth.origin,
        relayer_domain.as_deref(),
        &env.origin_server,
        &env.room_id,
        app.cfg.domain(),
    ) {
        offenses::record(&app.trust, &auth.origin, Offense::ForgedRelay).await;
        return Err(ApiError::forbidden(e.to_string()));
    }
    let mut held = matches!(auth.standing, Standing::Quarantined { .. });
    if relayed {
        match app.trust.standing(&env.origin_server).await? {
            Standing::Refused { reason } => {
                return Err(ApiError::forbidden(format!(
                    "events from {} are not accepted: {reason}",
                    env.origin_server
                )))
            }
            Standing::Quarantined { .. } => held = true,
            Standing::Allowed { .. } => {}
        }
    }
    let domain = origin_domain(app, &env.origin_server).await;
    if !env.sender_belongs_to_origin(domain.as_deref()) {
        return Err(ApiError::forbidden(format!(
            "sender {} is not a user of origin_server {}",
            env.sender, env.origin_server
        )));
    }
    let signature_checked = match check_envelope_signature(app, &env, relayed).await {
        Ok(checked) => checked,
        Err(e) => {
            if e.status == StatusCode::FORBIDDEN {
                offenses::record(&app.trust, &auth.origin, Offense::BadEnvelopeSignature).await;
            }
            return Err(e);
        }
    };

    let status = if held {
        EventStatus::Held
    } else {
        EventStatus::Pending
    };
    // Stored (and its verify job pushed) by the intake's group commit, with the other
    // events arriving now.
    let event_id = env.event_id.clone();
    let inserted = intake
        .store(env, auth.origin.clone(), status, signature_checked)
        .await?;
    metrics::counter!("parafed_events_received_total", "result" => if inserted { "stored" } else { "duplicate" })
        .increment(1);
    Ok(json_response(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "event_id": event_id, "inserted": inserted }),
    ))
}

/// The envelope as Paracord's GET answers it: keys sorted at every level.
fn sorted_envelope(env: &Envelope) -> serde_json::Value {
    serde_json::to_value(env).unwrap_or(serde_json::Value::Null)
}

pub async fn get_event(app: &App, parts: &Parts, raw_id: &str) -> Result<Response<Body>, ApiError> {
    let path = signed_path(parts);
    // Held to the end: the request counts against the peer's in-flight cap until then.
    let _auth = authenticate(app, &Method::GET, &path, &parts.headers, b"").await?;
    let id = percent_encoding::percent_decode_str(raw_id)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("event id is not valid UTF-8"))?;
    let id = EventId::parse(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut conn = app
        .pool
        .get()
        .await
        .map_err(crate::store::StoreError::from)?;
    match events::get_readable(&mut conn, id.as_str()).await? {
        Some(ev) => Ok(json_response(
            StatusCode::OK,
            &sorted_envelope(&ev.envelope),
        )),
        None => Err(ApiError::not_found(format!("no event {id} here"))),
    }
}

pub async fn get_events(app: &App, parts: &Parts) -> Result<Response<Body>, ApiError> {
    let path = signed_path(parts);
    // Held to the end: the request counts against the peer's in-flight cap until then.
    let _auth = authenticate(app, &Method::GET, &path, &parts.headers, b"").await?;
    let q = parse_query(parts.uri.query().unwrap_or(""))?;
    let room = query_param(&q, "room_id")
        .ok_or_else(|| ApiError::bad_request("query parameter room_id is required"))?;
    let room = RoomId::parse(room).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let int = |name: &str, default: i64| -> Result<i64, ApiError> {
        query_param(&q, name).map_or(Ok(default), |v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("{name} must be an integer")))
        })
    };
    let since = int("since_depth", 0)?.max(0);
    let limit = int("limit", 100)?.clamp(1, 1000);
    let mut conn = app
        .pool
        .get()
        .await
        .map_err(crate::store::StoreError::from)?;
    let evs = events::room_since(&mut conn, room.as_str(), since, limit).await?;
    let list: Vec<_> = evs.iter().map(|e| sorted_envelope(&e.envelope)).collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "events": list }),
    ))
}

#[derive(Deserialize)]
struct InviteBody {
    origin_server: String,
    room_id: String,
    sender: String,
    #[serde(default)]
    max_age_seconds: Option<i64>,
}

#[derive(Deserialize)]
struct MemberBody {
    origin_server: String,
    room_id: String,
    user_id: String,
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => {
                ApiError::unprocessable(format!("body does not have the expected shape: {e}"))
            }
            _ => ApiError::bad_request(format!("body is not valid JSON: {e}")),
        }
    })
}

/// Checks shared by invite, join and leave: the body's origin is the transport origin,
/// the room is hosted here and registered, the user belongs to the origin. Returns the
/// room, the user and the connection the handler goes on with.
async fn membership_request(
    app: &App,
    auth: &Authenticated,
    origin_server: &str,
    room_id: &str,
    user_id: &str,
) -> Result<(rooms::HostedRoom, UserId, crate::store::PgConn), ApiError> {
    if origin_server != auth.origin.as_str() {
        return Err(ApiError::forbidden(format!(
            "origin_server {origin_server:?} is not the authenticated origin {}",
            auth.origin
        )));
    }
    if matches!(auth.standing, Standing::Quarantined { .. }) {
        return Err(ApiError::forbidden(format!(
            "{} is quarantined here",
            auth.origin
        )));
    }
    let room = RoomId::parse(room_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !room.domain().eq_ignore_ascii_case(app.cfg.domain()) {
        return Err(ApiError::bad_request(format!(
            "room {room} is not hosted by this server ({})",
            app.cfg.domain()
        )));
    }
    let canonical = format!("!{}:{}", room.guild_id(), app.cfg.domain());
    let user = UserId::parse(user_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let domain = origin_domain(app, &auth.origin).await;
    if user.domain() != auth.origin.as_str() && Some(user.domain()) != domain.as_deref() {
        return Err(ApiError::forbidden(format!(
            "{user} is not a user of {}; a server speaks only for its own users",
            auth.origin
        )));
    }
    let mut conn = app
        .pool
        .get()
        .await
        .map_err(crate::store::StoreError::from)?;
    let hosted = rooms::hosted(&mut conn, &canonical)
        .await?
        .ok_or_else(|| ApiError::forbidden(format!("room {canonical} does not federate")))?;
    Ok((hosted, user, conn))
}

async fn authenticated_post(
    app: &App,
    parts: &Parts,
    body: &[u8],
) -> Result<Authenticated, ApiError> {
    let path = signed_path(parts);
    authenticate(app, &Method::POST, &path, &parts.headers, body).await
}

pub async fn invite(app: &App, parts: &Parts, body: Bytes) -> Result<Response<Body>, ApiError> {
    let auth = authenticated_post(app, parts, &body).await?;
    let b: InviteBody = parse_body(&body)?;
    let (room, user, mut conn) =
        membership_request(app, &auth, &b.origin_server, &b.room_id, &b.sender).await?;
    let expires = b.max_age_seconds.unwrap_or(3600).clamp(60, 7 * 24 * 3600);
    if rooms::membership(&mut conn, &room.room_id, user.as_str())
        .await?
        .as_deref()
        != Some("joined")
    {
        rooms::set_member(
            &mut conn,
            &room.room_id,
            user.as_str(),
            auth.origin.as_str(),
            Membership::Invited,
            None,
        )
        .await?;
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "accepted": true,
            "default_channel_id": room.default_channel_id,
            "expires_in_seconds": expires,
            "guild_id": room.guild_id,
            "guild_name": room.guild_name,
            "join_endpoint": format!("{FEDERATION_PREFIX}/join"),
            "room_id": room.room_id,
        }),
    ))
}

pub async fn join(app: &App, parts: &Parts, body: Bytes) -> Result<Response<Body>, ApiError> {
    let auth = authenticated_post(app, parts, &body).await?;
    let b: MemberBody = parse_body(&body)?;
    let (room, user, mut conn) =
        membership_request(app, &auth, &b.origin_server, &b.room_id, &b.user_id).await?;
    rooms::set_member(
        &mut conn,
        &room.room_id,
        user.as_str(),
        auth.origin.as_str(),
        Membership::Joined,
        None,
    )
    .await?;
    rooms::refresh_room_server(&mut conn, &room.room_id, auth.origin.as_str()).await?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "guild_id": room.guild_id,
            "joined": true,
            "local_user_id": user,
            "room_id": room.room_id,
        }),
    ))
}

pub async fn leave(app: &App, parts: &Parts, body: Bytes) -> Result<Response<Body>, ApiError> {
    let auth = authenticated_post(app, parts, &body).await?;
    let b: MemberBody = parse_body(&body)?;
    let (room, user, mut conn) =
        membership_request(app, &auth, &b.origin_server, &b.room_id, &b.user_id).await?;
    let was = rooms::membership(&mut conn, &room.room_id, user.as_str()).await?;
    let left = matches!(was.as_deref(), Some("joined") | Some("invited"));
    if left {
        rooms::set_member(
            &mut conn,
            &room.room_id,
            user.as_str(),
            auth.origin.as_str(),
            Membership::Left,
            None,
        )
        .await?;
        rooms::refresh_room_server(&mut conn, &room.room_id, auth.origin.as_str()).await?;
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "guild_id": room.guild_id, "left": left, "room_id": room.room_id }),
    ))
}
