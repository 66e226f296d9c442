//! Peers' public keys: memory, then Postgres (`federation_server_keys`), then the peer's
//! `/keys`.
//!
//! Fetching is what an attacker would like to provoke: every request naming an unknown
//! key id could otherwise make parafed call out. So fetches are
//! * single-flight per peer — concurrent lookups for one peer wait for one fetch;
//! * throttled per peer — at most one fetch per `key_refetch_interval` (default 30 s),
//!   whatever key ids are asked for, successful or not (the negative cache);
//! * bounded overall — at most `MAX_CONCURRENT_FETCHES` at once.
//!
//! `valid_until` means "refetch after", not expiry (PROTOCOL.md): a key past it triggers
//! a refetch, and stays usable if the refetch fails or the peer still lists it.
//!
//! Keys follow what the peer publishes (PROTOCOL.md "Identity and keys"): a signature
//! that fails against a cached key may mean the peer re-keyed under the same id (Paracord
//! always signs as `ed25519:auto`), so callers [`KeyRing::refresh`] (throttled as above)
//! and check once more; after a successful fetch, keys the peer no longer lists stop
//! verifying (they are kept only while the peer cannot be reached); and when a peer's
//! keys cannot be fetched because it is unreachable, a lookup says so
//! ([`KeyLookupError::Unreachable`], a 503 at the HTTP edge) instead of "unknown key"
//! (a 403, which a Paracord sender treats as final).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;
use tokio::sync::Semaphore;

use super::directory::PeerDirectory;
use super::http::HttpClient;
use crate::protocol::discovery::{KeysDocument, MAX_PUBLISHED_KEYS};
use crate::protocol::{KeyId, PublicKey, ServerName};
use crate::store::schema::federation_server_keys as fsk;
use crate::store::PgPool;

/// Most `/keys` fetches in flight at once, across all peers.
pub const MAX_CONCURRENT_FETCHES: usize = 16;
/// Largest `/keys` document read.
const MAX_KEYS_BODY: usize = 64 * 1024;
/// Peers remembered by the throttle before it forgets the oldest entries.
const MAX_THROTTLE_ENTRIES: usize = 100_000;
/// Peers whose keys are held in memory; past it, some are dropped (Postgres still has
/// them). Only peers with at least one key are held, so made-up origin names cost a
/// database lookup each, never memory.
const MAX_CACHED_SERVERS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyLookupError {
    /// The peer does not (or did not, within the refetch interval) publish this key.
    #[error("{server} has no key {key_id}")]
    UnknownKey { server: ServerName, key_id: KeyId },
    /// The database could not be read.
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// The peer's `/keys` could not be fetched (it is down or unreachable) and no key
    /// under this id is known: try again later.
    #[error("cannot fetch the keys of {server} right now: {reason}")]
    Unreachable { server: ServerName, reason: String },
}

/// Why a `/keys` fetch failed.
#[derive(Debug)]
enum FetchError {
    /// No usable answer: connection, timeout, 5xx, discovery.
    Unreachable(String),
    /// An answer that is not a keys document for this peer.
    Invalid(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Unreachable(m) | FetchError::Invalid(m) => f.write_str(m),
        }
    }
}

/// The last fetch of a peer's keys: when, and why it failed if it did because the peer
/// could not be reached.
struct FetchRecord {
    at: Instant,
    unreachable: Option<String>,
}

#[derive(Clone, Copy)]
struct CachedKey {
    key: PublicKey,
    valid_until: i64,
}

#[derive(Default)]
struct ServerKeys {
    keys: HashMap<KeyId, CachedKey>,
    /// Loaded from Postgres already (so a miss means "not stored").
    loaded: bool,
}

pub struct KeyRing {
    pool: PgPool,
    client: HttpClient,
    directory: Arc<PeerDirectory>,
    refetch_interval: Duration,
    cache: Mutex<HashMap<ServerName, ServerKeys>>,
    last_fetch: Mutex<HashMap<ServerName, FetchRecord>>,
    flights: Mutex<HashMap<ServerName, Arc<tokio::sync::Mutex<()>>>>,
    fetch_permits: Semaphore,
    fetches: AtomicU64,
}

impl KeyRing {
    pub fn new(
        pool: PgPool,
        client: HttpClient,
        directory: Arc<PeerDirectory>,
        refetch_interval: Duration,
    ) -> Self {
        Self {
            pool,
            client,
            directory,
            refetch_interval,
            cache: Mutex::new(HashMap::new()),
            last_fetch: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            fetch_permits: Semaphore::new(MAX_CONCURRENT_FETCHES),
            fetches: AtomicU64::new(0),
        }
    }

    /// `/keys` fetches started by this process (for tests and metrics).
    pub fn fetch_count(&self) -> u64 {
        AtomicU64::load(&self.fetches, Ordering::Relaxed)
    }

