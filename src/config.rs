//! Configuration: a TOML file, then `PARAFED_<SECTION>_<KEY>` environment overrides.
//!
//! One `Config` serves `parafed` and `parafed-worker` alike. It is parsed, not validated
//! afterwards: addresses are `SocketAddr`s, the server name is a `ServerName`, the mode is
//! an enum, and unknown keys (in the file or the environment) are errors that name the
//! key, because a misspelt setting that is silently ignored is an outage waiting to happen.
//!
//! Secrets (the local and admin API tokens) come from the environment only
//! (`PARAFED_LOCAL_TOKEN`, `PARAFED_ADMIN_TOKEN`); a token written in the file is refused.
//! `Config::redacted` gives the effective configuration with secrets masked, for
//! `parafed config check` and logs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::protocol::ServerName;

/// Why configuration could not be loaded. Every message names the file, key or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("unknown environment setting {var}: no setting [{section}] {key} exists (settings are PARAFED_<SECTION>_<KEY>)")]
    UnknownEnv {
        var: String,
        section: String,
        key: String,
    },
    #[error("{0} is a secret: set it with the environment variable {1}, not in the config file")]
    SecretInFile(&'static str, &'static str),
}

/// Which peers may federate with us.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FederationMode {
    /// Every peer that authenticates, unless blocked.
    #[default]
    Open,
    /// Only peers explicitly allowed.
    Allowlist,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our server name, as peers know us.
    pub server_name: ServerName,
    /// The domain our user and room ids use, when it differs from `server_name`.
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    #[serde(default)]
    pub federation: FederationConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub worker: WorkerConfig,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub local: TokenConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// Peers with fixed addresses (skips `/.well-known` discovery).
    #[serde(default)]
    pub peers: BTreeMap<String, PeerConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Federation, local and admin APIs.
    pub listen: SocketAddr,
    /// `/metrics` for Prometheus.
    pub metrics_listen: SocketAddr,
    /// Public base URL peers reach us at (for `/.well-known`); derived from `listen` if unset.
    pub public_base_url: Option<String>,
    /// PEM certificate chain and key: serve HTTPS directly (without a reverse proxy).
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Connections open at once; more wait in the accept backlog.
    pub max_connections: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8448)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9448)),
            public_base_url: None,
            tls_cert: None,
            tls_key: None,
            max_connections: 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/db`.
    pub url: String,
    #[serde(default = "defaults::pool_size", deserialize_with = "flex::u32")]
    pub pool_size: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key parafed writes, so deployments can share a Redis.
    #[serde(default = "defaults::key_prefix")]
    pub key_prefix: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    pub mode: FederationMode,
    /// Largest accepted |now − X-Paracord-Timestamp|.
    #[serde(deserialize_with = "flex::i64")]
    pub max_skew_ms: i64,
    /// How long a published key stays valid in our `/keys` answers (peers refetch after).
    #[serde(deserialize_with = "flex::i64")]
    pub key_refresh_interval_ms: i64,
    /// Find peers that are not under `[peers]` through `https://<name>/.well-known`.
    /// Off: only configured peers can federate (private fleets, tests).
    pub discovery: bool,
    /// Let requests to peers that are not under `[peers]` reach loopback, private,
    /// link-local and other non-public addresses (`remote::address`). Off: a peer's
    /// name or `/.well-known` document cannot point this server's requests into its
    /// own network (server-side request forgery); a peer of your own network goes
    /// under `[peers]`. On only for a private federation that uses discovery over its
    /// own DNS.
    pub allow_private_addresses: bool,
    /// Requests per minute from one peer on every signed federation route, across the
    /// ingress fleet (0 = no limit).
    /// A peer's own limit (`parafed admin peers rate-limit`) overrides it.
    #[serde(deserialize_with = "flex::u32")]
    pub rate_limit_per_minute: u32,
    /// Least time between two fetches of one peer's `/keys`, however many unknown key
    /// ids it is sent (a flood of bad key ids costs at most one fetch per interval).
    #[serde(deserialize_with = "flex::u64")]
    pub key_refetch_interval_ms: u64,
    /// Requests of one peer in flight at once, per ingress process (a peer's own cap,
    /// `parafed admin peers rate-limit --in-flight`, overrides it).
    #[serde(deserialize_with = "flex::u32")]
    pub max_in_flight_per_peer: u32,
    /// Offences of one kind within `quarantine_window_secs` after which a peer is
    /// quarantined automatically (0 = never).
    #[serde(deserialize_with = "flex::u32")]
    pub quarantine_threshold: u32,
    #[serde(deserialize_with = "flex::u64")]
    pub quarantine_window_secs: u64,
    /// How long an automatic quarantine lasts (0 = until an operator releases it).
    #[serde(deserialize_with = "flex::u64")]
    pub quarantine_secs: u64,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            mode: FederationMode::Open,
            max_skew_ms: crate::protocol::transport::DEFAULT_MAX_SKEW_MS,
            key_refresh_interval_ms: 24 * 3600 * 1000,
            discovery: true,
            allow_private_addresses: false,
            rate_limit_per_minute: 6000,
            key_refetch_interval_ms: 30_000,
            max_in_flight_per_peer: 256,
            quarantine_threshold: 50,
            quarantine_window_secs: 60,
            quarantine_secs: 3600,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// First backoff step after a transient failure.
    #[serde(deserialize_with = "flex::u64")]
    pub backoff_base_ms: u64,
    /// Largest backoff.
    #[serde(deserialize_with = "flex::u64")]
    pub backoff_cap_ms: u64,
    /// Outbound rows older than this become dead.
    #[serde(deserialize_with = "flex::u64")]
    pub max_age_secs: u64,
    /// Requests in flight to one destination at most (1 to 256, the HTTP client's idle
    /// connections per peer: each request of a window reuses a kept-alive connection).
    /// Default 128: one busy destination drains about 10 % faster than at 64 (5 009–5 273
    /// against 4 374–4 731 deliveries/s, docs/performance.md, eighteenth round), and each
    /// busy destination keeps up to this many connections alive, about 30 KB of the
    /// worker's memory each (16 busy destinations: 86–89 MB at 128, 67 MB at 64).
    #[serde(deserialize_with = "flex::u32")]
    pub window: u32,
    #[serde(deserialize_with = "flex::u64")]
    pub connect_timeout_ms: u64,
    #[serde(deserialize_with = "flex::u64")]
    pub request_timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            backoff_base_ms: 2_000,
            backoff_cap_ms: 3_600_000,
            max_age_secs: 24 * 3600,
            window: 128,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 30_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// The worker process's own `/metrics` listener.
    pub metrics_listen: SocketAddr,
    /// Queues this process runs; empty means all.
    pub queues: Vec<String>,
    /// Verify and fanout jobs one process runs at once, per queue. Jobs that queue up
    /// meanwhile are read together and run as one (up to 256 events), so a small
    /// number keeps batches large under load: at a steady 500 events/s, 2 runs at once
    /// cost 20 % less Postgres CPU per event than 16 one-event runs competing for the
    /// same cores, and end-to-end p99 fell from ≈200 ms to ≈35 ms (docs/performance.md).
    /// A run waits for the slowest origin key lookup among its events.
    #[serde(deserialize_with = "flex::u32")]
    pub concurrency: u32,
    /// Deliver jobs (destination drains) one process runs at once. A drain spends its
    /// time waiting on a peer, holding no database connection meanwhile, and a peer that
    /// never answers holds its drain for `delivery.request_timeout_ms`: with fewer
    /// drains than such peers, the healthy ones would wait behind them (measured:
    /// docs/performance.md, isolation).
    #[serde(deserialize_with = "flex::u32")]
    pub deliver_concurrency: u32,
    /// Drains of destinations that have not answered yet (new to us, or whose backoff
    /// just ended) that may run at once, besides `deliver_concurrency`: such a drain
    /// runs in the background with a probe permit rather than a job slot, since a peer
    /// that never answers holds its drain for `delivery.request_timeout_ms`, and a room
    /// with hundreds of those must not leave the peers that answer without a slot
    /// (docs/performance.md, isolation). Each holds a connection (a file descriptor).
    #[serde(deserialize_with = "flex::u32")]
    pub probe_concurrency: u32,
    /// Delivery requests one process's drains have in flight at once, all destinations
    /// together (at least `delivery.window`): without it a worker's worst case is
    /// `deliver_concurrency` × `delivery.window` requests at once (8 192 at the
    /// defaults), each a socket in use and its buffers, and as many requests landing on
    /// the peers together. A round waits for its requests' share before its attempts
    /// are begun. It bounds requests, not the connections a destination keeps alive
    /// between rounds (up to `delivery.window` each). Probes, and the drains of
    /// destinations being probed, are bounded by `probe_concurrency` instead.
    #[serde(deserialize_with = "flex::u32")]
    pub max_requests_in_flight: u32,
    /// How often each worker looks for destinations whose backoff ended.
    #[serde(deserialize_with = "flex::u64")]
    pub scheduler_interval_ms: u64,
    /// How often each worker looks for work Redis lost (see docs/operations.md).
    #[serde(deserialize_with = "flex::u64")]
    pub reconcile_interval_ms: u64,
    /// Unfinished work whose job was pushed longer ago than this is pushed again.
    #[serde(deserialize_with = "flex::u64")]
    pub stale_after_ms: u64,
    /// A job running (or abandoned) longer than this is given to another worker.
    #[serde(deserialize_with = "flex::u64")]
    pub job_timeout_ms: u64,
    /// Delivery attempts, finished (delivered or dead) outbound rows and local API
    /// transactions older than this are pruned.
    #[serde(deserialize_with = "flex::u64")]
    pub retention_secs: u64,
    /// How often each worker refreshes the fleet-wide gauges (queue depths, destination
    /// states, backlog); Prometheus scrapes every 15 s by default.
    #[serde(deserialize_with = "flex::u64")]
    pub gauges_interval_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9449)),
            queues: Vec::new(),
            concurrency: 2,
            deliver_concurrency: 64,
            probe_concurrency: 1024,
            max_requests_in_flight: 1024,
            scheduler_interval_ms: 1_000,
            reconcile_interval_ms: 10_000,
            stale_after_ms: 30_000,
            job_timeout_ms: 120_000,
            retention_secs: 7 * 24 * 3600,
            gauges_interval_ms: 15_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// How long a retired key stays published and usable for verification.
    #[serde(deserialize_with = "flex::u64")]
    pub retired_key_retention_secs: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            retired_key_retention_secs: 7 * 24 * 3600,
        }
    }
}

