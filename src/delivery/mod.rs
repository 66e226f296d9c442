//! What delivery decides, as functions over values: no I/O, no clock reads, no
//! randomness that a caller cannot pass in. The deliver job (`jobs/src/deliver.rs`) and
//! the local API's outbound invite / join / leave only do I/O around these rules.
//!
//! * [`policy`] — every retry constant and config-derived limit, in one struct;
//! * [`backoff`] — how long a destination waits after a failure;
//! * [`outcome`] — what an answer (or a send error) means: PROTOCOL.md "What a sender
//!   must treat as what";
//! * [`destination`] — a destination's state (healthy, backing off, held, paused) and
//!   its transitions;
//! * [`attempt`] — what the attempt log records about one request;
//! * [`explain`] — what happens next to an event at each destination, for operators;
//! * [`deferral`] — which of a room's events a destination's drain writes rows for when
//!   it catches up a deferral (fan-out left the destination out while it was down);
//! * [`order`] — which events may be in flight together: dependants after what they
//!   depend on (PROTOCOL.md "What a sender must treat as what", last paragraph).
//!
//! Shaped this way so the rules are table-tested on their own (`cargo test --lib
//! delivery`) and a newcomer can read them without reading SQL or HTTP code.

pub mod attempt;
pub mod backoff;
pub mod deferral;
pub mod destination;
pub mod explain;
pub mod order;
pub mod outcome;
pub mod policy;

pub use destination::{Destination, DestinationEvent, DestinationState};
pub use outcome::Outcome;
pub use policy::Policy;
