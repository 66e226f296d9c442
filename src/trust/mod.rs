//! Trust and safety: who may federate with us, how fast, and what happens to a peer that
//! misbehaves.
//!
//! The ingress asks [`Trust::standing`] about every authenticated origin (and about the
//! `origin_server` of relayed events); the deliver job asks about each destination. The
//! answer comes from the operator's decision about the peer in `peer_trust` — `allow`,
//! `block` or `quarantine`, with a reason, who, when and an optional end — and from the
//! federation mode (`open`, or `allowlist` where only allowed peers federate), which an
//! operator can switch without a restart (`trust_settings`, falling back to the
//! configuration).
//!
//! Standings are cached per process and invalidated fleet-wide: every change bumps a
//! version key in Redis (`<prefix>:trust-version`), which each process reads every
//! [`WATCH_EVERY`] ([`Trust::watch`]); a process whose cached version is behind drops its
//! cache. So a change made by `parafed admin peers …` on any ingress reaches every
//! ingress and worker within about a quarter of a second, at the cost of one `GET` per
//! process per tick, not one query per request. If Redis cannot be read the cache still
//! expires after [`CACHE_TTL`].
//!
//! * [`decisions`] — reading and writing decisions and settings (one save path, each
//!   change audited);
//! * [`offenses`] — counting a peer's offences and quarantining it automatically;
//! * [`in_flight`] — the per-peer cap on concurrent requests;
//! * [`rate_limit`] — per-peer rate limits shared by the fleet.

pub mod decisions;
pub mod in_flight;
pub mod offenses;
pub mod rate_limit;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use redis::aio::ConnectionManager;

use crate::config::{Config, FederationMode};
use crate::protocol::ServerName;
use crate::queue::Keys;
use crate::store::{PgPool, StoreError};

pub use decisions::Decision;
pub use rate_limit::RateLimiter;

/// How long a cached standing is trusted when no version change says otherwise.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// How often each process reads the trust version.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);
const MAX_CACHE_ENTRIES: usize = 100_000;

/// What parafed does with a peer's traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Federates normally. `rate_limit` overrides the default per-minute limit.
    Allowed { rate_limit: Option<u32> },
    /// Events are kept but held: not verified, applied or relayed until an operator
    /// releases them; outbound to it is held.
    Quarantined { rate_limit: Option<u32> },
    /// Refused, with the operator's reason (or the allowlist).
    Refused { reason: String },
}

/// A cached read: the peer's decision (if any), when it was read, and the trust
/// version it was read at.
type Cached = (Instant, u64, Option<Decision>);

/// The automatic quarantine's settings (`[federation] quarantine_*`).
#[derive(Clone, Copy, Debug)]
struct QuarantineRule {
    threshold: u32,
    window_secs: u64,
    quarantine_secs: u64,
}

pub struct Trust {
    pool: PgPool,
    redis: ConnectionManager,
    keys: Keys,
    /// Our own name: never a peer to judge.
    server_name: ServerName,
    rule: QuarantineRule,
    /// The configured mode, used until an operator sets one.
    configured_mode: FederationMode,
    /// The fleet's trust version as last read from Redis.
    version: AtomicU64,
    cache: Mutex<HashMap<ServerName, Cached>>,
    mode: Mutex<Option<(Instant, u64, FederationMode)>>,
}

impl Trust {
    pub fn new(pool: PgPool, redis: ConnectionManager, keys: Keys, cfg: &Config) -> Self {
        Self {
            pool,
            redis,
            keys,
            server_name: cfg.server_name.clone(),
            rule: QuarantineRule {
                threshold: cfg.federation.quarantine_threshold,
                window_secs: cfg.federation.quarantine_window_secs,
                quarantine_secs: cfg.federation.quarantine_secs,
            },
            configured_mode: cfg.federation.mode,
            version: AtomicU64::new(0),
            cache: Mutex::new(HashMap::new()),
            mode: Mutex::new(None),
        }
    }

    fn current_version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    fn fresh(&self, at: Instant, version: u64) -> bool {
        at.elapsed() < CACHE_TTL && version == self.current_version()
    }