/// A bearer token section; the token itself only ever comes from the environment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    pub token: Option<String>,
}

/// The admin API's bearer token (environment only) and the name the audit trail records
/// for whoever uses it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub token: Option<String>,
    /// Who holds the token, as `parafed admin audit list` shows it.
    pub token_name: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token: None,
            token_name: "admin".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// e.g. `http://127.0.0.1:8449`.
    pub base_url: String,
}

mod defaults {
    pub fn pool_size() -> u32 {
        16
    }
    pub fn key_prefix() -> String {
        "parafed".into()
    }
}

/// Numbers that may arrive as TOML numbers (the file) or as strings (the environment).
mod flex {
    use serde::{de::Error, Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(i64),
        Str(String),
    }

    fn parse<'de, D: Deserializer<'de>, T: TryFrom<i64> + std::str::FromStr>(
        d: D,
    ) -> Result<T, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => {
                T::try_from(n).map_err(|_| D::Error::custom(format!("{n} is out of range")))
            }
            NumOrStr::Str(s) => s
                .trim()
                .parse()
                .map_err(|_| D::Error::custom(format!("{s:?} is not a valid number"))),
        }
    }

    pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        parse(d)
    }
    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        parse(d)
    }
    pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        parse(d)
    }
}

/// Sections that take `PARAFED_<SECTION>_<KEY>` overrides. `peers` is not among them:
/// peer names hold dots, which environment names cannot; configure peers in the file.
const SECTIONS: &[&str] = &[
    "http",
    "database",
    "redis",
    "federation",
    "delivery",
    "worker",
    "keys",
    "local",
    "admin",
];
const TOP_LEVEL: &[&str] = &["server_name", "domain"];
/// `PARAFED_*` variables that are not settings.
/// (`PARAFED_ADMIN_URL` is the `parafed admin` command's, so an operator's shell can
/// export it next to a running server's settings.)
const NOT_SETTINGS: &[&str] = &[
    "PARAFED_CONFIG",
    "PARAFED_LOG",
    "PARAFED_LOG_FORMAT",
    "PARAFED_ADMIN_URL",
];

