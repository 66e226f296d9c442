//! Trust and safety, for the operator: each peer's standing (allow, block, quarantine —
//! reason, who, when, optional end), its own limits, its offence counts, its held events
//! and its audit trail; the federation mode. Every change goes through
//! `trust::decisions`, writes an audit row and bumps the fleet's trust version, so every
//! ingress and worker applies it within about a quarter of a second.
//!
//! Effects (PROTOCOL.md leaves these to the receiver):
//! * **block** — its requests are refused (403) before anything is stored; its waiting
//!   deliveries are cancelled (kept, visible as cancelled);
//! * **quarantine** — its events are stored but held (not verified, applied or relayed);
//!   deliveries to it are held;
//! * **release** — ends the quarantine (back to the state it interrupted: allowed, none
//!   or blocked) and processes its held events in storage order; so does an `allow`
//!   of a quarantined peer, and a quarantine's end time (`lift_lapsed`);
//! * **purge** — deletes its held events (counted in the answer and the audit trail);
//! * **allow** — in `allowlist` mode, only allowed peers federate.

use serde::Serialize;

use super::{audit, AdminError, Page};
use crate::app::App;
use crate::config::FederationMode;
use crate::protocol::ServerName;
use crate::queue::{QueueName, VerifyJob};
use crate::store::audit::AuditRow;
use crate::store::{self, events, outbound, StoreError};
use crate::trust::decisions::{self, Decision, NewDecision};
use crate::trust::{offenses, standing_of, Standing};

/// Audit rows `show` includes.
pub const AUDIT_ROWS: i64 = 50;

/// Parses a peer name.
pub fn peer(s: &str) -> Result<ServerName, AdminError> {
    ServerName::parse(s).map_err(|e| AdminError::BadRequest(format!("{s:?}: {e}")))
}

/// Parses a decision filter.
pub fn state(s: &str) -> Result<&str, AdminError> {
    match s {
        "allow" | "block" | "quarantine" | "none" => Ok(s),
        _ => Err(AdminError::BadRequest(format!(
            "unknown peer state {s:?}: allow, block, quarantine or none"
        ))),
    }
}

/// Parses a federation mode.
pub fn mode(s: &str) -> Result<FederationMode, AdminError> {
    match s {
        "open" => Ok(FederationMode::Open),
        "allowlist" => Ok(FederationMode::Allowlist),
        _ => Err(AdminError::BadRequest(format!(
            "unknown federation mode {s:?}: open or allowlist"
        ))),
    }
}

fn standing_name(s: &Standing) -> &'static str {
    match s {
        Standing::Allowed { .. } => "allowed",
        Standing::Quarantined { .. } => "quarantined",
        Standing::Refused { .. } => "refused",
    }
}

/// A peer's limits: its own (`null` when unset) and the ones in force.
#[derive(Debug, Serialize)]
pub struct Limits {
    pub rate_limit_per_minute: u32,
    pub max_in_flight: u32,
    pub own_rate_limit_per_minute: Option<u32>,
    pub own_max_in_flight: Option<u32>,
}

/// Everything about one peer.
#[derive(Debug, Serialize)]
pub struct PeerDetail {
    pub server_name: String,
    /// What its traffic gets now: `allowed`, `quarantined` or `refused`.
    pub standing: &'static str,
    /// The decision and limits row; `null` when nothing was ever set.
    pub decision: Option<Decision>,
    pub mode: FederationMode,
    pub limits: Limits,
    /// Offences in the current windows, by kind (automatic quarantine at the threshold).
    pub offenses: std::collections::BTreeMap<&'static str, u64>,
    pub quarantine_threshold: u32,
    /// Its events held by quarantine.
    pub held_events: i64,
    /// Deliveries to it waiting.
    pub waiting_deliveries: i64,
    /// Its audit trail, newest first.
    pub audit: Vec<AuditRow>,
}

/// The federation mode, and who set it.
#[derive(Debug, Serialize)]
pub struct ModeInfo {
    pub mode: FederationMode,
}

pub async fn list(
    app: &App,
    state: Option<&str>,
    cursor: Option<&str>,
    limit: i64,
) -> Result<Page<Decision>, AdminError> {
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let rows = decisions::list(&mut conn, state, cursor, limit).await?;
    Ok(Page::of(rows, limit, |d| d.server_name.clone()))
}

