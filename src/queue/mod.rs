//! The job queue, both ends: which queues exist, what a job carries, how work is pushed
//! to Redis (here) and consumed from it ([`consume`]).
//!
//! Each queue is a Redis Stream, `<prefix>:q:<queue>`, whose entries carry one field,
//! `job`, holding the job as JSON. Streams with consumer groups give the worker side what
//! a delivery system needs and the stock apalis Redis storage lacks (see
//! docs/architecture.md): acknowledged consumption, take-over of a dead worker's entries,
//! and no "fetch everything due" script that fails on a large backlog. Jobs carry only
//! ids; the rows they name in Postgres are the truth, so a job pushed twice or lost is
//! harmless: the reconciler re-pushes unfinished work and handlers are idempotent.

pub mod admin;
pub mod consume;
pub mod heartbeat;
pub mod jobs;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;

pub use jobs::{Coalesce, DeliverJob, FanoutJob, QueueName, VerifyJob};

/// Redis failures (unreachable, timed out, or an error reply).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis unavailable: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot encode job: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Opens a lazily-connecting, self-reconnecting Redis connection with bounded timeouts,
/// so a Redis outage turns into errors callers can answer (503), never a hang.
pub fn connect(url: &str) -> Result<ConnectionManager, QueueError> {
    let client = redis::Client::open(url)?;
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_lazy_with_config(client, cfg)?)
}

/// The one field of every stream entry: the job, as JSON.
pub const JOB_FIELD: &str = "job";

/// How long a destination's "deliver job queued" mark lives unless its job clears it.
/// Short: the mark only saves duplicate pushes while a job waits in the stream or its
/// drain runs (a duplicate costs a look at the lease), but a mark whose job never ran —
/// its push lost after the mark was set, the job read by a worker that died before
/// starting it, or a drain whose worker died — keeps the scheduler and fan-out from
/// queueing the destination again until it expires. A running drain sets it again each
/// round (`mark_scheduled`), so a drain whose rounds are shorter than this keeps it (a
/// round that waits longer on a slow peer lets it lapse: that costs a job or two that
/// find the lease held, nothing more).
pub const SCHEDULED_MARK_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Redis key names, all under one configurable prefix so several parafed deployments (or
/// tests) can share a Redis.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn queue(&self, q: QueueName) -> String {
        format!("{}:q:{}", self.prefix, q.as_str())
    }

    pub fn replay(&self, id: &[u8; 32]) -> String {
        format!(
            "{}:replay:{}",
            self.prefix,
            crate::protocol::hex::encode(id)
        )
    }

    pub fn rate(&self, peer: &str) -> String {
        format!("{}:rate:{}", self.prefix, peer)
    }

    /// Set while a deliver job for the destination is queued or its drain runs
    /// (deduplicates pushes: `JobQueue::schedule_deliveries`).
    pub fn deliver_scheduled(&self, destination: &str) -> String {
        format!("{}:deliver-scheduled:{}", self.prefix, destination)
    }

    /// Entries that failed too often, moved aside for an operator.
    pub fn dead(&self, q: QueueName) -> String {
        format!("{}:dead:{}", self.prefix, q.as_str())
    }

    /// Set while an operator has paused the queue (no worker of the fleet consumes it).
    pub fn paused(&self, q: QueueName) -> String {
        format!("{}:paused:{}", self.prefix, q.as_str())
    }

    /// A hash: entry id → the last error of a job that failed and waits to run again
    /// (`<queue key>:errors`, see [`consume::StreamConsumer`]).
    pub fn job_errors(&self, q: QueueName) -> String {
        consume::errors_key(&self.queue(q))
    }

    /// Bumped by every trust change (a peer's decision or limits, the federation mode):
    /// every process watches it and drops its cached standings when it moves.
    pub fn trust_version(&self) -> String {
        format!("{}:trust-version", self.prefix)
    }

    /// A peer's offences of one kind in the current window (automatic quarantine).
    pub fn offenses(&self, peer: &str, kind: &str) -> String {
        format!("{}:offenses:{}:{}", self.prefix, peer, kind)
    }

    /// A hash: `<role>/<id>` → the last heartbeat of each ingress and worker process.
    pub fn heartbeats(&self) -> String {
        format!("{}:heartbeats", self.prefix)
    }
}

