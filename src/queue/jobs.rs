//! The jobs and their queues. A job names rows in Postgres; it never carries state that
//! exists only in Redis.

use serde::{Deserialize, Serialize};

/// The queues. Operators can run a worker process per queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueName {
    Verify,
    Fanout,
    Deliver,
}

impl QueueName {
    pub const ALL: [QueueName; 3] = [QueueName::Verify, QueueName::Fanout, QueueName::Deliver];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueName::Verify => "verify",
            QueueName::Fanout => "fanout",
            QueueName::Deliver => "deliver",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|q| q.as_str() == s)
    }
}

/// Most events one verify or fanout job carries. Producers split longer lists
/// ([`VerifyJob::batches`], [`FanoutJob::batches`]); the ingress's group commit, whose
/// batches are at most as long, pushes one job per batch.
pub const MAX_EVENTS_PER_JOB: usize = 256;

/// Verify (and apply) stored inbound events, in the order given (storage order).
///
/// A job carries the events of one group commit, so the worker judges and settles them
/// with a few statements per batch instead of several per event. Its JSON is
/// `{"event_ids": ["$a:x", …]}`; a job written as `{"event_id": "$a:x"}` (one event,
/// as parafed wrote them before batching) is read as a batch of one, so jobs queued by
/// an older process still run after an upgrade.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "EventsWire")]
pub struct VerifyJob {
    pub event_ids: Vec<String>,
}

/// Write the outbound rows of accepted events, in the order given (storage order).
/// Shape and compatibility as [`VerifyJob`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "EventsWire")]
pub struct FanoutJob {
    pub event_ids: Vec<String>,
}

/// Either job shape on the wire: the batch, or the single event of older producers.
#[derive(Deserialize)]
struct EventsWire {
    #[serde(default)]
    event_ids: Vec<String>,
    #[serde(default)]
    event_id: Option<String>,
}

impl EventsWire {
    fn ids(self) -> Vec<String> {
        let mut ids = self.event_ids;
        ids.extend(self.event_id);
        ids
    }
}

impl From<EventsWire> for VerifyJob {
    fn from(w: EventsWire) -> Self {
        VerifyJob { event_ids: w.ids() }
    }
}

impl From<EventsWire> for FanoutJob {
    fn from(w: EventsWire) -> Self {
        FanoutJob { event_ids: w.ids() }
    }
}

/// Splits `ids` into jobs of at most [`MAX_EVENTS_PER_JOB`], keeping their order.
fn split<J>(ids: Vec<String>, make: fn(Vec<String>) -> J) -> Vec<J> {
    ids.chunks(MAX_EVENTS_PER_JOB)
        .map(|c| make(c.to_vec()))
        .collect()
}

impl VerifyJob {
    /// The jobs for `ids` (none for an empty list).
    pub fn batches(ids: Vec<String>) -> Vec<VerifyJob> {
        split(ids, |event_ids| VerifyJob { event_ids })
    }
}

impl FanoutJob {
    /// The jobs for `ids` (none for an empty list).
    pub fn batches(ids: Vec<String>) -> Vec<FanoutJob> {
        split(ids, |event_ids| FanoutJob { event_ids })
    }
}

/// Drain a destination's backlog (one job per destination, not per row).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverJob {
    pub destination: String,
}

/// Jobs a worker read from a queue together may run as one: a job's cost is mostly per
/// batch (statements, round trips), and at a steady rate the ingress's group commits
/// are small, so when jobs queue up faster than they run, the worker joins them. Only
/// jobs read together, never ones retried after a failure (see the worker's backend),
/// so one job that keeps failing cannot hold back others.
pub trait Coalesce: Sized {
    /// Takes `other` into `self` (`None`), or gives it back when the two do not make
    /// one job: batches whose events together exceed [`MAX_EVENTS_PER_JOB`], drains of
    /// different destinations.
    fn absorb(&mut self, other: Self) -> Option<Self>;
}

