//! Where peers are: the federation endpoint and id domain of each server name.
//!
//! A peer under `[peers."name"]` in the config has a fixed base URL (no discovery).
//! Otherwise, with discovery on, `https://<name>/.well-known/paracord/server` is read once
//! and remembered in the `peers` table; with discovery off, unknown peers have no
//! endpoint and cannot federate.

use std::collections::HashMap;
use std::sync::RwLock;

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

pub struct PeerDirectory {
    configured: HashMap<String, PeerEndpoint>,
    discovered: RwLock<HashMap<ServerName, PeerEndpoint>>,
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

    /// The peer's endpoint: configured, remembered, or discovered now.
    pub async fn resolve(&self, name: &ServerName) -> Result<PeerEndpoint, DirectoryError> {
        if let Some(p) = self.configured.get(name.as_str()) {
            return Ok(p.clone());
        }
        if !self.discovery {
            return Err(DirectoryError::Unknown(name.clone()));
        }
        if let Some(p) = self
            .discovered
            .read()
            .ok()
            .and_then(|m| m.get(name).cloned())
        {
            return Ok(p);
        }
        if let Some(p) = self.load(name).await {
            self.remember(name, &p);
            return Ok(p);
        }
        let p = self.discover(name).await?;
        self.remember(name, &p);
        Ok(p)
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
