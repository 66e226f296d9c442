//! Heartbeats: every ingress and worker process writes one to Redis every few seconds
//! (`<prefix>:heartbeats`, a hash keyed `<role>/<id>`), so `parafed admin status` can say
//! which processes of the fleet are alive. A process not seen for [`STALE_AFTER_MS`] is
//! shown as gone; after [`FORGET_AFTER_MS`] its entry is deleted.

use serde::{Deserialize, Serialize};

use super::{JobQueue, QueueError};

/// How often a process writes its heartbeat.
pub const EVERY_MS: u64 = 5_000;
/// A process silent this long is no longer counted as running.
pub const STALE_AFTER_MS: i64 = 30_000;
/// A process silent this long is forgotten.
pub const FORGET_AFTER_MS: i64 = 3_600_000;

/// One process's heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// `ingress` or `worker`.
    pub role: String,
    /// The process's identity (a worker's consumer prefix; an ingress's host, pid and
    /// listen address).
    pub id: String,
    /// A worker's queues; empty for an ingress.
    pub queues: Vec<String>,
    /// The queues this worker has seen paused (and so does not consume); written as
    /// soon as it changes, so `status` shows when a pause has reached every worker.
    #[serde(default)]
    pub paused: Vec<String>,
    /// parafed's version.
    pub version: String,
    /// When it was written (Unix ms).
    pub at_ms: i64,
}

impl JobQueue {
    /// Writes this process's heartbeat.
    pub async fn beat(&self, hb: &Heartbeat) -> Result<(), QueueError> {
        let key = self.keys.heartbeats();
        let field = format!("{}/{}", hb.role, hb.id);
        let v = serde_json::to_vec(hb)?;
        self.call(|mut c| {
            let (key, field, v) = (key.clone(), field.clone(), v.clone());
            async move {
                redis::cmd("HSET")
                    .arg(key)
                    .arg(field)
                    .arg(v)
                    .query_async::<()>(&mut c)
                    .await
            }
        })
        .await
    }

    /// The processes seen in the last [`STALE_AFTER_MS`], by role then id; forgets those
    /// silent for [`FORGET_AFTER_MS`].
    pub async fn live_processes(&self, now_ms: i64) -> Result<Vec<Heartbeat>, QueueError> {
        let key = self.keys.heartbeats();
        let all: Vec<(String, Vec<u8>)> = self
            .call(|mut c| {
                let key = key.clone();
                async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await }
            })
            .await?;
        let mut live = Vec::new();
        let mut forget = Vec::new();
        for (field, v) in all {
            match serde_json::from_slice::<Heartbeat>(&v) {
                Ok(hb) if now_ms - hb.at_ms <= STALE_AFTER_MS => live.push(hb),
                Ok(hb) if now_ms - hb.at_ms <= FORGET_AFTER_MS => {}
                _ => forget.push(field),
            }
        }
        if !forget.is_empty() {
            self.call(|mut c| {
                let (key, forget) = (key.clone(), forget.clone());
                async move {
                    redis::cmd("HDEL")
                        .arg(key)
                        .arg(forget)
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await?;
        }
        live.sort_by(|a, b| (&a.role, &a.id).cmp(&(&b.role, &b.id)));
        Ok(live)
    }
}

/// Writes a heartbeat for this process every [`EVERY_MS`], forever (spawn it). A failed
/// write is logged at debug level: Redis being down is reported elsewhere.
pub async fn keep_beating(queue: JobQueue, role: &'static str, id: String, queues: Vec<String>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(EVERY_MS));
    loop {
        tick.tick().await;
        let hb = Heartbeat {
            role: role.to_owned(),
            id: id.clone(),
            queues: queues.clone(),
            paused: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            at_ms: chrono::Utc::now().timestamp_millis(),
        };
        if let Err(e) = queue.beat(&hb).await {
            tracing::debug!(error = %e, "writing the heartbeat failed");
        }
    }
}
