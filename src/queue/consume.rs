//! Consuming a queue: a Redis Stream read through a consumer group.
//!
//! * `XREADGROUP … BLOCK` wakes a worker the moment work arrives (no polling interval),
//!   on a connection of its own (a blocking read would stall a shared one);
//! * an entry is acknowledged (`XACK` + `XDEL`) only after its handler succeeded, so a
//!   worker killed mid-job loses nothing: the entry stays in the group's pending list;
//! * every few seconds each consumer claims entries idle longer than `min_idle` (their
//!   worker died or hangs) — after `max_deliveries` attempts an entry is moved to the
//!   queue's dead stream for an operator instead of looping forever;
//! * a job that failed is marked so that a claim round takes it after its backoff
//!   ([`retry_delay`]: seconds at first, doubling up to `min_idle`), not after
//!   `min_idle`: a transient failure (a pool wait that timed out under a burst) costs
//!   its events seconds, not minutes;
//! * the group is (re)created on demand, so a Redis restart or `FLUSHALL` is survived;
//!   what Redis lost, the reconciler rebuilds from Postgres;
//! * reads are bounded (`COUNT`), whatever the backlog: no "fetch everything due";
//! * a read that found less than a batch may wait `linger` for more (the verify queue:
//!   jobs read together run as one, and at a steady rate each job is one small group
//!   commit's events — see [`StreamConsumer::linger`]).

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{RedisResult, Value};

/// The consumer group every parafed worker joins.
pub const GROUP: &str = "workers";
/// Entries a dead stream keeps (roughly: Redis trims in whole nodes); the oldest go
/// first. The work itself is not lost with them — Postgres still holds its rows.
pub const MAX_DEAD_ENTRIES: usize = 10_000;

/// Longest error text kept per job.
pub const MAX_ERROR_CHARS: usize = 500;

/// The hash beside a queue's stream holding the last error of each entry that failed
/// (entry id → text); an entry's error goes with it into the dead stream.
pub fn errors_key(stream_key: &str) -> String {
    format!("{stream_key}:errors")
}

#[derive(Clone)]
pub struct StreamConsumer {
    /// For the blocking read only.
    reader: ConnectionManager,
    /// For acks, claims and group management.
    conn: ConnectionManager,
    key: String,
    dead_key: String,
    errors_key: String,
    consumer: String,
    pub batch: usize,
    pub block: Duration,
    /// After a read that found fewer than `batch` entries, how long to wait for more
    /// before handing them over (zero: not at all, the default). The wait ends at the
    /// first entry that arrives. For queues whose jobs read together run as one
    /// (`Coalesce`): at a steady 1 000 events/s verify jobs arrive a few milliseconds
    /// apart, each a group commit of about three events, and every run has the
    /// statements of one whatever its size (docs/performance.md, twelfth round).
    /// `block` and `linger` stay below the connection's response timeout (2 s,
    /// `queue::connect`): a longer blocking read is cut off as an error.
    pub linger: Duration,
    pub min_idle: Duration,
    /// The backoff of a failed job's first retry ([`retry_delay`], default
    /// [`RETRY_BASE`]).
    pub retry_base: Duration,
    pub max_deliveries: u64,
}

/// The backoff of a job's first retry after a failure (the default of
/// [`StreamConsumer::retry_base`]); each further retry waits twice as long as the one
/// before, up to the consumer's `min_idle` ([`retry_delay`]).
pub const RETRY_BASE: Duration = Duration::from_secs(2);

/// How long a job that failed on its `deliveries`-th run (1 = the first) waits before
/// it runs again: `base`·2^(deliveries−1), at most `min_idle`, drawn from the
/// upper third of that (`jitter` in `[0, 1]` picks the point; jobs of one burst that
/// failed together are spread). Claim rounds come every few seconds
/// (`parafed_jobs::backend`), so the first retries come a few seconds after the
/// failure. With the defaults (`min_idle` = `worker.job_timeout_ms`, 120 s; 20 runs
/// before the dead stream) a job that keeps failing is moved to the dead stream about
/// 20 to 32 minutes after its first run (the backoffs, 20 to 30 minutes, and the claim
/// rounds' seconds; 40 minutes when every retry waited `min_idle`). A handler that
/// panicked does not reach the retry (apalis' `catch-panic` layer wraps it with the
/// acknowledgement): its job still waits `min_idle`.
pub fn retry_delay(deliveries: u64, base: Duration, min_idle: Duration, jitter: f64) -> Duration {
    crate::delivery::backoff::exponential(
        base,
        min_idle,
        crate::delivery::backoff::JITTER_FLOOR,
        u32::try_from(deliveries).unwrap_or(u32::MAX),
        jitter,
    )
}