/// Settings whose environment value is a boolean.
const BOOLEANS: &[&str] = &["federation.discovery", "federation.allow_private_addresses"];

impl Config {
    /// Loads `path` (if any) and applies the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Loads `path` (if any) and applies the given `PARAFED_*` variables.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (text, shown) = read_file(path)?;
        Self::from_toml_and_env(&text, &shown, env)
    }

    /// Parses TOML text, then applies environment overrides. `origin` names the text in
    /// errors.
    pub fn from_toml_and_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (table, from_env) = merged_table(text, origin, env)?;
        let cfg: Config = deserialize(table, &from_env)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Cross-field checks serde cannot express.
    fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        check_database_url(&self.database.url)?;
        if !self.redis.url.starts_with("redis://") && !self.redis.url.starts_with("unix://") {
            return bad("[redis] url must start with redis:// or unix://".into());
        }
        if self.database.pool_size == 0 {
            return bad("[database] pool_size must be at least 1".into());
        }
        if self.federation.max_skew_ms <= 0 {
            return bad("[federation] max_skew_ms must be positive".into());
        }
        if self.delivery.backoff_base_ms == 0
            || self.delivery.backoff_cap_ms < self.delivery.backoff_base_ms
        {
            return bad(
                "[delivery] backoff_base_ms must be positive and at most backoff_cap_ms".into(),
            );
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return bad("[http] tls_cert and tls_key must be set together".into());
        }
        for q in &self.worker.queues {
            if crate::queue::QueueName::parse(q).is_none() {
                return bad(format!(
                    "[worker] queues: unknown queue {q:?} (verify, fanout, deliver)"
                ));
            }
        }
        if self.worker.deliver_concurrency == 0 || self.worker.deliver_concurrency > 100_000 {
            return bad("[worker] deliver_concurrency must be 1 to 100000".into());
        }
        if self.worker.probe_concurrency == 0 || self.worker.probe_concurrency > 100_000 {
            return bad("[worker] probe_concurrency must be 1 to 100000".into());
        }
        if self.worker.concurrency == 0 {
            return bad("[worker] concurrency must be at least 1".into());
        }
        // Ten years: any longer is "forever", and beyond it time arithmetic overflows.
        const DECADE_SECS: u64 = 10 * 365 * 24 * 3600;
        if self.federation.quarantine_window_secs == 0
            || self.federation.quarantine_window_secs > DECADE_SECS
            || self.federation.quarantine_secs > DECADE_SECS
        {
            return bad(format!(
                "[federation] quarantine_window_secs must be 1 to {DECADE_SECS}, and quarantine_secs 0 to {DECADE_SECS}"
            ));
        }
        if self.federation.max_in_flight_per_peer == 0 {
            return bad("[federation] max_in_flight_per_peer must be at least 1".into());
        }
        if self.delivery.window == 0 || self.delivery.window > MAX_WINDOW {
            return bad(format!("[delivery] window must be 1 to {MAX_WINDOW}"));
        }
        if self.worker.max_requests_in_flight < self.delivery.window
            || self.worker.max_requests_in_flight > 1_000_000
        {
            return bad(format!(
                "[worker] max_requests_in_flight must be at least delivery.window ({}) \
                 and at most 1000000: a round of a full window must fit in it",
                self.delivery.window
            ));
        }
        for (name, peer) in &self.peers {
            ServerName::parse(name)
                .map_err(|e| ConfigError::Invalid(format!("[peers.\"{name}\"]: {e}")))?;
            if !peer.base_url.starts_with("http://") && !peer.base_url.starts_with("https://") {
                return bad(format!(
                    "[peers.\"{name}\"] base_url must start with http:// or https://"
                ));
            }
        }
        Ok(())
    }

    /// Open files a worker process may need: one connection per delivery request in
    /// flight — `delivery.window` for each of `worker.deliver_concurrency` drains, one
    /// per probe (`worker.probe_concurrency`) — if it runs the deliver queue, plus 1 024
    /// for everything else (the database pool, Redis, logs). The validated bounds keep
    /// it far below `u64::MAX`.
    pub fn worker_open_files(&self, delivers: bool) -> u64 {
        let connections = if delivers {
            u64::from(self.worker.deliver_concurrency) * u64::from(self.delivery.window)
                + u64::from(self.worker.probe_concurrency)
        } else {
            0
        };
        connections + 1024
    }

    /// The domain our ids use.
    pub fn domain(&self) -> &str {
        self.domain.as_deref().unwrap_or(self.server_name.as_str())
    }

    /// The effective configuration with secrets masked: tokens become `"<set>"`, and URL
    /// passwords `***`.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.database.url = mask_url_password(&c.database.url);
        c.redis.url = mask_url_password(&c.redis.url);
        for t in [&mut c.local.token, &mut c.admin.token] {
            if t.is_some() {
                *t = Some("<set>".into());
            }
        }
        c
    }
}