pub async fn show(app: &App, name: &ServerName) -> Result<PeerDetail, AdminError> {
    let mode = app.trust.mode().await?;
    let counts = offenses::counts(&app.trust, name.as_str()).await?;
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let decision = decisions::get(&mut conn, name.as_str()).await?;
    let standing = standing_of(decision.as_ref(), mode, chrono::Utc::now());
    let held_events = events::held_count(&mut conn, name.as_str()).await?;
    let waiting_deliveries = outbound::waiting_count(&mut conn, name.as_str()).await?;
    let audit = store::audit::for_target(&mut conn, name.as_str(), AUDIT_ROWS).await?;
    let own_rate = decision.as_ref().and_then(Decision::rate_limit);
    let own_cap = decision.as_ref().and_then(Decision::in_flight_cap);
    Ok(PeerDetail {
        server_name: name.to_string(),
        standing: standing_name(&standing),
        mode,
        limits: Limits {
            rate_limit_per_minute: own_rate.unwrap_or(app.cfg.federation.rate_limit_per_minute),
            max_in_flight: own_cap.unwrap_or(app.cfg.federation.max_in_flight_per_peer),
            own_rate_limit_per_minute: own_rate,
            own_max_in_flight: own_cap,
        },
        decision,
        offenses: counts.into_iter().collect(),
        quarantine_threshold: app.cfg.federation.quarantine_threshold,
        held_events,
        waiting_deliveries,
        audit,
    })
}

/// A decision an operator makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Block,
    Quarantine,
}

impl Verdict {
    fn state(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Block => "block",
            Verdict::Quarantine => "quarantine",
        }
    }
}

/// Allows, blocks or quarantines a peer, with a reason and an optional duration.
pub async fn decide(
    app: &App,
    name: &ServerName,
    verdict: Verdict,
    reason: Option<&str>,
    for_secs: Option<u64>,
) -> Result<PeerDetail, AdminError> {
    if *name == app.cfg.server_name {
        return Err(AdminError::BadRequest(
            "that is this server's own name".into(),
        ));
    }
    let until = match for_secs {
        None => None,
        Some(s) => Some(
            i64::try_from(s)
                .ok()
                .and_then(chrono::Duration::try_seconds)
                .and_then(|d| chrono::Utc::now().checked_add_signed(d))
                .ok_or_else(|| {
                    AdminError::BadRequest(format!(
                        "for_secs {s} is too far in the future; leave it out for \"until changed\""
                    ))
                })?,
        ),
    };
    let mut changed = 1;
    let was_quarantined;
    {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        was_quarantined = decisions::get(&mut conn, name.as_str())
            .await?
            .is_some_and(|d| d.state == "quarantine");
        decisions::set(
            &mut conn,
            name.as_str(),
            &NewDecision {
                state: verdict.state(),
                reason,
                until,
                automatic: false,
                set_by: super::actor(app),
                offenses: None,
            },
        )
        .await?;
        if verdict == Verdict::Block {
            let why = format!(
                "cancelled: {name} was blocked by {}{}",
                super::actor(app),
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            );
            changed += outbound::cancel_waiting(&mut conn, name.as_str(), &why).await? as i64;
        }
    }
    let filter = serde_json::json!({ "reason": reason, "for_secs": for_secs });
    audit(
        app,
        &format!("peers.{}", verdict.state()),
        Some(name.as_str()),
        Some(&filter),
        changed,
    )
    .await?;
    app.trust.changed().await?;
    if verdict == Verdict::Allow && was_quarantined {
        // Allowed now: what the quarantine held is processed.
        release_held_events(app, name).await?;
    }
    // The deliver job applies the standing to outbound traffic (hold, release, cancel).
    app.queue.schedule_deliveries(&[name.to_string()]).await?;
    show(app, name).await
}

/// What `release` and `purge` did.
#[derive(Debug, Serialize)]
pub struct HeldResult {
    pub server_name: String,
    /// `release` or `purge`.
    pub action: &'static str,
    /// Held events released (queued for verification, oldest first) or deleted.
    pub count: i64,
    pub peer: PeerDetail,
}

/// Queues the peer's held events for verification, oldest first; returns how many.
async fn release_held_events(app: &App, name: &ServerName) -> Result<i64, AdminError> {
    let released = {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        events::release_held(&mut conn, name.as_str()).await?
    };
    let count = released.len() as i64;
    let jobs = VerifyJob::batches(released);
    app.queue.push_many(QueueName::Verify, &jobs).await?;
    app.queue.schedule_deliveries(&[name.to_string()]).await?;
    Ok(count)
}

