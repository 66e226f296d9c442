//! Authenticating a federation request, before anything in its body is parsed.
//!
//! Order matters and is cheapest-first: header syntax, clock skew, who the origin is
//! (refusing blocked peers before any key work), its key (possibly fetched, see the key
//! ring's bounds), the ed25519 signature over the bytes received — so a forged request
//! can never occupy a replay slot; for POSTs the replay check, before the peer's rate
//! limit and in-flight cap are charged (on every signed route), so a replay never spends
//! the peer's budget. A bad signature and a replay count towards the peer's automatic
//! quarantine (`trust::offenses`).

use http::{HeaderMap, Method};

use super::error::ApiError;
use super::request::header;
use crate::app::App;
use crate::protocol::transport::{
    TransportHeaders, HEADER_KEY_ID, HEADER_ORIGIN, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use crate::protocol::ServerName;
use crate::trust::offenses::{self, Offense};
use crate::trust::rate_limit::Admission;
use crate::trust::Standing;

/// An authenticated request's origin.
pub struct Authenticated {
    pub origin: ServerName,
    pub transport: TransportHeaders,
    pub standing: Standing,
    /// The request's in-flight slot, released when the handler is done with it.
    _slot: crate::trust::in_flight::Slot,
}

pub async fn authenticate(
    app: &App,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Authenticated, ApiError> {
    let transport = match TransportHeaders::parse(
        header(headers, HEADER_ORIGIN),
        header(headers, HEADER_KEY_ID),
        header(headers, HEADER_TIMESTAMP),
        header(headers, HEADER_SIGNATURE),
    ) {
        Ok(t) => t,
        Err(e) => {
            respelled_replay(app, method, path_and_query, headers).await?;
            return Err(e.into());
        }
    };
    transport.check_skew(crate::time::now_ms(), app.cfg.federation.max_skew_ms)?;
    let origin = transport.origin.clone();
    if origin == app.cfg.server_name {
        return Err(ApiError::forbidden(
            "X-Paracord-Origin names this server; requests from ourselves are refused",
        ));
    }
    let standing = app.trust.standing(&origin).await?;
    if let Standing::Refused { reason } = &standing {
        metrics::counter!("parafed_ingress_refused_total", "reason" => "untrusted").increment(1);
        return Err(ApiError::forbidden(format!(
            "{origin} may not federate here: {reason}"
        )));
    }
    let key = app.keyring.key(&origin, &transport.key_id).await?;
    if let Err(e) = transport.verify(&key, method.as_str(), path_and_query, body) {
        // The peer may have re-keyed under the same key id (Paracord always signs as
        // `ed25519:auto`): fetch its keys again (throttled) and check once more.
        let rekeyed = app.keyring.refresh(&origin).await
            && app
                .keyring
                .key_if_cached(&origin, &transport.key_id)
                .filter(|k| *k != key)
                .is_some_and(|k| {
                    transport
                        .verify(&k, method.as_str(), path_and_query, body)
                        .is_ok()
                });
        if !rekeyed {
            metrics::counter!("parafed_ingress_refused_total", "reason" => "bad_signature")
                .increment(1);
            crate::telemetry::signature_checked("transport", false);
            offenses::record(&app.trust, &origin, Offense::BadTransportSignature).await;
            return Err(e.into());
        }
    }
    crate::telemetry::signature_checked("transport", true);
    // A replay is refused before it is charged to the peer's limits: whoever replays a
    // peer's request must not spend that peer's budget.
    if method == Method::POST {
        refuse_replay(app, &origin, &transport, method, path_and_query).await?;
    }
    let (own_rate, own_cap) = app.trust.limits(&origin).await?;
    let slot = app
        .in_flight
        .enter(
            origin.as_str(),
            own_cap.unwrap_or(app.cfg.federation.max_in_flight_per_peer),
        )
        .ok_or_else(|| {
            metrics::counter!("parafed_ingress_refused_total", "reason" => "in_flight")
                .increment(1);
            ApiError::too_many_in_flight()
        })?;
    let per_minute = own_rate.unwrap_or(app.cfg.federation.rate_limit_per_minute);
    if let Admission::Limited { retry_after_ms } =
        app.limiter.admit(origin.as_str(), per_minute).await?
    {
        metrics::counter!("parafed_ingress_refused_total", "reason" => "rate_limited").increment(1);
        return Err(ApiError::rate_limited(retry_after_ms.div_ceil(1000)));
    }
    Ok(Authenticated {
        origin,
        transport,
        standing,
        _slot: slot,
    })
}

/// Refuses an exact replay of a signed request (409), fleet-wide through Redis. The
/// identity is over the decoded signature bytes, so re-spelling the hex cannot evade it;
/// entries live for twice the skew window, after which the timestamp alone refuses it.
async fn refuse_replay(
    app: &App,
    origin: &ServerName,
    transport: &TransportHeaders,
    method: &Method,
    path_and_query: &str,
) -> Result<(), ApiError> {
    let id = transport.replay_id(method.as_str(), path_and_query);
    let ttl_ms = (app.cfg.federation.max_skew_ms.max(1) as u64) * 2;
    let mut conn = app.redis.clone();
    let fresh: Option<String> = redis::cmd("SET")
        .arg(app.keys.replay(&id))
        .arg(1)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms)
        .query_async(&mut conn)
        .await
        .map_err(|e| ApiError::from(crate::queue::QueueError::from(e)))?;
    if fresh.is_none() {
        metrics::counter!("parafed_ingress_refused_total", "reason" => "replay").increment(1);
        offenses::record(&app.trust, origin, Offense::Replay).await;
        return Err(ApiError::conflict(
            "this signed request was already received; sign it again with a fresh timestamp",
        ));
    }
    Ok(())
}

/// A signature header in another spelling (upper- or mixed-case hex) is refused whatever
/// happens; when its bytes are those of a request already received, the answer says so
/// (409) rather than blaming the header, so a sender sees the replay for what it is.
async fn respelled_replay(
    app: &App,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let Some(sig) = header(headers, HEADER_SIGNATURE) else {
        return Ok(());
    };
    let lower = sig.trim().to_ascii_lowercase();
    if lower == sig.trim() {
        return Ok(());
    }
    let Ok(t) = TransportHeaders::parse(
        header(headers, HEADER_ORIGIN),
        header(headers, HEADER_KEY_ID),
        header(headers, HEADER_TIMESTAMP),
        Some(&lower),
    ) else {
        return Ok(());
    };
    let id = t.replay_id(method.as_str(), path_and_query);
    let mut conn = app.redis.clone();
    let seen: bool = redis::cmd("EXISTS")
        .arg(app.keys.replay(&id))
        .query_async(&mut conn)
        .await
        .unwrap_or(false);
    if seen {
        metrics::counter!("parafed_ingress_refused_total", "reason" => "replay").increment(1);
        return Err(ApiError::conflict(
            "this signed request was already received (its signature differs only in letter case)",
        ));
    }
    Ok(())
}
