//! The one place delivery backoff is computed.
//!
//! Exponential in the number of consecutive failures, from `base` up to `cap`, with
//! bounded jitter: the delay is drawn from [2d/3, d] where d = min(cap, base·2^(n−1)).
//! Jitter spreads the retries of many senders; keeping the lower two thirds fixed means a
//! peer's successive gaps always grow (the next gap is at least 4d/3 > d). Full jitter,
//! drawn from [0, d], could retry a dead peer almost at once after a long wait. A
//! `Retry-After` from the peer is honoured as a floor, clamped to `cap`.

use std::time::Duration;

use rand::Rng;

pub fn delay(
    failures: u32,
    base: Duration,
    cap: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let d = base.saturating_mul(1u32 << exp).min(cap);
    let floor = d * 2 / 3;
    let spread = (d - floor).as_millis().min(u128::from(u64::MAX)) as u64;
    let mut out = floor + Duration::from_millis(rand::rng().random_range(0..=spread));
    if let Some(ra) = retry_after {
        out = out.max(ra.min(cap));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(10);
        for _ in 0..200 {
            let d1 = delay(1, base, cap, None);
            let d2 = delay(2, base, cap, None);
            let d3 = delay(3, base, cap, None);
            assert!(d1 >= base * 2 / 3 && d1 <= base);
            assert!(d2 >= base * 4 / 3 && d2 <= base * 2);
            assert!(d3 >= base * 8 / 3 && d3 <= base * 4);
            assert!(d2 > d1 && d3 > d2, "successive delays always grow");
            assert!(delay(40, base, cap, None) <= cap);
        }
        assert!(delay(1, base, cap, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
        assert!(delay(1, base, cap, Some(Duration::from_secs(999))) <= cap);
    }
}