/// The configuration file's text (empty without one) and how errors name it.
fn read_file(path: Option<&Path>) -> Result<(String, String), ConfigError> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.display().to_string(),
            source,
        })?,
        None => String::new(),
    };
    let shown = path.map_or_else(|| "(none)".to_owned(), |p| p.display().to_string());
    Ok((text, shown))
}

/// The file's table with the environment applied, and which variables set which keys.
fn merged_table(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(toml::Table, Vec<(String, String)>), ConfigError> {
    let mut table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: origin.to_owned(),
                message: e.to_string(),
            })?;
    for (section, var) in [
        ("local", "PARAFED_LOCAL_TOKEN"),
        ("admin", "PARAFED_ADMIN_TOKEN"),
    ] {
        if table
            .get(section)
            .and_then(|s| s.as_table())
            .is_some_and(|s| s.contains_key("token"))
        {
            return Err(ConfigError::SecretInFile(
                if section == "local" {
                    "[local] token"
                } else {
                    "[admin] token"
                },
                var,
            ));
        }
    }
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("PARAFED_") && !NOT_SETTINGS.contains(&k.as_str()))
        .filter(|(k, _)| !k.starts_with("PARAFED_TEST_"))
        .collect();
    env.sort();
    let mut from_env = Vec::new();
    for (var, value) in env {
        let key = apply_env(&mut table, &var, value)?;
        from_env.push((var, key));
    }
    Ok((table, from_env))
}

