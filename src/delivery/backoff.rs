//! The one place delivery backoff is computed.
//!
//! Exponential in the number of consecutive failures, from `base` up to `cap`, with
//! bounded jitter: the delay is drawn from [2d/3, d] where d = min(cap, base·2^(n−1)).
//! Jitter spreads the retries of many senders; keeping the lower two thirds fixed means a
//! peer's successive gaps grow until they reach the cap (the next gap is at least
//! 4d/3 > d). Full jitter,
//! drawn from [0, d], could retry a dead peer almost at once after a long wait. A
//! `Retry-After` from the peer (RFC 9110 §10.2.3) is a floor, clamped to `cap`.
//!
//! The owner's list named the `backoff` crate; it is unmaintained (RUSTSEC-2025-0012) and
//! its jittered schedule cannot promise growing gaps, so this small function stands in
//! for it (docs/architecture.md, "Dependencies").

use std::time::Duration;

use super::Policy;

/// The lowest fraction of a step jitter may draw, as (numerator, denominator): a delay is
/// drawn from `[2d/3, d]`, which keeps successive gaps growing (module doc). Delivery's
/// `Policy::jitter_floor` and the job queue's retries (`queue::consume::retry_delay`)
/// both take it from here.
pub const JITTER_FLOOR: (u32, u32) = (2, 3);

/// The wait after the `failures`-th consecutive failure (1 = the first).
///
/// `jitter` in `[0, 1]` picks the point in `[floor·d, d]` (callers pass a random draw;
/// tests pass fixed values). `retry_after` is the peer's own floor, clamped to the cap.
pub fn delay(
    policy: &Policy,
    failures: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let out = exponential(
        policy.backoff_base,
        policy.backoff_cap,
        policy.jitter_floor,
        failures,
        jitter,
    );
    match retry_after {
        Some(ra) => out.max(ra.min(policy.backoff_cap)),
        None => out,
    }
}

/// The schedule itself, for any caller that retries: d = min(`cap`, `base`·2^(n−1))
/// after the n-th consecutive failure (`failures` 0 counts as 1), drawn from
/// `[floor·d, d]` where `floor` = `jitter_floor.0 / jitter_floor.1` and `jitter` in
/// `[0, 1]` picks the point. Delivery uses it through [`delay`]; the job queue for a job
/// that failed (`queue::consume::StreamConsumer::retry_later`).
pub fn exponential(
    base: Duration,
    cap: Duration,
    jitter_floor: (u32, u32),
    failures: u32,
    jitter: f64,
) -> Duration {
    let exp = failures.max(1).saturating_sub(1).min(30);
    let d = base.saturating_mul(1u32 << exp).min(cap);
    let (n, m) = jitter_floor;
    let floor = d * n / m.max(1);
    let spread = d.saturating_sub(floor);
    floor + spread.mul_f64(jitter.clamp(0.0, 1.0))
}

/// A uniform draw in `[0, 1]` for [`delay`]'s jitter.
pub fn random_jitter() -> f64 {
    rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(10),
            ..Policy::default()
        }
    }

    #[test]
    fn grows_and_is_capped() {
        let p = policy();
        let ms = Duration::from_millis;
        // (failures, jitter, expected)
        let table = [
            (1, 0.0, ms(66)),
            (1, 1.0, ms(100)),
            (2, 0.0, ms(133)),
            (2, 1.0, ms(200)),
            (3, 0.0, ms(266)),
            (3, 1.0, ms(400)),
            (40, 1.0, Duration::from_secs(10)),
            (0, 1.0, ms(100)),
        ];
        for (failures, jitter, want) in table {
            let got = delay(&p, failures, None, jitter);
            assert!(
                got.abs_diff(want) <= ms(1),
                "failures {failures}, jitter {jitter}: {got:?} != {want:?}"
            );
        }
        // Successive gaps always grow, whatever the draws.
        for _ in 0..200 {
            let d1 = delay(&p, 1, None, random_jitter());
            let d2 = delay(&p, 2, None, random_jitter());
            let d3 = delay(&p, 3, None, random_jitter());
            assert!(d2 > d1 && d3 > d2, "{d1:?} {d2:?} {d3:?}");
        }
    }

    #[test]
    fn retry_after_is_a_floor_clamped_to_the_cap() {
        let p = policy();
        let three = Duration::from_secs(3);
        assert_eq!(delay(&p, 1, Some(three), 0.5), three);
        assert_eq!(
            delay(&p, 1, Some(Duration::from_secs(999)), 0.5),
            p.backoff_cap
        );
        // A Retry-After shorter than the backoff does not shorten it.
        assert!(delay(&p, 3, Some(Duration::from_millis(1)), 0.0) >= Duration::from_millis(266));
    }
}