/// One stream entry: its id and the job bytes.
#[derive(Clone, Debug)]
pub struct Entry {
    pub id: String,
    pub payload: Vec<u8>,
}

impl StreamConsumer {
    pub fn new(
        reader: ConnectionManager,
        conn: ConnectionManager,
        key: String,
        dead_key: String,
        consumer: String,
    ) -> Self {
        Self {
            reader,
            conn,
            errors_key: errors_key(&key),
            key,
            dead_key,
            consumer,
            batch: 64,
            block: Duration::from_millis(1000),
            linger: Duration::ZERO,
            min_idle: Duration::from_secs(60),
            retry_base: RETRY_BASE,
            max_deliveries: 20,
        }
    }

    pub fn consumer_name(&self) -> &str {
        &self.consumer
    }

    /// Creates the group (reading from the stream's start) if it does not exist.
    pub async fn ensure_group(&self) -> RedisResult<()> {
        let mut c = self.conn.clone();
        let r: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// New entries for this consumer, waiting up to `block` for some, at most `batch`;
    /// when fewer came, up to `linger` more for the next ones (see [`Self::linger`]).
    pub async fn read(&self) -> RedisResult<Vec<Entry>> {
        let mut got = self.read_some(self.batch, self.block).await?;
        if !got.is_empty() && got.len() < self.batch && !self.linger.is_zero() {
            // The entries already read are this consumer's now: a failed wait for more
            // must not drop them (they would wait for a claim round, `min_idle` later).
            match self.read_some(self.batch - got.len(), self.linger).await {
                Ok(more) => got.extend(more),
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for more entries failed; running those read")
                }
            }
        }
        Ok(got)
    }