/// Deserializes the merged table; errors name the key, and the variable that set it.
fn deserialize<T: serde::de::DeserializeOwned>(
    table: toml::Table,
    from_env: &[(String, String)],
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(
        |e: serde_path_to_error::Error<toml::de::Error>| {
            let path = e.path().to_string();
            let mut msg = if path == "." {
                e.inner().message().to_owned()
            } else {
                format!("{path}: {}", e.inner().message())
            };
            // Name the environment variable when the bad key or value came from one.
            for (var, key) in from_env {
                let leaf = key.rsplit('.').next().unwrap_or(key);
                if path == *key || msg.contains(&format!("`{leaf}`")) {
                    msg.push_str(&format!(" (set by environment variable {var})"));
                }
            }
            ConfigError::Invalid(msg)
        },
    )
}

/// What the database commands (`parafed migrate`, `parafed keys …`) need, and nothing
/// else: `PARAFED_DATABASE_URL=… parafed migrate` works with no other setting. Read from
/// the same file and environment as [`Config`]; other sections are not looked at.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct StoreSettings {
    pub database: DatabaseConfig,
    #[serde(default)]
    pub keys: KeysConfig,
}

impl StoreSettings {
    /// Loads `path` (if any) and applies the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (text, shown) = read_file(path)?;
        let (table, from_env) = merged_table(&text, &shown, env)?;
        let s: StoreSettings = deserialize(table, &from_env)?;
        check_database_url(&s.database.url)?;
        Ok(s)
    }
}

fn check_database_url(url: &str) -> Result<(), ConfigError> {
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        return Err(ConfigError::Invalid(
            "[database] url must start with postgres:// or postgresql:// (PARAFED_DATABASE_URL)"
                .into(),
        ));
    }
    Ok(())
}

/// The largest `delivery.window`: the HTTP client keeps as many idle keep-alive
/// connections per peer (`remote::http`), so every request of a window can reuse one.
pub const MAX_WINDOW: u32 = 256;

/// One setting, for `docs/configuration.md` (which a test checks against this list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// `section.key` (or a top-level `key`), as written in the file.
    pub key: String,
    /// The default, as text: `required` when there is none and the setting must be
    /// given, `(none)` when unset means "off" or "derived".
    pub default: String,
    /// The environment variable that sets it; `None` for file-only settings (`peers`).
    pub env: Option<String>,
}