    fn cached(&self, server: &ServerName, key_id: &KeyId) -> (Option<CachedKey>, bool) {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(server) {
            Some(s) => (s.keys.get(key_id).copied(), s.loaded),
            None => (None, false),
        }
    }

    /// The public key `server` signs with under `key_id`.
    pub async fn key(
        &self,
        server: &ServerName,
        key_id: &KeyId,
    ) -> Result<PublicKey, KeyLookupError> {
        // With discovery off only configured peers federate: a made-up origin costs
        // neither a query nor a slot in the fetch throttle.
        if !self.directory.may_resolve(server) {
            return Err(KeyLookupError::UnknownKey {
                server: server.clone(),
                key_id: key_id.clone(),
            });
        }
        let now_ms = crate::time::now_ms();
        let (hit, loaded) = self.cached(server, key_id);
        if let Some(k) = hit {
            if k.valid_until > now_ms {
                return Ok(k.key);
            }
            // Past valid_until: refetch (throttled), keep the key if the peer still lists
            // it or cannot be reached.
            self.refetch(server).await;
            return Ok(self.cached(server, key_id).0.map_or(k.key, |k| k.key));
        }
        if !loaded {
            self.load(server).await?;
            if let (Some(k), _) = self.cached(server, key_id) {
                if k.valid_until > now_ms {
                    return Ok(k.key);
                }
                self.refetch(server).await;
                return Ok(self.cached(server, key_id).0.map_or(k.key, |k| k.key));
            }
        }
        self.refetch(server).await;
        if let Some(k) = self.cached(server, key_id).0 {
            return Ok(k.key);
        }
        match self.last_unreachable(server) {
            Some(reason) => Err(KeyLookupError::Unreachable {
                server: server.clone(),
                reason,
            }),
            None => Err(KeyLookupError::UnknownKey {
                server: server.clone(),
                key_id: key_id.clone(),
            }),
        }
    }

    /// Fetches the peer's keys again after a signature failed against a cached key
    /// (within the refetch throttle). True when a fetch happened now and succeeded: the
    /// caller then checks the signature once more.
    pub async fn refresh(&self, server: &ServerName) -> bool {
        self.refetch(server).await == Some(true)
    }

    /// Why the last fetch of `server`'s keys failed, if it failed because the peer could
    /// not be reached. (Lookups of a missing key fetch again whenever the throttle
    /// allows, so the last fetch is at most one refetch interval old.)
    fn last_unreachable(&self, server: &ServerName) -> Option<String> {
        let last = self.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
        last.get(server).and_then(|r| r.unreachable.clone())
    }

    /// The key if it is known without any I/O (memory only).
    pub fn key_if_cached(&self, server: &ServerName, key_id: &KeyId) -> Option<PublicKey> {
        self.cached(server, key_id).0.map(|k| k.key)
    }