    /// One `XREADGROUP` of at most `count` new entries, blocking up to `block` (at least
    /// 1 ms: `BLOCK 0` would wait forever).
    async fn read_some(&self, count: usize, block: Duration) -> RedisResult<Vec<Entry>> {
        let mut c = self.reader.clone();
        let r: RedisResult<Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg((block.as_millis() as u64).max(1))
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async(&mut c)
            .await;
        match r {
            Ok(v) => Ok(parse_read(&v)),
            Err(e) if e.code() == Some("NOGROUP") => {
                self.ensure_group().await?;
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// Most entries looked at by one claim round.
    fn claim_batch(&self) -> usize {
        self.batch.saturating_mul(4).max(16)
    }

    /// Takes over entries idle longer than `min_idle`; moves over-delivered ones to the
    /// dead stream. The flag says the round was full: more may be waiting, so the caller
    /// claims again as soon as it has worked through these (an outage can leave thousands
    /// of failed entries; claiming a handful every few seconds would take hours).
    pub async fn claim_stale(&self) -> RedisResult<(Vec<Entry>, bool)> {
        let mut c = self.conn.clone();
        let idle = self.min_idle.as_millis() as u64;
        let limit = self.claim_batch();
        let pending: RedisResult<Vec<(String, String, u64, u64)>> = redis::cmd("XPENDING")
            .arg(&self.key)
            .arg(GROUP)
            .arg("IDLE")
            .arg(idle)
            .arg("-")
            .arg("+")
            .arg(limit)
            .query_async(&mut c)
            .await;
        let pending = match pending {
            Ok(p) => p,
            Err(e) if e.code() == Some("NOGROUP") => {
                self.ensure_group().await?;
                return Ok((Vec::new(), false));
            }
            Err(e) => return Err(e),
        };
        let full = pending.len() >= limit;
        let (dead, retry): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|(_, _, _, deliveries)| *deliveries >= self.max_deliveries);
        if !dead.is_empty() {
            let ids: Vec<&String> = dead.iter().map(|(id, ..)| id).collect();
            let claimed = self.claim(&ids, idle).await?;
            let errors: Vec<Option<String>> = if claimed.is_empty() {
                Vec::new()
            } else {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(&self.errors_key);
                for e in &claimed {
                    cmd.arg(&e.id);
                }
                cmd.query_async(&mut c).await?
            };
            let mut pipe = redis::pipe();
            for (e, error) in claimed.iter().zip(errors) {
                pipe.cmd("XADD")
                    .arg(&self.dead_key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(MAX_DEAD_ENTRIES)
                    .arg("*")
                    .arg(super::JOB_FIELD)
                    .arg(&e.payload)
                    .arg("from")
                    .arg(&e.id)
                    .arg("error")
                    .arg(error.unwrap_or_else(|| "failed too often (no error recorded)".into()))
                    .ignore();
                pipe.cmd("HDEL").arg(&self.errors_key).arg(&e.id).ignore();
                pipe.cmd("XACK")
                    .arg(&self.key)
                    .arg(GROUP)
                    .arg(&e.id)
                    .ignore();
                pipe.cmd("XDEL").arg(&self.key).arg(&e.id).ignore();
            }
            pipe.query_async::<()>(&mut c).await?;
            tracing::warn!(queue = %self.key, count = claimed.len(), "jobs failed too often; moved to the dead stream");
        }
        if retry.is_empty() {
            return Ok((Vec::new(), full));
        }
        let ids: Vec<&String> = retry.iter().map(|(id, ..)| id).collect();
        Ok((self.claim(&ids, idle).await?, full))
    }

    async fn claim(&self, ids: &[&String], idle: u64) -> RedisResult<Vec<Entry>> {
        let mut c = self.conn.clone();
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.key).arg(GROUP).arg(&self.consumer).arg(idle);
        for id in ids {
            cmd.arg(id.as_str());
        }
        let v: Value = cmd.query_async(&mut c).await?;
        Ok(parse_entries(&v))
    }

    /// Gives entries this consumer read but will not run (it is stopping), or ran as one
    /// joined job that failed, back to the group: they stay with this consumer, marked
    /// idle for `min_idle` already, so the next claim round of any consumer takes them
    /// at once instead of a `job_timeout` later.
    pub async fn hand_back(&self, ids: &[String]) -> RedisResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn.clone();
        let idle = self.min_idle.as_millis() as u64;
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.key).arg(GROUP).arg(&self.consumer).arg(0);
        for id in ids {
            cmd.arg(id.as_str());
        }
        // JUSTID: no delivery-count increment (the entry was never run here).
        cmd.arg("IDLE").arg(idle).arg("JUSTID");
        let _: Value = cmd.query_async(&mut c).await?;
        Ok(())
    }

