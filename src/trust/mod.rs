//! Trust and safety: who may federate with us, and how fast.
//!
//! The ingress asks [`Trust::standing`] about every authenticated origin (and about the
//! `origin_server` of relayed events). The answer comes from the operator's decisions in
//! `peer_trust` (allow / block / quarantine, with an optional end time) and the
//! federation mode (`open`, or `allowlist` where only allowed peers federate). Decisions
//! are cached for a few seconds per process, so a change made by `parafed admin` reaches
//! the whole fleet within that time without a query per request.

pub mod rate_limit;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::config::FederationMode;
use crate::protocol::ServerName;
use crate::store::schema::peer_trust as pt;
use crate::store::{PgPool, StoreError};

pub use rate_limit::RateLimiter;

/// How long a peer's standing is cached per process.
const CACHE_TTL: Duration = Duration::from_secs(5);
const MAX_CACHE_ENTRIES: usize = 100_000;

/// What parafed does with a peer's traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Federates normally. `rate_limit` overrides the default per-minute limit.
    Allowed { rate_limit: Option<u32> },
    /// Events are kept but held: not applied, not relayed; outbound to it pauses.
    Quarantined { rate_limit: Option<u32> },
    /// Refused, with the operator's reason (or the allowlist).
    Refused { reason: String },
}

#[derive(Clone, Debug, Queryable)]
struct TrustRow {
    state: String,
    reason: Option<String>,
    until: Option<DateTime<Utc>>,
    rate_limit_per_minute: Option<i32>,
}

pub struct Trust {
    pool: PgPool,
    mode: FederationMode,
    cache: Mutex<HashMap<ServerName, (Instant, Option<TrustRow>)>>,
}

impl Trust {
    pub fn new(pool: PgPool, mode: FederationMode) -> Self {
        Self {
            pool,
            mode,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn row(&self, peer: &ServerName) -> Result<Option<TrustRow>, StoreError> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, row)) = cache.get(peer) {
                if at.elapsed() < CACHE_TTL {
                    return Ok(row.clone());
                }
            }
        }
        let mut conn = self.pool.get().await?;
        let row: Option<TrustRow> = pt::table
            .filter(pt::server_name.eq(peer.as_str()))
            .select((pt::state, pt::reason, pt::until, pt::rate_limit_per_minute))
            .first(&mut conn)
            .await
            .optional()?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(peer.clone(), (Instant::now(), row.clone()));
        Ok(row)
    }

    /// The peer's standing now.
    pub async fn standing(&self, peer: &ServerName) -> Result<Standing, StoreError> {
        let row = self.row(peer).await?;
        // A decision past its end time no longer applies.
        let row = row.filter(|r| r.until.is_none_or(|u| u > Utc::now()));
        let rate_limit = row
            .as_ref()
            .and_then(|r| r.rate_limit_per_minute)
            .map(|n| u32::try_from(n).unwrap_or(0));
        Ok(match row.as_ref().map(|r| r.state.as_str()) {
            Some("block") => Standing::Refused {
                reason: row.and_then(|r| r.reason).map_or_else(
                    || "blocked by the operator".to_owned(),
                    |r| format!("blocked: {r}"),
                ),
            },
            Some("quarantine") => Standing::Quarantined { rate_limit },
            Some("allow") => Standing::Allowed { rate_limit },
            _ if self.mode == FederationMode::Allowlist => Standing::Refused {
                reason: "this server federates only with allowed peers".into(),
            },
            _ => Standing::Allowed { rate_limit },
        })
    }

    /// Forgets cached standings (after an admin change in this process).
    pub fn invalidate(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
