//! The operator's hold on the queues: pause and resume a queue fleet-wide, list the jobs
//! of a queue by state, show one, retry a dead one, cancel one, and redrive or purge a
//! dead stream in bulk.
//!
//! A job is **ready** (in the stream, not yet read by a worker: after the consumer
//! group's last-delivered id), **in flight** (read and not acknowledged: the group's
//! pending list, with the worker holding it, how long it has been idle and how many
//! times it was delivered) or **dead** (moved to the dead stream after
//! `max_deliveries`). A job that failed keeps its last error in a hash beside the stream
//! (`<prefix>:q:<queue>:errors`), so one that keeps failing shows why instead of
//! looping quietly; the error travels with it into the dead stream.
//!
//! Pausing sets `<prefix>:paused:<queue>`; every worker checks the flags a few times a
//! second (`parafed_jobs::control`) and stops taking jobs from a paused queue — and a
//! running drain stops sending — within a second.

use std::collections::BTreeMap;

use redis::Value;
use serde::{Deserialize, Serialize};

use super::{JobQueue, QueueError, QueueName, StreamEntry, JOB_FIELD};

/// A job's state (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Ready,
    InFlight,
    Dead,
}

impl JobState {
    pub const ALL: [JobState; 3] = [JobState::Ready, JobState::InFlight, JobState::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::InFlight => "in_flight",
            JobState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|j| j.as_str() == s)
    }
}

/// One job as the operator sees it.
#[derive(Clone, Debug, Serialize)]
pub struct JobView {
    pub queue: QueueName,
    /// The stream entry id (`<ms>-<n>`); the cursor of job lists.
    pub id: String,
    pub state: JobState,
    /// The job (JSON): what it names, e.g. `{"destination": "beta.test"}`.
    pub job: serde_json::Value,
    /// When it was pushed (Unix ms, from the entry id).
    pub pushed_at_ms: Option<i64>,
    /// In flight: the worker consumer holding it.
    pub consumer: Option<String>,
    /// In flight: ms since it was last read or claimed.
    pub idle_ms: Option<u64>,
    /// In flight: times it was handed to a worker (over `max_deliveries` → dead).
    pub deliveries: Option<u64>,
    /// The last error it failed with, if it failed.
    pub last_error: Option<String>,
    /// Dead: the id it had in its queue.
    pub dead_from: Option<String>,
}

/// Who paused a queue, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub by: String,
    pub at_ms: i64,
}

fn ms_of(id: &str) -> Option<i64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

fn field<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

fn view(q: QueueName, state: JobState, (id, fields): &StreamEntry) -> JobView {
    let job = field(fields, JOB_FIELD)
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or(serde_json::Value::Null);
    let text = |n: &str| field(fields, n).map(|b| String::from_utf8_lossy(b).into_owned());
    JobView {
        queue: q,
        id: id.clone(),
        state,
        job,
        pushed_at_ms: ms_of(text("from").as_deref().unwrap_or(id)),
        consumer: None,
        idle_ms: None,
        deliveries: None,
        last_error: text("error"),
        dead_from: text("from"),
    }
}

/// The consumer group's last-delivered id: entries after it are ready.
fn last_delivered(groups: &Value) -> Option<String> {
    let Value::Array(groups) = groups else {
        return None;
    };
    for g in groups {
        let pairs: Vec<(&Value, &Value)> = match g {
            Value::Array(items) => items
                .chunks(2)
                .filter_map(|kv| Some((kv.first()?, kv.get(1)?)))
                .collect(),
            Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
            _ => continue,
        };
        let get = |name: &str| {
            pairs.iter().find_map(|(k, v)| match k {
                Value::BulkString(b) if b == name.as_bytes() => Some(*v),
                Value::SimpleString(s) if s == name => Some(*v),
                _ => None,
            })
        };
        let is_ours = matches!(get("name"), Some(Value::BulkString(b)) if b == super::consume::GROUP.as_bytes());
        if is_ours {
            return match get("last-delivered-id") {
                Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
                Some(Value::SimpleString(s)) => Some(s.clone()),
                _ => None,
            };
        }
    }
    None
}

fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("no such key")
}

