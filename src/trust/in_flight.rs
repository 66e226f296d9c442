//! A cap on one peer's requests in flight at once, per ingress process.
//!
//! The rate limit bounds how many requests a peer makes per minute; this bounds how many
//! of its authenticated requests are being worked on at once (database reads, stores,
//! group commits), so one peer cannot take every connection's worth of work. The slot is
//! taken once the request is authenticated (its body is read by then, within the body
//! timeout) and held until the answer is ready. Counted in memory: it protects this process, and the
//! fleet's total is the cap times the number of ingress processes. Over the cap the
//! request is answered 429 with `Retry-After: 1`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Requests in flight per peer in this process.
#[derive(Clone, Default)]
pub struct InFlight {
    counts: Arc<Mutex<HashMap<String, u32>>>,
}

/// Held while a request is in flight; releases its slot when dropped.
pub struct Slot {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    peer: String,
}

impl InFlight {
    /// Takes a slot for `peer` unless it already has `cap` requests in flight.
    pub fn enter(&self, peer: &str, cap: u32) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(peer.to_owned()).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: self.counts.clone(),
            peer: peer.to_owned(),
        })
    }

    /// Requests of `peer` in flight now.
    pub fn current(&self, peer: &str) -> u32 {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Idle peers leave no entry: the map holds only peers with requests open.
                counts.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_peer_and_released_on_drop() {
        let f = InFlight::default();
        let a = f.enter("a.test", 2).unwrap();
        let b = f.enter("a.test", 2).unwrap();
        assert!(f.enter("a.test", 2).is_none());
        assert!(
            f.enter("b.test", 2).is_some(),
            "another peer is not affected"
        );
        drop(a);
        assert_eq!(f.current("a.test"), 1);
        let _c = f.enter("a.test", 2).unwrap();
        drop(b);
        drop(_c);
        assert_eq!(f.current("a.test"), 0);
        assert!(f.counts.lock().unwrap().is_empty());
    }
}