/// A stream entry as `XRANGE` returns it: `[id, [field, value, …]]`.
pub(crate) type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// The Redis clock (ms) in the id of the first entry, if any.
fn first_entry_ms(entries: &[StreamEntry]) -> Option<i64> {
    entries
        .first()
        .and_then(|(id, _)| id.split_once('-'))
        .and_then(|(ms, _)| ms.parse().ok())
}

/// A queue's jobs by state (see [`JobQueue::stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueStats {
    pub ready: u64,
    pub in_flight: u64,
    pub dead: u64,
    /// When the oldest job still in the stream was pushed (Redis clock, ms).
    pub oldest_ms: Option<i64>,
}

/// Pushes jobs. Cheap to clone (the connection is multiplexed).
#[derive(Clone)]
pub struct JobQueue {
    conn: ConnectionManager,
    keys: Keys,
}

impl JobQueue {
    pub fn new(conn: ConnectionManager, keys: Keys) -> Self {
        Self { conn, keys }
    }

    /// Runs a Redis call, and once more on a fresh connection when it failed because the
    /// connection broke. After a Redis restart every multiplexed connection is stale: the
    /// first call on it fails ("broken pipe") and the connection manager reconnects, so
    /// the retry goes through — without it that job would wait for the reconciler.
    pub(crate) async fn call<T, F, Fut>(&self, f: F) -> Result<T, QueueError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match f(self.conn.clone()).await {
            Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                tracing::debug!(error = %e, "redis connection broke; retrying once on a fresh one");
                Ok(f(self.conn.clone()).await?)
            }
            r => Ok(r?),
        }
    }

    /// Pushes one job.
    pub async fn push<J: Serialize>(&self, q: QueueName, job: &J) -> Result<(), QueueError> {
        self.push_many(q, std::slice::from_ref(job)).await
    }

    /// Pushes jobs in one pipelined round trip.
    pub async fn push_many<J: Serialize>(
        &self,
        q: QueueName,
        jobs: &[J],
    ) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let key = self.keys.queue(q);
        let mut pipe = redis::pipe();
        for j in jobs {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg(JOB_FIELD)
                .arg(serde_json::to_vec(j)?)
                .ignore();
        }
        self.call(|mut c| {
            let pipe = pipe.clone();
            async move { pipe.query_async::<()>(&mut c).await }
        })
        .await
    }

    /// Entries in a queue's stream (acknowledged entries are deleted, so this is the
    /// queued plus in-flight count).
    pub async fn len(&self, q: QueueName) -> Result<u64, QueueError> {
        let key = self.keys.queue(q);
        self.call(|mut c| {
            let key = key.clone();
            async move { redis::cmd("XLEN").arg(key).query_async(&mut c).await }
        })
        .await
    }

    /// When the oldest job still in a queue's stream was pushed (stream ids carry the
    /// Redis clock in milliseconds); `None` when the stream is empty. Acknowledged entries
    /// are deleted, so every job pushed before this instant is finished or lost.
    pub async fn oldest_job_ms(&self, q: QueueName) -> Result<Option<i64>, QueueError> {
        let key = self.keys.queue(q);
        let first: Vec<StreamEntry> = self
            .call(|mut c| {
                let key = key.clone();
                async move {
                    redis::cmd("XRANGE")
                        .arg(key)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(first_entry_ms(&first))
    }

    /// A queue's jobs by state, and when its oldest job was pushed, in one pipelined
    /// round trip (`XLEN`, the `XPENDING` summary, `XLEN` of the dead stream,
    /// `XRANGE … COUNT 1`). Ready entries wait for a worker, in-flight ones were read and
    /// not yet acknowledged (the consumer group's pending list), dead ones were moved
    /// aside after too many deliveries.
    pub async fn stats(&self, q: QueueName) -> Result<QueueStats, QueueError> {
        let (key, dead) = (self.keys.queue(q), self.keys.dead(q));
        type Reply = (u64, redis::Value, u64, Vec<StreamEntry>);
        let (len, pending, dead, first): Reply = self
            .call(|mut c| {
                let (key, dead) = (key.clone(), dead.clone());
                async move {
                    // The second reply is XPENDING's summary; without a consumer group
                    // (no worker has read the stream since it was created) nothing is in
                    // flight, and the pipeline is sent again with a stand-in there.
                    let pipe = |in_flight: bool| {
                        let mut pipe = redis::pipe();
                        pipe.cmd("XLEN").arg(&key);
                        if in_flight {
                            pipe.cmd("XPENDING").arg(&key).arg(consume::GROUP);
                        } else {
                            pipe.cmd("EXISTS").arg(&key);
                        }
                        pipe.cmd("XLEN").arg(&dead);
                        pipe.cmd("XRANGE")
                            .arg(&key)
                            .arg("-")
                            .arg("+")
                            .arg("COUNT")
                            .arg(1);
                        pipe
                    };
                    match pipe(true).query_async(&mut c).await {
                        // A pipeline wraps the reply's error code in its own error, so
                        // the code is looked for in the text too.
                        Err(e)
                            if e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP") =>
                        {
                            pipe(false).query_async(&mut c).await
                        }
                        r => r,
                    }
                }
            })
            .await?;
        // XPENDING's summary starts with the count of pending entries.
        let in_flight = match pending {
            redis::Value::Array(ref items) => match items.first() {
                Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            },
            _ => 0,
        };
        Ok(QueueStats {
            ready: len.saturating_sub(in_flight),
            in_flight,
            dead,
            oldest_ms: first_entry_ms(&first),
        })
    }

    /// Pushes a deliver job for each destination that has none queued yet and is not
    /// being drained: a mark per destination (`SET NX`, [`SCHEDULED_MARK_TTL`]) says one
    /// is queued or running. The job clears it when it starts (`clear_scheduled`); its
    /// drain sets it again each round ([`JobQueue::mark_scheduled`]) and clears it when it
    /// stops, before its last look for waiting rows, so rows written meanwhile are sent
    /// by that drain, not by one more job that would only find the lease held.
    /// Returns how many jobs were pushed.
    pub async fn schedule_deliveries(&self, destinations: &[String]) -> Result<usize, QueueError> {
        if destinations.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for d in destinations {
            pipe.cmd("SET")
                .arg(self.keys.deliver_scheduled(d))
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(SCHEDULED_MARK_TTL.as_millis() as u64);
        }
        let fresh: Vec<Option<String>> = self
            .call(|mut c| {
                let pipe = pipe.clone();
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        let due: Vec<DeliverJob> = destinations
            .iter()
            .zip(fresh)
            .filter(|(_, f)| f.is_some())
            .map(|(d, _)| DeliverJob {
                destination: d.clone(),
            })
            .collect();
        self.push_many(QueueName::Deliver, &due).await?;
        Ok(due.len())
    }

    /// Marks `destination` as being drained (`SET`, [`SCHEDULED_MARK_TTL`]): fan-outs and
    /// the scheduler then queue no job for it ([`JobQueue::schedule_deliveries`]); the
    /// drain clears the mark when it stops ([`JobQueue::clear_scheduled`]).
    pub async fn mark_scheduled(&self, destination: &str) -> Result<(), QueueError> {
        let key = self.keys.deliver_scheduled(destination);
        self.call(|mut c| {
            let key = key.clone();
            async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("PX")
                    .arg(SCHEDULED_MARK_TTL.as_millis() as u64)
                    .query_async::<()>(&mut c)
                    .await
            }
        })
        .await
    }

    /// Forgets that a deliver job is queued for `destination`, or that its drain runs:
    /// the next [`JobQueue::schedule_deliveries`] pushes a job.
    pub async fn clear_scheduled(&self, destination: &str) -> Result<(), QueueError> {
        let key = self.keys.deliver_scheduled(destination);
        self.call(|mut c| {
            let key = key.clone();
            async move { redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await }
        })
        .await
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }
}
