//! The hand-over between those who find a destination to probe (a deliver job, a
//! fan-out that wrote a new destination's probe row) and the prober (`probe::run`),
//! which takes what was handed over in rounds.
//!
//! Apart from the prober, so that the worker's shared context can hold it without
//! knowing how a round works: a destination, its probe permit, and the set of
//! destinations handed over and not done yet, so none is probed twice at once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use parafed::protocol::ServerName;
use tokio::sync::OwnedSemaphorePermit;

/// Destinations handed over for a probe, each with its probe permit, until the prober
/// takes them (`probe::run`).
#[derive(Default)]
pub struct Probes {
    queue: Mutex<Vec<(ServerName, Ticket)>>,
    wake: tokio::sync::Notify,
    /// Set while this process runs the deliver queue (and so a prober).
    running: AtomicBool,
    /// Destinations handed over and not done yet (queued, in a round, or drained alone
    /// after it): handed over again meanwhile, they are not probed twice.
    busy: Arc<Mutex<HashSet<String>>>,
}

/// A destination's place in the prober: its probe permit, and its name in
/// [`Probes::busy`] until dropped.
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
    name: String,
    busy: Arc<Mutex<HashSet<String>>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// What [`Probes::push`] did with a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handover {
    /// Queued for the next round.
    Queued,
    /// Already handed over and not done: that probe's outcome brings the destination
    /// back (to the deliver queue if it answered, to the scheduler when its backoff
    /// ends); rows written meanwhile wait for that, or for the scheduler's next tick.
    Busy,
    /// No prober runs here (this process does not deliver, or stops): a worker that
    /// runs one brings the destination back.
    NoProber,
}

impl Probes {
    /// Whether a prober takes what is handed over (this process runs the deliver
    /// queue and is not stopping).
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Set by the prober when it starts and stops.
    pub(crate) fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Relaxed);
    }

    /// Waits until something was handed over since the last wait.
    pub(crate) async fn handed_over(&self) {
        self.wake.notified().await
    }

    /// Hands `dest` over with its permit, held until its probe is recorded (see
    /// [`Handover`] for when it is not taken; the permit is then given back).
    pub fn push(&self, dest: ServerName, permit: OwnedSemaphorePermit) -> Handover {
        if !self.running.load(Ordering::Relaxed) {
            return Handover::NoProber;
        }
        let name = dest.as_str().to_owned();
        if !self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone())
        {
            return Handover::Busy;
        }
        let ticket = Ticket {
            _permit: permit,
            name,
            busy: self.busy.clone(),
        };
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((dest, ticket));
        self.wake.notify_one();
        Handover::Queued
    }

    /// Everything handed over so far, for a round.
    pub(crate) fn take(&self) -> Vec<(ServerName, Ticket)> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