/// Every setting with its default and environment name, in file order.
pub fn reference() -> Vec<Setting> {
    let placeholder = Config {
        server_name: ServerName::parse("required.invalid").unwrap_or_else(|_| unreachable!()),
        domain: None,
        http: HttpConfig::default(),
        database: DatabaseConfig {
            url: String::new(),
            pool_size: defaults::pool_size(),
        },
        redis: RedisConfig {
            url: String::new(),
            key_prefix: defaults::key_prefix(),
        },
        federation: FederationConfig::default(),
        delivery: DeliveryConfig::default(),
        worker: WorkerConfig::default(),
        keys: KeysConfig::default(),
        local: TokenConfig::default(),
        admin: AdminConfig::default(),
        peers: BTreeMap::new(),
    };
    let required = ["server_name", "database.url", "redis.url"];
    let value = serde_json::to_value(&placeholder).unwrap_or_default();
    let mut out = Vec::new();
    let Some(top) = value.as_object() else {
        return out;
    };
    let render = |key: &str, v: &serde_json::Value| -> String {
        if required.contains(&key) {
            return "required".into();
        }
        match v {
            serde_json::Value::Null => "(none)".into(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    };
    for (k, v) in top {
        match v {
            serde_json::Value::Object(section) if k != "peers" => {
                for (field, fv) in section {
                    let key = format!("{k}.{field}");
                    out.push(Setting {
                        default: render(&key, fv),
                        env: Some(format!("PARAFED_{}_{}", k, field).to_ascii_uppercase()),
                        key,
                    });
                }
            }
            _ if k == "peers" => out.push(Setting {
                key: "peers.\"<name>\".base_url".into(),
                default: "(none)".into(),
                env: None,
            }),
            _ => out.push(Setting {
                key: k.clone(),
                default: render(k, v),
                env: Some(format!("PARAFED_{k}").to_ascii_uppercase()),
            }),
        }
    }
    out
}

/// Puts one `PARAFED_*` variable into the TOML table; returns the dotted path it set.
fn apply_env(table: &mut toml::Table, var: &str, value: String) -> Result<String, ConfigError> {
    let rest = var["PARAFED_".len()..].to_ascii_lowercase();
    if TOP_LEVEL.contains(&rest.as_str()) {
        table.insert(rest.clone(), toml::Value::String(value));
        return Ok(rest);
    }
    let Some(section) = SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_"))) else {
        return Err(ConfigError::UnknownEnv {
            var: var.to_owned(),
            section: rest.split('_').next().unwrap_or("").to_owned(),
            key: rest.split_once('_').map_or("", |(_, k)| k).to_owned(),
        });
    };
    let key = &rest[section.len() + 1..];
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(sec) = entry.as_table_mut() else {
        return Err(ConfigError::Invalid(format!("[{section}] must be a table")));
    };
    // Lists (worker.queues) are comma-separated in the environment.
    let v = if *section == "worker" && key == "queues" {
        toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        )
    } else if BOOLEANS.contains(&format!("{section}.{key}").as_str()) {
        match value.trim() {
            "true" | "1" | "yes" => toml::Value::Boolean(true),
            "false" | "0" | "no" => toml::Value::Boolean(false),
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "{var} must be true or false, not {value:?}"
                )))
            }
        }
    } else {
        toml::Value::String(value)
    };
    sec.insert(key.to_owned(), v);
    Ok(format!("{section}.{key}"))
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_needs_a_file_per_delivery_connection_plus_a_margin() {
        let mut cfg = Config::from_toml_and_env(BASE, "t", env(&[])).unwrap();
        // Defaults: 64 drains × a window of 128 + 1 024 probes + 1 024.
        assert_eq!(cfg.worker_open_files(true), 64 * 128 + 1024 + 1024);
        assert_eq!(cfg.worker_open_files(false), 1024);
        cfg.delivery.window = 8;
        cfg.worker.deliver_concurrency = 3;
        cfg.worker.probe_concurrency = 5;
        assert_eq!(cfg.worker_open_files(true), 3 * 8 + 5 + 1024);
    }

    /// The worker's budget of requests in flight must hold a full window of one
    /// destination (a round asks for its share at once), and is bounded above.
    #[test]
    fn the_request_budget_holds_at_least_a_window() {
        let with = |budget: &str, window: &str| {
            Config::from_toml_and_env(
                BASE,
                "t",
                env(&[
                    ("PARAFED_WORKER_MAX_REQUESTS_IN_FLIGHT", budget),
                    ("PARAFED_DELIVERY_WINDOW", window),
                ]),
            )
        };
        assert_eq!(
            with("16", "16").unwrap().worker.max_requests_in_flight,
            16,
            "a budget of one window"
        );
        for (budget, window) in [("15", "16"), ("0", "1"), ("1000001", "64")] {
            let e = with(budget, window).unwrap_err().to_string();
            assert!(
                e.contains("max_requests_in_flight") && e.contains("delivery.window"),
                "{budget}, {window}: {e}"
            );
        }
        let defaults = Config::from_toml_and_env(BASE, "t", env(&[])).unwrap();
        assert_eq!(defaults.worker.max_requests_in_flight, 1024);
    }

    /// docs/configuration.md lists every setting with its default and environment name;
    /// this fails when the page and the code disagree, and prints the rows the code has.
    #[test]
    fn configuration_page_matches_the_code() {
        let page = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/configuration.md"
        ));
        let cell = |c: &str| c.trim().trim_matches('`').to_owned();
        let documented: Vec<(String, String, String)> = page
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').collect();
                (
                    cell(cells.first().copied().unwrap_or("")),
                    cell(cells.get(1).copied().unwrap_or("")),
                    cell(cells.get(2).copied().unwrap_or("")),
                )
            })
            .collect();
        let code: Vec<(String, String, String)> = reference()
            .into_iter()
            .map(|s| {
                (
                    s.key,
                    s.default,
                    s.env.unwrap_or_else(|| "(file only)".into()),
                )
            })
            .collect();
        let rows: String = code
            .iter()
            .map(|(k, d, e)| format!("| `{k}` | `{d}` | `{e}` | |\n"))
            .collect();
        assert_eq!(
            documented, code,
            "docs/configuration.md disagrees with src/config.rs; the code's rows are:\n{rows}"
        );
    }

    const BASE: &str = r#"
