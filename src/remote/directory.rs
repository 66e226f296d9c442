//! Where peers are: the federation endpoint and id domain of each server name.
//!
//! A peer under `[peers."name"]` in the config has a fixed base URL (no discovery).
//! Otherwise, with discovery on, `https://<name>/.well-known/paracord/server` is read once
//! and remembered in the `peers` table; with discovery off, unknown peers have no
//! endpoint and cannot federate.
//!
//! Any request names an origin, and a relayed event another, before anything about
//! them is known — so lookups are bounded, or a stream of made-up names would turn this
//! server into a generator of outbound requests: one lookup per name at a time (callers
//! for the same name wait for it), a failure remembered for [`FAILURE_TTL`], at most
//! [`MAX_CONCURRENT`] lookups at once and [`LOOKUPS_PER_MINUTE`] new ones per minute per
//! process; past those bounds a lookup fails at once (the request gets 503 and is
//! retried by its sender).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::http::HttpClient;
use crate::config::Config;
use crate::protocol::discovery::{WellKnown, FEDERATION_PREFIX, WELL_KNOWN_PATH};
use crate::protocol::ServerName;
use crate::store::schema::peers;
use crate::store::PgPool;

/// A peer's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEndpoint {
    /// e.g. `http://127.0.0.1:8449/_paracord/federation/v1` (no trailing slash).
    pub federation_url: String,
    /// The domain its user and room ids use.
    pub domain: String,
}

impl PeerEndpoint {
    /// Full URL of a federation path such as `/keys` or `/event`.
    pub fn url(&self, suffix: &str) -> String {
        format!("{}{}", self.federation_url, suffix)
    }

    /// The path part that gets signed: everything after the authority.
    pub fn signed_path(&self, suffix: &str) -> String {
        let url = self.url(suffix);
        match url
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_owned()))
        {
            Some(p) => p,
            None => suffix.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("{0} is not a known peer and discovery is off")]
    Unknown(ServerName),
    #[error("discovery of {0} failed: {1}")]
    Discovery(ServerName, String),
}

/// How long a failed lookup is remembered.
pub const FAILURE_TTL: Duration = Duration::from_secs(60);
/// Lookups running at once, per process.
pub const MAX_CONCURRENT: usize = 16;
/// New lookups started per minute, per process.
pub const LOOKUPS_PER_MINUTE: u32 = 120;
const MAX_REMEMBERED_FAILURES: usize = 100_000;

/// A fixed-window budget of lookups: `limit` per minute.
#[derive(Debug)]
pub struct Budget {
    window_start: Instant,
    used: u32,
    limit: u32,
}

impl Budget {
    pub fn new(limit: u32, now: Instant) -> Budget {
        Budget {
            window_start: now,
            used: 0,
            limit,
        }
    }

    /// Takes one lookup from the budget; false when this minute's is spent.
    pub fn take(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window_start) >= Duration::from_secs(60) {
            self.window_start = now;
            self.used = 0;
        }
        if self.used >= self.limit {
            return false;
        }
        self.used += 1;
        true
    }
}

pub struct PeerDirectory {
    configured: HashMap<String, PeerEndpoint>,
    discovered: RwLock<HashMap<ServerName, PeerEndpoint>>,
    /// Recent failures: name → (when, why).
    failed: Mutex<HashMap<ServerName, (Instant, String)>>,
    /// One lookup per name at a time.
    lookups: Mutex<HashMap<ServerName, Arc<tokio::sync::Mutex<()>>>>,
    budget: Mutex<Budget>,
    slots: tokio::sync::Semaphore,
    discovery: bool,
    pool: PgPool,
    client: HttpClient,
}