    /// Schedules the run after a failure of a job read from one entry: the entry stays
    /// with this consumer, pending, marked idle for `min_idle` less the job's backoff,
    /// so the first claim round (any consumer's, every few seconds) after the backoff
    /// runs it again — not `min_idle` later, the wait for a worker that died. The
    /// backoff follows the entry's runs so far (Redis' delivery count: 1 for the first):
    /// `retry_base` doubled per run, at most `min_idle`, drawn from its upper third
    /// (`delivery::backoff::exponential`). An entry no longer this consumer's, or
    /// claimed again since the run (acknowledged, or taken by a claim round after
    /// `min_idle`), is left as it is. Returns the backoff (`None` for such an entry).
    pub async fn retry_later(&self, id: &str) -> RedisResult<Option<Duration>> {
        let mut c = self.conn.clone();
        // XPENDING key group start end count consumer: this consumer's entry, if it
        // still holds it, as [id, consumer, idle ms, deliveries].
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&self.key)
            .arg(GROUP)
            .arg(id)
            .arg(id)
            .arg(1)
            .arg(&self.consumer)
            .query_async(&mut c)
            .await?;
        let Some((_, _, idle_now, deliveries)) = pending.into_iter().next() else {
            return Ok(None);
        };
        let wait = retry_delay(
            deliveries,
            self.retry_base,
            self.min_idle,
            crate::delivery::backoff::random_jitter(),
        );
        let idle = self.min_idle.saturating_sub(wait).as_millis() as u64;
        // The idle time just read is the claim's condition: a claim round that took the
        // entry in between (this process's or another's) reset it, and the entry is
        // then left to that run. JUSTID: no delivery-count increment (the claim round
        // that runs it again counts that run).
        let claimed: Value = redis::cmd("XCLAIM")
            .arg(&self.key)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(idle_now)
            .arg(id)
            .arg("IDLE")
            .arg(idle)
            .arg("JUSTID")
            .query_async(&mut c)
            .await?;
        Ok(match claimed {
            Value::Array(ids) if !ids.is_empty() => Some(wait),
            _ => None,
        })
    }

    /// Acknowledges and deletes a finished entry (and forgets its last error).
    pub async fn ack(&self, id: &str) -> RedisResult<()> {
        self.ack_all(&[id]).await
    }

    /// Acknowledges and deletes finished entries (and forgets their last errors), in one
    /// round trip: the entries of one coalesced job.
    pub async fn ack_all(&self, ids: &[&str]) -> RedisResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn.clone();
        redis::pipe()
            .cmd("XACK")
            .arg(&self.key)
            .arg(GROUP)
            .arg(ids)
            .ignore()
            .cmd("XDEL")
            .arg(&self.key)
            .arg(ids)
            .ignore()
            .cmd("HDEL")
            .arg(&self.errors_key)
            .arg(ids)
            .ignore()
            .query_async::<()>(&mut c)
            .await
    }

    /// Records why an entry's job failed (it stays pending and runs again), for
    /// `parafed admin jobs`; at most [`MAX_ERROR_CHARS`] characters.
    pub async fn note_error(&self, id: &str, error: &str) -> RedisResult<()> {
        self.note_errors(&[id], error).await
    }

    /// [`note_error`](Self::note_error) for the entries of one joined job, in one round
    /// trip.
    pub async fn note_errors(&self, ids: &[&str], error: &str) -> RedisResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn.clone();
        let text: String = error.chars().take(MAX_ERROR_CHARS).collect();
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&self.errors_key);
        for id in ids {
            cmd.arg(*id).arg(&text);
        }
        cmd.query_async::<()>(&mut c).await
    }
}

fn bulk(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// `[[id, [field, value, …]], …]` → entries carrying a `job` field.
fn parse_entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = String::from_utf8(bulk(pair.first()?)?).ok()?;
            let Value::Array(fields) = pair.get(1)? else {
                return None;
            };
            let payload = fields
                .chunks(2)
                .find(|kv| bulk(&kv[0]).as_deref() == Some(super::JOB_FIELD.as_bytes()))
                .and_then(|kv| kv.get(1).and_then(bulk))?;
            Some(Entry { id, payload })
        })
        .collect()
}

/// XREADGROUP's reply: `[[stream, entries]]` (RESP2) or a map (RESP3); nil on timeout.
fn parse_read(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => parse_entries(&pair[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(m) => m.iter().flat_map(|(_, e)| parse_entries(e)).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_jobs_backoff_doubles_per_run_up_to_the_idle_timeout() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let min_idle = s(120);
        // (runs so far, jitter, expected): from [2d/3, d], d = min(120 s, 2 s·2^(n−1)).
        let table = [
            (1, 1.0, s(2)),
            (1, 0.0, ms(1333)),
            (2, 1.0, s(4)),
            (3, 0.5, ms(6666)),
            (6, 1.0, s(64)),
            (7, 1.0, s(120)),
            (7, 0.0, s(80)),
            (20, 1.0, s(120)),
            (u64::MAX, 1.0, s(120)),
            // A count of 0 (never seen) is taken as the first run.
            (0, 1.0, s(2)),
        ];
        for (runs, jitter, want) in table {
            let got = retry_delay(runs, RETRY_BASE, min_idle, jitter);
            assert!(
                got.abs_diff(want) <= ms(1),
                "run {runs}, jitter {jitter}: {got:?} != {want:?}"
            );
        }
        // Never past the idle timeout, however small it is.
        assert_eq!(retry_delay(1, RETRY_BASE, s(1), 1.0), s(1));
    }
}
