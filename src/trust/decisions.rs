//! The operator's decisions about peers (`peer_trust`) and the fleet-wide federation mode
//! (`trust_settings`): read and written only here. Callers (the admin operations, the
//! automatic quarantine) audit each change and then call `Trust::changed` so the fleet
//! sees it.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::config::FederationMode;
use crate::store::schema::{peer_trust as pt, trust_settings as ts};
use crate::store::StoreError;

/// A peer's row: its decision and its own limits.
#[derive(Clone, Debug, PartialEq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = pt, check_for_backend(diesel::pg::Pg))]
pub struct Decision {
    pub server_name: String,
    /// `allow`, `block`, `quarantine`, or `none` (no decision; only limits).
    pub state: String,
    pub reason: Option<String>,
    /// The decision lapses at this time (`null`: until changed).
    pub until: Option<DateTime<Utc>>,
    /// Requests per minute across the fleet; `null` = `federation.rate_limit_per_minute`.
    pub rate_limit_per_minute: Option<i32>,
    /// Requests in flight at once per ingress process; `null` =
    /// `federation.max_in_flight_per_peer`.
    pub max_in_flight: Option<i32>,
    /// Set by the automatic quarantine rather than an operator.
    pub automatic: bool,
    /// Who decided: the admin token's name, or `parafed` (automatic).
    pub set_by: Option<String>,
    /// An automatic quarantine's offence counts, as JSON.
    pub offenses: Option<String>,
    pub updated_at: DateTime<Utc>,
    /// While quarantined: the state the peer returns to when the quarantine ends.
    pub previous_state: Option<String>,
}

impl Decision {
    /// The peer's own rate limit, when set.
    pub fn rate_limit(&self) -> Option<u32> {
        self.rate_limit_per_minute
            .and_then(|n| u32::try_from(n).ok())
    }

    /// The peer's own in-flight cap, when set.
    pub fn in_flight_cap(&self) -> Option<u32> {
        self.max_in_flight.and_then(|n| u32::try_from(n).ok())
    }
}