    async fn decision(&self, peer: &ServerName) -> Result<Option<Decision>, StoreError> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, v, d)) = cache.get(peer) {
                if self.fresh(*at, *v) {
                    return Ok(d.clone());
                }
            }
        }
        let version = self.current_version();
        let mut conn = self.pool.get().await?;
        let d = decisions::get(&mut conn, peer.as_str()).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(peer.clone(), (Instant::now(), version, d.clone()));
        Ok(d)
    }

    /// The federation mode in force: the operator's (`parafed admin peers mode`), else
    /// the configured one.
    pub async fn mode(&self) -> Result<FederationMode, StoreError> {
        if let Some((at, v, m)) = *self.mode.lock().unwrap_or_else(|p| p.into_inner()) {
            if self.fresh(at, v) {
                return Ok(m);
            }
        }
        let version = self.current_version();
        let mut conn = self.pool.get().await?;
        let m = decisions::mode(&mut conn)
            .await?
            .unwrap_or(self.configured_mode);
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), version, m));
        Ok(m)
    }

    /// The peer's standing now.
    pub async fn standing(&self, peer: &ServerName) -> Result<Standing, StoreError> {
        let d = self.decision(peer).await?;
        let mode = self.mode().await?;
        Ok(standing_of(d.as_ref(), mode, Utc::now()))
    }

    /// The peer's own limits (rate per minute, in-flight requests), when set.
    pub async fn limits(
        &self,
        peer: &ServerName,
    ) -> Result<(Option<u32>, Option<u32>), StoreError> {
        let d = self.decision(peer).await?;
        Ok(d.map_or((None, None), |d| (d.rate_limit(), d.in_flight_cap())))
    }

    /// Drops this process's cached standings.
    pub fn invalidate(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Tells the fleet that trust changed: bumps the version key (every process drops
    /// its cache within [`WATCH_EVERY`]) and drops this process's cache now.
    pub async fn changed(&self) -> Result<(), crate::queue::QueueError> {
        let mut c = self.redis.clone();
        let v: u64 = redis::cmd("INCR")
            .arg(self.keys.trust_version())
            .query_async(&mut c)
            .await?;
        self.version.store(v, Ordering::Relaxed);
        self.invalidate();
        Ok(())
    }

    /// Reads the version once; drops the cache when it moved.
    pub async fn refresh_version(&self) {
        let mut c = self.redis.clone();
        let v: Result<Option<u64>, _> = redis::cmd("GET")
            .arg(self.keys.trust_version())
            .query_async(&mut c)
            .await;
        match v {
            Ok(v) => {
                let v = v.unwrap_or(0);
                if self.version.swap(v, Ordering::Relaxed) != v {
                    self.invalidate();
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading the trust version failed"),
        }
    }

    /// Keeps this process's view of trust current (spawn it with whatever holds the
    /// `Trust`; it runs until aborted).
    pub async fn watch<H: AsRef<Trust>>(holder: std::sync::Arc<H>) {
        loop {
            (*holder).as_ref().refresh_version().await;
            tokio::time::sleep(WATCH_EVERY).await;
        }
    }
}

/// The standing a decision gives in a mode, at `now` — the rule, apart from any I/O.
/// A decision past its end time no longer applies; `none` holds only limits.
pub fn standing_of(
    d: Option<&Decision>,
    mode: FederationMode,
    now: chrono::DateTime<Utc>,
) -> Standing {
    let live = d.filter(|d| d.until.is_none_or(|u| u > now));
    let rate_limit = d.and_then(Decision::rate_limit);
    match live.map(|d| d.state.as_str()) {
        Some("block") => Standing::Refused {
            reason: live.and_then(|d| d.reason.clone()).map_or_else(
                || "blocked by the operator".to_owned(),
                |r| format!("blocked: {r}"),
            ),
        },
        // In allowlist mode a quarantine holds only a peer that was allowed; others are
        // refused as the mode says.
        Some("quarantine")
            if mode == FederationMode::Allowlist
                && live.and_then(|d| d.previous_state.as_deref()) != Some("allow") =>
        {
            Standing::Refused {
                reason: "this server federates only with allowed peers (federation mode allowlist)"
                    .into(),
            }
        }
        Some("quarantine") => Standing::Quarantined { rate_limit },
        Some("allow") => Standing::Allowed { rate_limit },
        _ if mode == FederationMode::Allowlist => Standing::Refused {
            reason: "this server federates only with allowed peers (federation mode allowlist)"
                .into(),
        },
        _ => Standing::Allowed { rate_limit },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(state: &str, until: Option<i64>) -> Decision {
        Decision {
            server_name: "peer.test".into(),
            state: state.into(),
            reason: Some("r".into()),
            until: until.map(|s| chrono::DateTime::from_timestamp(s, 0).unwrap()),
            rate_limit_per_minute: Some(10),
            max_in_flight: None,
            automatic: false,
            set_by: None,
            offenses: None,
            updated_at: chrono::DateTime::from_timestamp(0, 0).unwrap(),
            previous_state: Some("allow".into()),
        }
    }

    #[test]
    fn standings_by_decision_mode_and_time() {
        use FederationMode::{Allowlist, Open};
        let now = chrono::DateTime::from_timestamp(1000, 0).unwrap();
        let allowed = Standing::Allowed {
            rate_limit: Some(10),
        };
        let cases = [
            (None, Open, Standing::Allowed { rate_limit: None }),
            (Some(d("none", None)), Open, allowed.clone()),
            (Some(d("allow", None)), Allowlist, allowed.clone()),
            (
                Some(d("quarantine", None)),
                Open,
                Standing::Quarantined {
                    rate_limit: Some(10),
                },
            ),
            (Some(d("quarantine", Some(999))), Open, allowed.clone()),
            (
                Some(d("block", Some(2000))),
                Open,
                Standing::Refused {
                    reason: "blocked: r".into(),
                },
            ),
            (Some(d("block", Some(999))), Open, allowed.clone()),
        ];
        for (dec, mode, want) in cases {
            assert_eq!(
                standing_of(dec.as_ref(), mode, now),
                want,
                "{dec:?} {mode:?}"
            );
        }
        let mut never_allowed = d("quarantine", None);
        never_allowed.previous_state = Some("none".into());
        for dec in [
            None,
            Some(d("none", None)),
            Some(d("allow", Some(999))),
            Some(never_allowed),
        ] {
            assert!(
                matches!(
                    standing_of(dec.as_ref(), Allowlist, now),
                    Standing::Refused { .. }
                ),
                "{dec:?}"
            );
        }
    }
}
