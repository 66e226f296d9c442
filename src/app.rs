//! The shared state of every parafed process: configuration, the Postgres pool, the Redis
//! connection, the peer client, the key ring and the trust policy. Built once at start,
//! shared (`Arc<App>`) by every request and job. What only one kind of process needs
//! lives there: the ingress's group commit in `ingress::Ingress`, the workers' delivery
//! policy in `parafed_jobs::context::Ctx`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::RwLock;

use crate::config::Config;
use crate::protocol::Keypair;
use crate::queue::{self, JobQueue, Keys, QueueError};
use crate::remote::{HttpClient, KeyRing, PeerDirectory};
use crate::store::{self, PgPool, StoreError};
use crate::trust::{RateLimiter, Trust};

/// How long the active signing key is cached before re-reading it (so a rotation made by
/// `parafed keys rotate` in another process is picked up).
const SIGNING_KEY_TTL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("this server has no active signing key; run `parafed keys generate`")]
    NoSigningKey,
}

pub struct App {
    pub cfg: Config,
    pub pool: PgPool,
    pub redis: ConnectionManager,
    pub keys: Keys,
    pub queue: JobQueue,
    pub client: HttpClient,
    pub directory: Arc<PeerDirectory>,
    pub keyring: KeyRing,
    pub trust: Trust,
    pub limiter: RateLimiter,
    /// Requests in flight per peer in this process (`trust::in_flight`).
    pub in_flight: crate::trust::in_flight::InFlight,
    signing: RwLock<Option<(Instant, Keypair)>>,
    published: RwLock<Option<(Instant, Vec<u8>)>>,
}

impl AsRef<Trust> for App {
    fn as_ref(&self) -> &Trust {
        &self.trust
    }
}

/// The base URLs the operator named (`[peers]`): the federation client reaches their
/// origins wherever they are (`HttpClient::for_federation`).
fn own_hosts(cfg: &Config) -> Vec<String> {
    cfg.peers.values().map(|p| p.base_url.clone()).collect()
}

impl App {
    /// Builds the state. Connections are opened lazily: this succeeds while Postgres or
    /// Redis is down, and requests then answer 503 until they are back.
    pub fn new(cfg: Config) -> Result<Arc<App>, AppError> {
        let pool = store::pool(&cfg.database.url, cfg.database.pool_size)?;
        let redis = queue::connect(&cfg.redis.url)?;
        let keys = Keys::new(&cfg.redis.key_prefix);
        let client = HttpClient::for_federation(
            Duration::from_millis(cfg.delivery.connect_timeout_ms),
            Duration::from_millis(cfg.delivery.request_timeout_ms),
            own_hosts(&cfg),
            cfg.federation.allow_private_addresses,
        );
        let directory = Arc::new(PeerDirectory::new(&cfg, pool.clone(), client.clone()));
        let keyring = KeyRing::new(
            pool.clone(),
            client.clone(),
            directory.clone(),
            Duration::from_millis(cfg.federation.key_refetch_interval_ms),
        );
        let queue = JobQueue::new(redis.clone(), keys.clone());
        Ok(Arc::new(App {
            trust: Trust::new(pool.clone(), redis.clone(), keys.clone(), &cfg),
            limiter: RateLimiter::new(redis.clone(), keys.clone()),
            in_flight: Default::default(),
            queue,
            cfg,
            pool,
            redis,
            keys,
            client,
            directory,
            keyring,
            signing: RwLock::new(None),
            published: RwLock::new(None),
        }))
    }

    /// Our active signing key (cached for a few seconds).
    pub async fn signing_key(&self) -> Result<Keypair, AppError> {
        if let Some((at, k)) = self.signing.read().await.as_ref() {
            if at.elapsed() < SIGNING_KEY_TTL {
                return Ok(k.clone());
            }
        }
        let mut conn = self.pool.get().await.map_err(StoreError::from)?;
        let k = store::keys::active(&mut conn)
            .await?
            .ok_or(AppError::NoSigningKey)?;
        *self.signing.write().await = Some((Instant::now(), k.clone()));
        Ok(k)
    }

    /// The `/keys` document, rebuilt at most once a second (it is unauthenticated, so it
    /// must not cost a query per request).
    pub async fn keys_document(&self) -> Result<Vec<u8>, AppError> {
        if let Some((at, doc)) = self.published.read().await.as_ref() {
            if at.elapsed() < Duration::from_secs(1) {
                return Ok(doc.clone());
            }
        }
        let mut conn = self.pool.get().await.map_err(StoreError::from)?;
        let now = chrono::Utc::now();
        let keys = store::keys::published(&mut conn, now).await?;
        let refresh = now.timestamp_millis() + self.cfg.federation.key_refresh_interval_ms;
        let doc = serde_json::json!({
            "keys": keys.iter().map(|k| serde_json::json!({
                "key_id": k.key_id,
                "public_key": k.public_key,
                "server_name": self.cfg.server_name,
                // "Refetch after": never beyond the end of a retired key's life.
                "valid_until": k.verify_until.map_or(refresh, |u| u.timestamp_millis().min(refresh)),
            })).collect::<Vec<_>>(),
            "server_name": self.cfg.server_name,
        });
        let bytes = serde_json::to_vec(&doc).unwrap_or_default();
        *self.published.write().await = Some((Instant::now(), bytes.clone()));
        Ok(bytes)
    }
}
