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

/// Verify (and apply) a stored inbound event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyJob {
    pub event_id: String,
}

/// Write the outbound rows for an accepted event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanoutJob {
    pub event_id: String,
}

/// Drain a destination's backlog (one job per destination, not per row).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverJob {
    pub destination: String,
}
