//! The HTTP ingress: the federation API for peers, the local API for the co-located
//! Paracord app, and the admin API, on one hyper listener; `/metrics` on its own.
//!
//! The router is a plain `match` on method and path: the route set is small and fixed,
//! and a reader sees every endpoint in one place. Handlers are thin and live beside it
//! (`federation.rs`, `local.rs`, `admin.rs`); `error.rs` maps every failure to its status
//! once.

pub mod admin;
pub mod auth;
pub mod error;
pub mod federation;
pub mod intake;
pub mod local;
pub mod request;
pub mod server;

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::app::App;
use crate::protocol::discovery::WELL_KNOWN_PATH;
use error::{ApiError, Body};

const FED: &str = "/_paracord/federation/v1";
const LOCAL: &str = "/_parafed/local/v1";
const ADMIN: &str = "/_parafed/admin/v1";

/// A bounded route label for metrics (never the raw path: peers choose paths).
fn route_label(method: &Method, path: &str) -> &'static str {
    let fed = path.strip_prefix(FED);
    match (method.as_str(), fed) {
        ("POST", Some("/event")) => "fed_post_event",
        ("GET", Some(p)) if p.starts_with("/event/") => "fed_get_event",
        ("GET", Some("/events")) => "fed_get_events",
        ("GET", Some("/keys")) => "fed_keys",
        ("POST", Some("/invite")) => "fed_invite",
        ("POST", Some("/join")) => "fed_join",
        ("POST", Some("/leave")) => "fed_leave",
        _ if path == WELL_KNOWN_PATH => "well_known",
        _ if path.starts_with(LOCAL) => "local",
        _ if path.starts_with(ADMIN) => "admin",
        _ => "other",
    }
}

/// What an ingress process holds: the state every process shares, and what only the
/// ingress needs (the group commit of inbound events).
pub struct Ingress {
    pub app: Arc<App>,
    pub intake: intake::Intake,
}

impl Ingress {
    pub fn new(app: Arc<App>) -> Ingress {
        let intake = intake::Intake::new(app.pool.clone(), app.queue.clone());
        Ingress { app, intake }
    }
}

/// Handles one request; never fails (every error becomes its JSON answer).
pub async fn handle(
    ingress: Arc<Ingress>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let route = route_label(req.method(), req.uri().path());
    let resp = match route_request(&ingress, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let class = match resp.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    ::metrics::counter!("parafed_http_requests_total", "route" => route, "status" => class)
        .increment(1);
    ::metrics::histogram!("parafed_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    Ok(resp)
}

fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

fn no_query(req: &http::request::Parts) -> Result<(), ApiError> {
    if req.uri.query().is_some() {
        return Err(ApiError::bad_request("POST endpoints take no query string"));
    }
    Ok(())
}

async fn route_request(
    ingress: &Ingress,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let app = &*ingress.app;
    let (parts, body) = req.into_parts();
    request::check_headers(&parts.headers)?;
    let path = parts.uri.path().to_owned();
    let method = parts.method.clone();

    if path == WELL_KNOWN_PATH {
        return match method {
            Method::GET => Ok(federation::well_known(app)),
            _ => Err(method_not_allowed()),
        };
    }
    if let Some(rest) = path.strip_prefix(FED) {
        return match (&method, rest) {
            (&Method::GET, "/keys") => federation::keys(app).await,
            (&Method::GET, "/events") => federation::get_events(app, &parts).await,
            (&Method::GET, r) if r.starts_with("/event/") => {
                federation::get_event(app, &parts, &r["/event/".len()..]).await
            }
            (&Method::POST, "/event" | "/invite" | "/join" | "/leave") => {
                no_query(&parts)?;
                request::require_json(&parts.headers)?;
                let bytes = request::read_body(&parts.headers, body).await?;
                match rest {
                    "/event" => federation::post_event(app, &ingress.intake, &parts, bytes).await,
                    "/invite" => federation::invite(app, &parts, bytes).await,
                    "/join" => federation::join(app, &parts, bytes).await,
                    _ => federation::leave(app, &parts, bytes).await,
                }
            }
            (_, "/keys" | "/events" | "/event" | "/invite" | "/join" | "/leave") => {
                Err(method_not_allowed())
            }
            _ => Err(ApiError::not_found("no such federation endpoint")),
        };
    }
    if let Some(rest) = path.strip_prefix(LOCAL) {
        local::authorize(
            app.cfg.local.token.as_deref(),
            &parts,
            "PARAFED_LOCAL_TOKEN",
        )?;
        return match (&method, rest) {
            (&Method::GET, "/feed") => local::get_feed(app, &parts).await,
            (&Method::POST, "/events" | "/invite" | "/join" | "/leave") => {
                request::require_json(&parts.headers)?;
                let bytes = request::read_body(&parts.headers, body).await?;
                match rest {
                    "/events" => local::submit_event(app, bytes).await,
                    "/invite" => local::outbound_membership(app, "invite", bytes).await,
                    "/join" => local::outbound_membership(app, "join", bytes).await,
                    _ => local::outbound_membership(app, "leave", bytes).await,
                }
            }
            (&Method::PUT, r) if r.starts_with("/rooms/") => {
                request::require_json(&parts.headers)?;
                let bytes = request::read_body(&parts.headers, body).await?;
                local::put_room(app, &r["/rooms/".len()..], bytes).await
            }
            _ => Err(ApiError::not_found("no such local API endpoint")),
        };
    }
    if let Some(rest) = path.strip_prefix(ADMIN) {
        local::authorize(
            app.cfg.admin.token.as_deref(),
            &parts,
            "PARAFED_ADMIN_TOKEN",
        )?;
        return admin::route(app, &method, rest, &parts, body).await;
    }
    Err(ApiError::not_found("no such endpoint"))
}