fn absorb_events(mine: &mut Vec<String>, theirs: Vec<String>) -> Option<Vec<String>> {
    if mine.len() + theirs.len() > MAX_EVENTS_PER_JOB {
        return Some(theirs);
    }
    mine.extend(theirs);
    None
}

impl Coalesce for VerifyJob {
    fn absorb(&mut self, other: Self) -> Option<Self> {
        absorb_events(&mut self.event_ids, other.event_ids).map(|event_ids| VerifyJob { event_ids })
    }
}

impl Coalesce for FanoutJob {
    fn absorb(&mut self, other: Self) -> Option<Self> {
        absorb_events(&mut self.event_ids, other.event_ids).map(|event_ids| FanoutJob { event_ids })
    }
}

/// Two drains of one destination are one drain (the second would find the lease taken
/// or the backlog empty).
impl Coalesce for DeliverJob {
    fn absorb(&mut self, other: Self) -> Option<Self> {
        (other.destination != self.destination).then_some(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_carries_a_batch_and_reads_the_single_event_shape_too() {
        let j = VerifyJob {
            event_ids: vec!["$a:x".into(), "$b:x".into()],
        };
        let wire = serde_json::to_string(&j).unwrap();
        assert_eq!(wire, r#"{"event_ids":["$a:x","$b:x"]}"#);
        assert_eq!(serde_json::from_str::<VerifyJob>(&wire).unwrap(), j);
        let old: FanoutJob = serde_json::from_str(r#"{"event_id":"$a:x"}"#).unwrap();
        assert_eq!(old.event_ids, vec!["$a:x".to_owned()]);
        assert!(serde_json::from_str::<VerifyJob>("{}")
            .unwrap()
            .event_ids
            .is_empty());
    }

    #[test]
    fn batches_keep_order_and_bound_their_length() {
        let ids: Vec<String> = (0..MAX_EVENTS_PER_JOB * 2 + 1)
            .map(|i| format!("${i}:x"))
            .collect();
        let jobs = VerifyJob::batches(ids.clone());
        assert_eq!(
            jobs.iter().map(|j| j.event_ids.len()).collect::<Vec<_>>(),
            vec![MAX_EVENTS_PER_JOB, MAX_EVENTS_PER_JOB, 1]
        );
        let flat: Vec<String> = jobs.into_iter().flat_map(|j| j.event_ids).collect();
        assert_eq!(flat, ids);
        assert!(FanoutJob::batches(Vec::new()).is_empty());
    }

    #[test]
    fn jobs_read_together_join_up_to_the_batch_bound() {
        let ids =
            |r: std::ops::Range<usize>| -> Vec<String> { r.map(|i| format!("${i}:x")).collect() };
        let mut j = VerifyJob {
            event_ids: ids(0..2),
        };
        assert_eq!(
            j.absorb(VerifyJob {
                event_ids: ids(2..3)
            }),
            None
        );
        assert_eq!(j.event_ids, ids(0..3), "in the order read");
        // Exactly full is taken; one more is given back whole.
        let mut full = FanoutJob {
            event_ids: ids(0..MAX_EVENTS_PER_JOB - 1),
        };
        assert_eq!(
            full.absorb(FanoutJob {
                event_ids: ids(1000..1001)
            }),
            None
        );
        assert_eq!(full.event_ids.len(), MAX_EVENTS_PER_JOB);
        let back = full.absorb(FanoutJob {
            event_ids: ids(2000..2001),
        });
        assert_eq!(
            back,
            Some(FanoutJob {
                event_ids: ids(2000..2001)
            })
        );
        assert_eq!(full.event_ids.len(), MAX_EVENTS_PER_JOB);
        let d = |n: &str| DeliverJob {
            destination: n.into(),
        };
        let mut a = d("beta.test");
        assert_eq!(a.absorb(d("beta.test")), None);
        assert_eq!(a.absorb(d("gamma.test")), Some(d("gamma.test")));
    }
}