/// A peer's row, if it has one.
pub async fn get(conn: &mut AsyncPgConnection, peer: &str) -> Result<Option<Decision>, StoreError> {
    Ok(pt::table
        .filter(pt::server_name.eq(peer))
        .select(Decision::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// Peers in name order after `after`, in `state` when given.
pub async fn list(
    conn: &mut AsyncPgConnection,
    state: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Decision>, StoreError> {
    let mut q = pt::table.select(Decision::as_select()).into_boxed();
    if let Some(s) = state {
        q = q.filter(pt::state.eq(s.to_owned()));
    }
    if let Some(a) = after {
        q = q.filter(pt::server_name.gt(a.to_owned()));
    }
    Ok(q.order(pt::server_name.asc())
        .limit(limit)
        .load(conn)
        .await?)
}

/// A decision about to be saved.
pub struct NewDecision<'a> {
    pub state: &'a str,
    pub reason: Option<&'a str>,
    pub until: Option<DateTime<Utc>>,
    pub automatic: bool,
    pub set_by: &'a str,
    pub offenses: Option<&'a str>,
}

/// Saves a decision (the peer's limits are kept). A quarantine remembers the state it
/// interrupts (`previous_state`: a quarantine ends back in `allow`, `none` or `block`).
pub async fn set(
    conn: &mut AsyncPgConnection,
    peer: &str,
    d: &NewDecision<'_>,
) -> Result<Decision, StoreError> {
    let now = Utc::now();
    let current = get(conn, peer).await?;
    let previous: Option<String> = match (d.state, &current) {
        ("quarantine", Some(c)) if c.state == "quarantine" => c.previous_state.clone(),
        ("quarantine", Some(c)) if c.until.is_some_and(|u| u <= now) => Some("none".into()),
        ("quarantine", Some(c)) => Some(c.state.clone()),
        ("quarantine", None) => Some("none".into()),
        _ => None,
    };
    Ok(diesel::insert_into(pt::table)
        .values((
            pt::server_name.eq(peer),
            pt::state.eq(d.state),
            pt::reason.eq(d.reason),
            pt::until.eq(d.until),
            pt::automatic.eq(d.automatic),
            pt::set_by.eq(d.set_by),
            pt::offenses.eq(d.offenses),
            pt::previous_state.eq(&previous),
            pt::updated_at.eq(now),
        ))
        .on_conflict(pt::server_name)
        .do_update()
        .set((
            pt::state.eq(d.state),
            pt::reason.eq(d.reason),
            pt::until.eq(d.until),
            pt::automatic.eq(d.automatic),
            pt::set_by.eq(d.set_by),
            pt::offenses.eq(d.offenses),
            pt::previous_state.eq(&previous),
            pt::updated_at.eq(now),
        ))
        .returning(Decision::as_returning())
        .get_result(conn)
        .await?)
}

/// Peers whose quarantine has lapsed (`until` passed), at most `limit`.
pub async fn lapsed_quarantines(
    conn: &mut AsyncPgConnection,
    limit: i64,
) -> Result<Vec<Decision>, StoreError> {
    Ok(pt::table
        .filter(pt::state.eq("quarantine"))
        .filter(pt::until.le(Utc::now()))
        .select(Decision::as_select())
        .order(pt::server_name.asc())
        .limit(limit)
        .load(conn)
        .await?)
}

/// Sets (or with `None` lifts) a peer's own limits, keeping its decision.
pub async fn set_limits(
    conn: &mut AsyncPgConnection,
    peer: &str,
    rate_limit_per_minute: Option<u32>,
    max_in_flight: Option<u32>,
    set_by: &str,
) -> Result<Decision, StoreError> {
    let to_i32 = |v: Option<u32>| v.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    let now = Utc::now();
    Ok(diesel::insert_into(pt::table)
        .values((
            pt::server_name.eq(peer),
            pt::state.eq("none"),
            pt::rate_limit_per_minute.eq(to_i32(rate_limit_per_minute)),
            pt::max_in_flight.eq(to_i32(max_in_flight)),
            pt::set_by.eq(set_by),
            pt::updated_at.eq(now),
        ))
        .on_conflict(pt::server_name)
        .do_update()
        .set((
            pt::rate_limit_per_minute.eq(to_i32(rate_limit_per_minute)),
            pt::max_in_flight.eq(to_i32(max_in_flight)),
            pt::updated_at.eq(now),
        ))
        .returning(Decision::as_returning())
        .get_result(conn)
        .await?)
}

const MODE: &str = "federation_mode";

/// The mode an operator set, if any.
pub async fn mode(conn: &mut AsyncPgConnection) -> Result<Option<FederationMode>, StoreError> {
    let v: Option<String> = ts::table
        .filter(ts::name.eq(MODE))
        .select(ts::value)
        .first(conn)
        .await
        .optional()?;
    Ok(v.and_then(|v| match v.as_str() {
        "open" => Some(FederationMode::Open),
        "allowlist" => Some(FederationMode::Allowlist),
        _ => None,
    }))
}

/// Sets the federation mode for the fleet.
pub async fn set_mode(
    conn: &mut AsyncPgConnection,
    mode: FederationMode,
    set_by: &str,
) -> Result<(), StoreError> {
    let v = match mode {
        FederationMode::Open => "open",
        FederationMode::Allowlist => "allowlist",
    };
    diesel::insert_into(ts::table)
        .values((ts::name.eq(MODE), ts::value.eq(v), ts::set_by.eq(set_by)))
        .on_conflict(ts::name)
        .do_update()
        .set((
            ts::value.eq(v),
            ts::set_by.eq(set_by),
            ts::updated_at.eq(Utc::now()),
        ))
        .execute(conn)
        .await?;
    Ok(())
}