impl JobQueue {
    /// Pauses `q` for the whole fleet.
    pub async fn pause(&self, q: QueueName, by: &str) -> Result<(), QueueError> {
        let key = self.keys.paused(q);
        let v = serde_json::to_vec(&Pause {
            by: by.to_owned(),
            at_ms: chrono::Utc::now().timestamp_millis(),
        })?;
        self.call(|mut c| {
            let (key, v) = (key.clone(), v.clone());
            async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(v)
                    .query_async::<()>(&mut c)
                    .await
            }
        })
        .await
    }

    /// Resumes `q`; true when it was paused.
    pub async fn resume(&self, q: QueueName) -> Result<bool, QueueError> {
        let key = self.keys.paused(q);
        let n: u64 = self
            .call(|mut c| {
                let key = key.clone();
                async move { redis::cmd("DEL").arg(key).query_async(&mut c).await }
            })
            .await?;
        Ok(n > 0)
    }

    /// Which queues are paused, by whom (one `MGET`).
    pub async fn paused(&self) -> Result<BTreeMap<QueueName, Pause>, QueueError> {
        let keys: Vec<String> = QueueName::ALL
            .iter()
            .map(|&q| self.keys.paused(q))
            .collect();
        let vals: Vec<Option<Vec<u8>>> = self
            .call(|mut c| {
                let keys = keys.clone();
                async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await }
            })
            .await?;
        Ok(QueueName::ALL
            .into_iter()
            .zip(vals)
            .filter_map(|(q, v)| {
                let v = v?;
                // A flag someone set by hand still pauses; it just names nobody.
                let p = serde_json::from_slice(&v).unwrap_or(Pause {
                    by: "unknown".into(),
                    at_ms: 0,
                });
                Some((q, p))
            })
            .collect())
    }

    async fn errors_of(
        &self,
        q: QueueName,
        ids: &[&str],
    ) -> Result<Vec<Option<String>>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.keys.job_errors(q);
        self.call(|mut c| {
            let key = key.clone();
            async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg(ids)
                    .query_async(&mut c)
                    .await
            }
        })
        .await
    }

    async fn range(
        &self,
        key: &str,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<StreamEntry>, QueueError> {
        self.call(|mut c| async move {
            redis::cmd("XRANGE")
                .arg(key)
                .arg(start)
                .arg(end)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut c)
                .await
        })
        .await
    }

    async fn last_delivered(&self, q: QueueName) -> Result<Option<String>, QueueError> {
        let key = self.keys.queue(q);
        let groups: Result<Value, QueueError> = self
            .call(|mut c| {
                let key = key.clone();
                async move {
                    redis::cmd("XINFO")
                        .arg("GROUPS")
                        .arg(key)
                        .query_async(&mut c)
                        .await
                }
            })
            .await;
        match groups {
            Ok(v) => Ok(last_delivered(&v)),
            Err(QueueError::Redis(e)) if is_nogroup(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// In-flight entries from the group's pending list: (id, consumer, idle ms,
    /// deliveries), ids after `after`.
    async fn pending(
        &self,
        q: QueueName,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<(String, String, u64, u64)>, QueueError> {
        let key = self.keys.queue(q);
        let r = self
            .call(|mut c| {
                let key = key.clone();
                async move {
                    redis::cmd("XPENDING")
                        .arg(key)
                        .arg(super::consume::GROUP)
                        .arg(start)
                        .arg(end)
                        .arg(count)
                        .query_async(&mut c)
                        .await
                }
            })
            .await;
        match r {
            Ok(v) => Ok(v),
            Err(QueueError::Redis(e)) if is_nogroup(&e) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Jobs of `q` in `state`, oldest first, with ids after `after` (the previous page's
    /// last id).
    pub async fn jobs(
        &self,
        q: QueueName,
        state: JobState,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobView>, QueueError> {
        let start = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let mut views = match state {
            JobState::Dead => self
                .range(&self.keys.dead(q), &start, "+", limit)
                .await?
                .iter()
                .map(|e| view(q, JobState::Dead, e))
                .collect(),
            JobState::Ready => {
                let from = match (self.last_delivered(q).await?, after) {
                    (Some(l), Some(a)) => format!("({}", max_id(&l, a)),
                    (Some(l), None) => format!("({l}"),
                    (None, _) => start,
                };
                self.range(&self.keys.queue(q), &from, "+", limit)
                    .await?
                    .iter()
                    .map(|e| view(q, JobState::Ready, e))
                    .collect()
            }
            JobState::InFlight => {
                let pending = self.pending(q, &start, "+", limit).await?;
                let mut out = Vec::with_capacity(pending.len());
                for (id, consumer, idle, deliveries) in pending {
                    let entry = self.range(&self.keys.queue(q), &id, &id, 1).await?;
                    let mut v = match entry.first() {
                        Some(e) => view(q, JobState::InFlight, e),
                        None => continue, // acknowledged meanwhile
                    };
                    v.consumer = Some(consumer);
                    v.idle_ms = Some(idle);
                    v.deliveries = Some(deliveries);
                    out.push(v);
                }
                out
            }
        };
        if state != JobState::Dead {
            let ids: Vec<&str> = views.iter().map(|v: &JobView| v.id.as_str()).collect();
            let errors = self.errors_of(q, &ids).await?;
            for (v, e) in views.iter_mut().zip(errors) {
                v.last_error = e;
            }
        }
        Ok(views)
    }

    /// One job by id, wherever it is.
    pub async fn job(&self, q: QueueName, id: &str) -> Result<Option<JobView>, QueueError> {
        if let Some(e) = self.range(&self.keys.queue(q), id, id, 1).await?.first() {
            let pending = self.pending(q, id, id, 1).await?;
            let mut v = view(q, JobState::Ready, e);
            if let Some((_, consumer, idle, deliveries)) = pending.into_iter().next() {
                v.state = JobState::InFlight;
                v.consumer = Some(consumer);
                v.idle_ms = Some(idle);
                v.deliveries = Some(deliveries);
            }
            v.last_error = self.errors_of(q, &[id]).await?.pop().flatten();
            return Ok(Some(v));
        }
        Ok(self
            .range(&self.keys.dead(q), id, id, 1)
            .await?
            .first()
            .map(|e| view(q, JobState::Dead, e)))
    }

    /// Puts dead jobs back in their queue (as new entries, run like any other) and
    /// removes them from the dead stream; returns the new entry ids.
    pub async fn redrive(&self, q: QueueName, dead: &[JobView]) -> Result<Vec<String>, QueueError> {
        if dead.is_empty() {
            return Ok(Vec::new());
        }
        let (key, dead_key) = (self.keys.queue(q), self.keys.dead(q));
        let mut pipe = redis::pipe();
        for j in dead {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg(JOB_FIELD)
                .arg(serde_json::to_vec(&j.job)?);
            pipe.cmd("XDEL").arg(&dead_key).arg(&j.id).ignore();
        }
        self.call(|mut c| {
            let pipe = pipe.clone();
            async move { pipe.query_async(&mut c).await }
        })
        .await
    }

    /// Removes jobs: a ready or in-flight one from its queue (acknowledged, so no worker
    /// runs it again), a dead one from the dead stream. Returns how many were removed.
    pub async fn remove(&self, q: QueueName, jobs: &[JobView]) -> Result<usize, QueueError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let (key, dead_key, errors) = (
            self.keys.queue(q),
            self.keys.dead(q),
            self.keys.job_errors(q),
        );
        let mut pipe = redis::pipe();
        for j in jobs {
            if j.state == JobState::Dead {
                pipe.cmd("XDEL").arg(&dead_key).arg(&j.id);
            } else {
                pipe.cmd("XACK")
                    .arg(&key)
                    .arg(super::consume::GROUP)
                    .arg(&j.id)
                    .ignore();
                pipe.cmd("XDEL").arg(&key).arg(&j.id);
                pipe.cmd("HDEL").arg(&errors).arg(&j.id).ignore();
            }
        }
        let removed: Vec<u64> = self
            .call(|mut c| {
                let pipe = pipe.clone();
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        Ok(removed.iter().filter(|&&n| n > 0).count())
    }
}

/// The later of two stream ids.
fn max_id<'a>(a: &'a str, b: &'a str) -> &'a str {
    let key = |s: &str| -> (u64, u64) {
        let (ms, n) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse().unwrap_or(0), n.parse().unwrap_or(0))
    };
    if key(a) >= key(b) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_stream_id() {
        assert_eq!(max_id("5-1", "5-0"), "5-1");
        assert_eq!(max_id("10-0", "9-9"), "10-0");
        assert_eq!(max_id("0-0", "1-0"), "1-0");
    }

    #[test]
    fn dead_entries_show_their_origin_and_error() {
        let e: StreamEntry = (
            "7-0".into(),
            vec![
                (JOB_FIELD.into(), br#"{"destination":"beta.test"}"#.to_vec()),
                ("from".into(), b"3-1".to_vec()),
                ("error".into(), b"peer said 500".to_vec()),
            ],
        );
        let v = view(QueueName::Deliver, JobState::Dead, &e);
        assert_eq!(v.job["destination"], "beta.test");
        assert_eq!(v.pushed_at_ms, Some(3));
        assert_eq!(v.dead_from.as_deref(), Some("3-1"));
        assert_eq!(v.last_error.as_deref(), Some("peer said 500"));
    }
}