server_name = "alpha.test"
[database]
url = "postgres://parafed:hunter2@127.0.0.1/parafed"
[redis]
url = "redis://127.0.0.1:6379"
[peers."beta.test"]
base_url = "http://127.0.0.1:8449"
"#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn file_then_env() {
        let c = Config::from_toml_and_env(
            BASE,
            "t",
            env(&[
                ("PARAFED_HTTP_LISTEN", "127.0.0.1:9000"),
                ("PARAFED_FEDERATION_MAX_SKEW_MS", "30000"),
                ("PARAFED_FEDERATION_MODE", "allowlist"),
                ("PARAFED_LOCAL_TOKEN", "s3cret"),
                ("PARAFED_WORKER_QUEUES", "verify, deliver"),
                ("PARAFED_CONFIG", "/ignored"),
                ("PARAFED_ADMIN_URL", "http://127.0.0.1:8448"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.http.listen.port(), 9000);
        assert_eq!(c.federation.max_skew_ms, 30_000);
        assert_eq!(c.federation.mode, FederationMode::Allowlist);
        assert_eq!(c.worker.queues, ["verify", "deliver"]);
        assert_eq!(c.peers["beta.test"].base_url, "http://127.0.0.1:8449");
        let r = c.redacted();
        assert_eq!(r.local.token.as_deref(), Some("<set>"));
        assert_eq!(r.database.url, "postgres://parafed:***@127.0.0.1/parafed");
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml_and_env(&format!("{BASE}\n[http]\nlisen = \"x\""), "t", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = Config::from_toml_and_env(BASE, "t", env(&[("PARAFED_HTTP_LISEN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("PARAFED_HTTP_LISEN"), "{e}");
        let e = Config::from_toml_and_env(BASE, "t", env(&[("PARAFED_BOGUS_X", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("PARAFED_BOGUS_X"), "{e}");
        let e = Config::from_toml_and_env(BASE, "t", env(&[("PARAFED_HTTP_LISTEN", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("PARAFED_HTTP_LISTEN") && e.contains("socket address"),
            "{e}"
        );
        let e = Config::from_toml_and_env(
            BASE,
            "t",
            env(&[("PARAFED_FEDERATION_MAX_SKEW_MS", "soon")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("soon"), "{e}");
        let e =
            Config::from_toml_and_env(&format!("{BASE}\n[local]\ntoken = \"x\""), "t", env(&[]))
                .unwrap_err()
                .to_string();
        assert!(e.contains("PARAFED_LOCAL_TOKEN"), "{e}");
        let e = Config::from_toml_and_env(&BASE.replace("alpha.test", "bad name"), "t", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server name"), "{e}");
    }
}