    async fn load(&self, server: &ServerName) -> Result<(), KeyLookupError> {
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| KeyLookupError::Unavailable(e.to_string()))?;
        let rows: Vec<(String, String, i64)> = fsk::table
            .filter(fsk::server_name.eq(server.as_str()))
            .select((fsk::key_id, fsk::public_key, fsk::valid_until))
            .load(&mut conn)
            .await
            .map_err(|e| KeyLookupError::Unavailable(e.to_string()))?;
        let keys: Vec<(KeyId, CachedKey)> = rows
            .into_iter()
            .filter_map(|(kid, pk, valid_until)| {
                let key = PublicKey::from_hex(&pk).ok()?;
                Some((KeyId::parse(&kid).ok()?, CachedKey { key, valid_until }))
            })
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entry_bounded(&mut cache, server, MAX_CACHED_SERVERS);
        for (kid, k) in keys {
            entry.keys.entry(kid).or_insert(k);
        }
        entry.loaded = true;
        Ok(())
    }

    /// True (and the slot taken) when `server` may be fetched now.
    fn take_fetch_slot(&self, server: &ServerName) -> bool {
        let mut last = self.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(r) = last.get(server) {
            if now.duration_since(r.at) < self.refetch_interval {
                return false;
            }
        }
        if last.len() >= MAX_THROTTLE_ENTRIES {
            let horizon = self.refetch_interval;
            last.retain(|_, r| now.duration_since(r.at) < horizon);
        }
        last.insert(
            server.clone(),
            FetchRecord {
                at: now,
                unreachable: None,
            },
        );
        true
    }

    fn record_unreachable(&self, server: &ServerName, reason: Option<String>) {
        let mut last = self.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = last.get_mut(server) {
            r.unreachable = reason;
        }
    }

    /// Fetches the peer's `/keys` unless another task is doing it or it was fetched within
    /// the refetch interval. `None` when no fetch happened (throttled); else whether it
    /// succeeded. Failures are logged and remembered (an unreachable peer's lookups say
    /// so), not returned: the caller then simply does not find the key.
    async fn refetch(&self, server: &ServerName) -> Option<bool> {
        let flight = {
            let mut f = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            f.entry(server.clone()).or_default().clone()
        };
        let guard = flight.lock().await;
        // Whoever held the flight before us may have fetched already: the throttle says.
        let outcome = if self.take_fetch_slot(server) {
            match self.fetch(server).await {
                Ok(()) => Some(true),
                Err(e) => {
                    tracing::info!(peer = %server, error = %e, "fetching peer keys failed");
                    if let FetchError::Unreachable(reason) = e {
                        self.record_unreachable(server, Some(reason));
                    }
                    Some(false)
                }
            }
        } else {
            None
        };
        drop(guard);
        let mut f = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&flight) <= 2 {
            f.remove(server);
        }
        outcome
    }

    async fn fetch(&self, server: &ServerName) -> Result<(), FetchError> {
        let unreachable = |e: String| FetchError::Unreachable(e);
        let invalid = |e: String| FetchError::Invalid(e);
        let _permit = self
            .fetch_permits
            .acquire()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("parafed_key_fetches_total").increment(1);
        let endpoint = self
            .directory
            .resolve(server)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = self
            .client
            .send(
                http::Method::GET,
                &endpoint.url("/keys"),
                &[],
                bytes::Bytes::new(),
                MAX_KEYS_BODY,
            )
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        if resp.status.is_server_error() {
            return Err(unreachable(format!("/keys answered {}", resp.status)));
        }
        if !resp.status.is_success() {
            return Err(invalid(format!("/keys answered {}", resp.status)));
        }
        let doc: KeysDocument =
            serde_json::from_slice(&resp.body).map_err(|e| invalid(e.to_string()))?;
        if doc.server_name != *server {
            return Err(invalid(format!(
                "/keys is for {}, not {server}",
                doc.server_name
            )));
        }
        let keys: Vec<(KeyId, PublicKey, i64)> = doc
            .keys
            .iter()
            .filter(|k| k.server_name == *server)
            .take(MAX_PUBLISHED_KEYS)
            .filter_map(|k| Some((k.key_id.clone(), k.public_key().ok()?, k.valid_until)))
            .collect();
        // What the peer publishes now is what verifies: a key it no longer lists stops
        // verifying (it is kept only while the peer cannot be reached).
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if keys.is_empty() {
                cache.remove(server);
            } else {
                let entry = entry_bounded(&mut cache, server, MAX_CACHED_SERVERS);
                entry.keys = keys
                    .iter()
                    .map(|(kid, key, valid_until)| {
                        (
                            kid.clone(),
                            CachedKey {
                                key: *key,
                                valid_until: *valid_until,
                            },
                        )
                    })
                    .collect();
                entry.loaded = true;
            }
        }
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let listed: Vec<&str> = keys.iter().map(|(kid, _, _)| kid.as_str()).collect();
        diesel::delete(
            fsk::table
                .filter(fsk::server_name.eq(server.as_str()))
                .filter(fsk::key_id.ne_all(&listed)),
        )
        .execute(&mut conn)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
        let now = Utc::now();
        let rows: Vec<_> = keys
            .iter()
            .map(|(kid, key, valid_until)| {
                (
                    fsk::server_name.eq(server.as_str()),
                    fsk::key_id.eq(kid.as_str()),
                    fsk::public_key.eq(key.to_hex()),
                    fsk::valid_until.eq(*valid_until),
                    fsk::fetched_at.eq(now),
                )
            })
            .collect();
        if !rows.is_empty() {
            diesel::insert_into(fsk::table)
                .values(&rows)
                .on_conflict((fsk::server_name, fsk::key_id))
                .do_update()
                .set((
                    fsk::public_key.eq(excluded(fsk::public_key)),
                    fsk::valid_until.eq(excluded(fsk::valid_until)),
                    fsk::fetched_at.eq(excluded(fsk::fetched_at)),
                ))
                .execute(&mut conn)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        }
        Ok(())
    }
}

/// The cache entry for `server`, making room first when the map is full: the map never
/// holds more than `max` servers, whatever names peers make up.
fn entry_bounded<'a>(
    cache: &'a mut HashMap<ServerName, ServerKeys>,
    server: &ServerName,
    max: usize,
) -> &'a mut ServerKeys {
    if !cache.contains_key(server) && cache.len() >= max {
        // Which entries go does not matter for correctness (Postgres holds every key);
        // dropping a tenth at a time keeps this rare.
        let drop: Vec<ServerName> = cache.keys().take(max.div_ceil(10)).cloned().collect();
        for name in drop {
            cache.remove(&name);
        }
    }
    cache.entry(server.clone()).or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_cache_never_holds_more_than_its_bound() {
        let mut cache = HashMap::new();
        for i in 0..1000 {
            let name = ServerName::parse(&format!("s{i}.test")).unwrap();
            entry_bounded(&mut cache, &name, 100).loaded = true;
            assert!(cache.len() <= 100, "{} entries after {i}", cache.len());
            assert!(cache.contains_key(&name), "the new entry is kept");
        }
    }
}