/// Ends a quarantine: back to the state it interrupted (`previous_state`; `none` when
/// there was none — in allowlist mode a peer is allowed again only if it was before).
async fn end_quarantine(
    app: &App,
    name: &ServerName,
    set_by: &str,
    reason: &str,
) -> Result<(), AdminError> {
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    if let Some(d) = decisions::get(&mut conn, name.as_str()).await? {
        if d.state == "quarantine" {
            let back = d.previous_state.as_deref().unwrap_or("none");
            decisions::set(
                &mut conn,
                name.as_str(),
                &NewDecision {
                    state: back,
                    reason: Some(reason),
                    until: None,
                    automatic: false,
                    set_by,
                    offenses: None,
                },
            )
            .await?;
        }
    }
    drop(conn);
    // Trust first, so the verify jobs of the released events see the peer released.
    app.trust.changed().await?;
    Ok(())
}

/// Lifts a quarantine and processes the peer's held events in storage order.
pub async fn release(app: &App, name: &ServerName) -> Result<HeldResult, AdminError> {
    end_quarantine(app, name, super::actor(app), "released from quarantine").await?;
    let count = release_held_events(app, name).await?;
    audit(app, "peers.release", Some(name.as_str()), None, count).await?;
    Ok(HeldResult {
        server_name: name.to_string(),
        action: "release",
        count,
        peer: show(app, name).await?,
    })
}

/// Ends the quarantines whose time is up (automatic ones with `quarantine_secs`, and
/// operators' with `--for-secs`), releasing what they held; returns how many. Run by
/// every worker's scheduler.
pub async fn lift_lapsed(app: &App) -> Result<usize, AdminError> {
    let lapsed = {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        decisions::lapsed_quarantines(&mut conn, 100).await?
    };
    for d in &lapsed {
        let Ok(name) = ServerName::parse(&d.server_name) else {
            continue;
        };
        end_quarantine(app, &name, offenses::AUTOMATIC_ACTOR, "quarantine ended").await?;
        let count = release_held_events(app, &name).await?;
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        store::audit::record(
            &mut conn,
            &store::audit::Entry {
                actor: offenses::AUTOMATIC_ACTOR,
                action: "peers.release",
                target: Some(name.as_str()),
                filter: Some(r#"{"reason":"quarantine ended"}"#),
                count,
            },
        )
        .await?;
    }
    Ok(lapsed.len())
}

/// Deletes the peer's held events; the decision stays.
pub async fn purge(app: &App, name: &ServerName) -> Result<HeldResult, AdminError> {
    let count = {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        events::purge_held(&mut conn, name.as_str()).await? as i64
    };
    audit(app, "peers.purge", Some(name.as_str()), None, count).await?;
    Ok(HeldResult {
        server_name: name.to_string(),
        action: "purge",
        count,
        peer: show(app, name).await?,
    })
}

/// Sets (or lifts, with `None`) a peer's own rate limit and in-flight cap.
pub async fn set_limits(
    app: &App,
    name: &ServerName,
    per_minute: Option<u32>,
    in_flight: Option<u32>,
) -> Result<PeerDetail, AdminError> {
    if in_flight == Some(0) {
        return Err(AdminError::BadRequest(
            "in_flight must be at least 1 (block the peer to refuse it)".into(),
        ));
    }
    {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        decisions::set_limits(
            &mut conn,
            name.as_str(),
            per_minute,
            in_flight,
            super::actor(app),
        )
        .await?;
    }
    let filter = serde_json::json!({ "per_minute": per_minute, "in_flight": in_flight });
    audit(
        app,
        "peers.rate-limit",
        Some(name.as_str()),
        Some(&filter),
        1,
    )
    .await?;
    app.trust.changed().await?;
    show(app, name).await
}

/// The federation mode in force.
pub async fn get_mode(app: &App) -> Result<ModeInfo, AdminError> {
    Ok(ModeInfo {
        mode: app.trust.mode().await?,
    })
}

/// Switches the federation mode for the whole fleet, without a restart.
pub async fn set_mode(app: &App, mode: FederationMode) -> Result<ModeInfo, AdminError> {
    {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        decisions::set_mode(&mut conn, mode, super::actor(app)).await?;
    }
    let filter = serde_json::json!({ "mode": mode });
    audit(app, "peers.mode", None, Some(&filter), 1).await?;
    app.trust.changed().await?;
    get_mode(app).await
}
