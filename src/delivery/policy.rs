//! Every delivery constant in one place: what the configuration sets
//! (`[delivery]`, `[worker]`) and what parafed fixes, with the reason for each.

use std::time::Duration;

use crate::config::{Config, DeliveryConfig};

/// The delivery rules' numbers. Built once per process from the configuration
/// ([`Policy::from_config`]); tests build their own.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// First backoff step after a destination failure (`delivery.backoff_base_ms`).
    pub backoff_base: Duration,
    /// Longest backoff, and the ceiling on a peer's `Retry-After` (`delivery.backoff_cap_ms`).
    pub backoff_cap: Duration,
    /// The lowest fraction of a backoff step that jitter may draw, as (numerator,
    /// denominator): delays are drawn from `[d·n/m, d]`. 2/3 keeps successive gaps
    /// growing (see [`super::backoff`]).
    pub jitter_floor: (u32, u32),
    /// How long one deliver job drains a destination before it yields its worker to
    /// other destinations (it re-queues itself).
    pub drain_budget: Duration,
    /// How often a held (quarantined) destination is looked at again: at most a minute,
    /// never longer than the backoff cap.
    pub hold_recheck: Duration,
    /// 403s in a row after which a 403 is the destination's problem (our key or
    /// registration there is wrong), not the event's (PROTOCOL.md: "a run of 403s").
    pub forbidden_run: u32,
    /// Outbound rows older than this are dead ("expired") instead of sent
    /// (`delivery.max_age_secs`).
    pub max_age: Duration,
    /// Requests in flight to one destination at most (`delivery.window`).
    pub window: usize,
    /// Waiting rows looked at per batch when choosing what may be sent (the oldest
    /// first): rows blocked behind a dependency are skipped, up to this many (twice the
    /// window, at least 32).
    pub order_scan: usize,
    /// How long an earlier event that is not yet verified or fanned out holds back its
    /// dependants: a stuck event (its origin's keys unreachable) must not stall a room.
    pub dependency_wait: Duration,
}

impl Policy {
    /// The policy a process runs with.
    pub fn from_config(cfg: &Config) -> Policy {
        Policy::from_delivery(&cfg.delivery)
    }

    /// The policy for the `[delivery]` settings.
    pub fn from_delivery(d: &DeliveryConfig) -> Policy {
        let cap = Duration::from_millis(d.backoff_cap_ms.max(1));
        let window = d.window.max(1) as usize;
        Policy {
            backoff_base: Duration::from_millis(d.backoff_base_ms.max(1)),
            backoff_cap: cap,
            jitter_floor: super::backoff::JITTER_FLOOR,
            drain_budget: Duration::from_secs(10),
            hold_recheck: Duration::from_secs(60).min(cap),
            forbidden_run: 3,
            max_age: Duration::from_secs(d.max_age_secs),
            window,
            order_scan: (window * 2).max(32),
            dependency_wait: Duration::from_secs(300),
        }
    }
}

impl Default for Policy {
    /// The policy of the default configuration.
    fn default() -> Self {
        Policy::from_delivery(&DeliveryConfig::default())
    }
}