impl PeerDirectory {
    pub fn new(cfg: &Config, pool: PgPool, client: HttpClient) -> Self {
        let configured = cfg
            .peers
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    PeerEndpoint {
                        federation_url: format!(
                            "{}{}",
                            p.base_url.trim_end_matches('/'),
                            FEDERATION_PREFIX
                        ),
                        domain: name.clone(),
                    },
                )
            })
            .collect();
        Self {
            configured,
            discovered: RwLock::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            lookups: Mutex::new(HashMap::new()),
            budget: Mutex::new(Budget::new(LOOKUPS_PER_MINUTE, Instant::now())),
            slots: tokio::sync::Semaphore::new(MAX_CONCURRENT),
            discovery: cfg.federation.discovery,
            pool,
            client,
        }
    }

    /// True when the peer is listed in the configuration.
    pub fn is_configured(&self, name: &ServerName) -> bool {
        self.configured.contains_key(name.as_str())
    }

    /// False when the peer can never be reached: discovery is off and it is not
    /// configured. Its keys are then not looked up at all.
    pub fn may_resolve(&self, name: &ServerName) -> bool {
        self.discovery || self.is_configured(name)
    }

    /// The peer's endpoint: configured, remembered, or discovered now — within the
    /// per-minute budget (for names an unauthenticated request chose).
    pub async fn resolve(&self, name: &ServerName) -> Result<PeerEndpoint, DirectoryError> {
        self.resolve_with(name, true).await
    }

    /// [`resolve`](Self::resolve) for a name that is not an unauthenticated request's
    /// choice (the origin of an event an authenticated peer relayed, a destination):
    /// still one lookup per name and failures remembered, but outside the per-minute
    /// budget, so a flood of made-up names cannot keep real peers from being found.
    pub async fn resolve_trusted(&self, name: &ServerName) -> Result<PeerEndpoint, DirectoryError> {
        self.resolve_with(name, false).await
    }

    async fn resolve_with(
        &self,
        name: &ServerName,
        budgeted: bool,
    ) -> Result<PeerEndpoint, DirectoryError> {
        if let Some(p) = self.configured.get(name.as_str()) {
            return Ok(p.clone());
        }
        if !self.discovery {
            return Err(DirectoryError::Unknown(name.clone()));
        }
        if let Some(p) = self.cached(name)? {
            return Ok(p);
        }
        if let Some(p) = self.load(name).await {
            self.remember(name, &p);
            return Ok(p);
        }
        // One lookup per name: later callers wait for it and take its result.
        let lock = {
            let mut l = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
            l.entry(name.clone()).or_default().clone()
        };
        let result = {
            let _one = lock.lock().await;
            match self.cached(name) {
                Ok(Some(p)) => Ok(p),
                Err(e) => Err(e),
                Ok(None) => self.look_up(name, budgeted).await,
            }
        };
        self.lookups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        result
    }

    /// A remembered endpoint, a remembered failure, or neither.
    fn cached(&self, name: &ServerName) -> Result<Option<PeerEndpoint>, DirectoryError> {
        if let Some(p) = self
            .discovered
            .read()
            .ok()
            .and_then(|m| m.get(name).cloned())
        {
            return Ok(Some(p));
        }
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        match failed.get(name) {
            Some((at, why)) if at.elapsed() < FAILURE_TTL => Err(DirectoryError::Discovery(
                name.clone(),
                format!("{why} (not retried for {} s)", FAILURE_TTL.as_secs()),
            )),
            _ => Ok(None),
        }
    }

    /// Discovers `name` within the process's bounds; remembers a failure.
    async fn look_up(
        &self,
        name: &ServerName,
        budgeted: bool,
    ) -> Result<PeerEndpoint, DirectoryError> {
        let busy = || {
            DirectoryError::Discovery(
                name.clone(),
                "too many peer lookups right now; try again shortly".into(),
            )
        };
        let Ok(_slot) = self.slots.try_acquire() else {
            return Err(busy());
        };
        if budgeted
            && !self
                .budget
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(Instant::now())
        {
            return Err(busy());
        }
        match self.discover(name).await {
            Ok(p) => {
                self.remember(name, &p);
                Ok(p)
            }
            Err(e) => {
                let why = match &e {
                    DirectoryError::Discovery(_, m) => m.clone(),
                    other => other.to_string(),
                };
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                if failed.len() >= MAX_REMEMBERED_FAILURES {
                    failed.retain(|_, (at, _)| at.elapsed() < FAILURE_TTL);
                    if failed.len() >= MAX_REMEMBERED_FAILURES {
                        failed.clear();
                    }
                }
                failed.insert(name.clone(), (Instant::now(), why));
                Err(e)
            }
        }
    }

    fn remember(&self, name: &ServerName, p: &PeerEndpoint) {
        if let Ok(mut m) = self.discovered.write() {
            if m.len() > 100_000 {
                m.clear();
            }
            m.insert(name.clone(), p.clone());
        }
    }

    async fn load(&self, name: &ServerName) -> Option<PeerEndpoint> {
        let mut conn = self.pool.get().await.ok()?;
        let row: Option<(Option<String>, Option<String>)> = peers::table
            .filter(peers::server_name.eq(name.as_str()))
            .select((peers::federation_endpoint, peers::domain))
            .first(&mut conn)
            .await
            .optional()
            .ok()?;
        match row {
            Some((Some(federation_url), domain)) => Some(PeerEndpoint {
                federation_url,
                domain: domain.unwrap_or_else(|| name.to_string()),
            }),
            _ => None,
        }
    }

    async fn discover(&self, name: &ServerName) -> Result<PeerEndpoint, DirectoryError> {
        let base = format!("https://{name}");
        let fail = |m: String| DirectoryError::Discovery(name.clone(), m);
        let resp = self
            .client
            .send(
                http::Method::GET,
                &format!("{base}{WELL_KNOWN_PATH}"),
                &[],
                bytes::Bytes::new(),
                16 * 1024,
            )
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status.is_success() {
            return Err(fail(format!("/.well-known answered {}", resp.status)));
        }
        let wk: WellKnown = serde_json::from_slice(&resp.body).map_err(|e| fail(e.to_string()))?;
        if wk.server_name != *name || !wk.enabled {
            return Err(fail(
                "/.well-known names another server or federation is disabled".into(),
            ));
        }
        let p = PeerEndpoint {
            federation_url: wk.endpoint_url(&base),
            domain: wk.domain.clone(),
        };
        if let Ok(mut conn) = self.pool.get().await {
            let now = Utc::now();
            let _ = diesel::insert_into(peers::table)
                .values((
                    peers::server_name.eq(name.as_str()),
                    peers::base_url.eq(&base),
                    peers::federation_endpoint.eq(&p.federation_url),
                    peers::domain.eq(&p.domain),
                    peers::discovered_at.eq(now),
                ))
                .on_conflict(peers::server_name)
                .do_update()
                .set((
                    peers::federation_endpoint.eq(&p.federation_url),
                    peers::domain.eq(&p.domain),
                    peers::discovered_at.eq(now),
                    peers::updated_at.eq(now),
                ))
                .execute(&mut conn)
                .await;
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lookup_budget_refills_each_minute() {
        let t0 = Instant::now();
        let mut b = Budget::new(3, t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0 + Duration::from_secs(59)));
        assert!(b.take(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn signed_path_is_the_path_after_the_authority() {
        let p = PeerEndpoint {
            federation_url: "http://127.0.0.1:1/peer/_paracord/federation/v1".into(),
            domain: "d".into(),
        };
        assert_eq!(
            p.signed_path("/event"),
            "/peer/_paracord/federation/v1/event"
        );
    }
}
