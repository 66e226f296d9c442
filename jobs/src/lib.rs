//! parafed's background work: the job handlers (verify, fanout, deliver), the scheduler
//! that retries, drains and reconciles, the apalis backend they run on, and the fleet
//! assembly the `parafed-worker` binary runs.

pub mod backend;
pub mod context;
pub mod control;
pub mod deliver;
pub mod fanout;
pub mod fleet;
pub mod gauges;
pub mod probe;
pub mod probe_queue;
pub mod scheduler;
pub mod verify;
