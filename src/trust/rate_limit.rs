//! Per-peer rate limits shared by the whole ingress fleet, in Redis.
//!
//! GCRA (the generic cell rate algorithm) in one Lua script: each peer has one key
//! holding its "theoretical arrival time". A limit of N per minute admits a burst of N
//! and then one request every 60/N s — no double burst at a window edge, and the exact
//! time until the next admission for `Retry-After`. The script reads Redis's clock, so
//! ingress processes with skewed clocks still agree.

use redis::aio::ConnectionManager;
use redis::Script;

use crate::queue::{Keys, QueueError};

const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > tolerance then
  return tat - now - tolerance
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now + 1000)
return -1
";

/// Admission decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Refused; the next request would be admitted after this many milliseconds.
    Limited {
        retry_after_ms: u64,
    },
}

#[derive(Clone)]
pub struct RateLimiter {
    conn: ConnectionManager,
    keys: Keys,
    script: Script,
}

impl RateLimiter {
    pub fn new(conn: ConnectionManager, keys: Keys) -> Self {
        Self {
            conn,
            keys,
            script: Script::new(GCRA),
        }
    }

    /// Counts one request from `peer` against `per_minute` (0 = unlimited).
    pub async fn admit(&self, peer: &str, per_minute: u32) -> Result<Admission, QueueError> {
        if per_minute == 0 {
            return Ok(Admission::Admitted);
        }
        let interval = 60_000f64 / f64::from(per_minute);
        let tolerance = interval * f64::from(per_minute - 1);
        let mut conn = self.conn.clone();
        let r: i64 = self
            .script
            .key(self.keys.rate(peer))
            .arg(interval.ceil() as u64)
            .arg(tolerance.floor() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(if r < 0 {
            Admission::Admitted
        } else {
            Admission::Limited {
                retry_after_ms: r as u64,
            }
        })
    }
}
