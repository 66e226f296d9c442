//! The apalis backend over a Redis Stream consumer group.
//!
//! apalis's stock Redis storage retries failed tasks by itself (linearly, 25 times),
//! polls on a 30 s heartbeat, dies on large due sets and loses the data of tasks still
//! retrying (see docs/architecture.md). parafed keeps apalis's worker, monitor and layers
//! and supplies this backend instead: a `CustomBackend` whose fetch stream is the
//! [`StreamConsumer`]. The stream never ends and never yields an error — apalis would
//! stop the worker on either — it logs Redis failures and retries with backoff.
//!
//! While an operator has paused the queue (`crate::control`) the stream takes nothing.
//!
//! A task carries its stream entry ids; the handler acknowledges them when it has
//! finished (see [`crate::context::finish`]). Retry timing is parafed's own: a failed
//! job is not acknowledged, and is marked so that a claim round takes it again after its
//! backoff (`StreamConsumer::retry_later`); one whose worker died, after the idle
//! timeout.
//!
//! Jobs read together are joined into one task where their type allows
//! ([`Coalesce`]): under load the verify queue fills with small batches (one per group
//! commit at the ingress), and one run over their union costs the statements of one.
//! Entries claimed after a failure run alone, so a job that keeps failing holds back
//! nobody else's.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::{Duration, Instant};

use apalis::prelude::{BackendBuilder, BoxDynError, CustomBackend, Task};
use futures::stream::BoxStream;
use futures::{Sink, SinkExt, StreamExt};
use serde::de::DeserializeOwned;

use parafed::queue::consume::StreamConsumer;
use parafed::queue::{Coalesce, QueueName};

use crate::control::Control;

/// How often a consumer looks for entries abandoned by dead workers.
const CLAIM_EVERY: Duration = Duration::from_secs(5);

/// A job as a handler receives it: the stream entries it came from (several when jobs
/// read together were joined) and the job itself.
#[derive(Clone, Debug)]
pub struct Queued<J> {
    pub entry_ids: Vec<String>,
    pub job: J,
}

type Fetch<J> = BoxStream<'static, Result<Option<Task<Queued<J>>>, BoxDynError>>;
type Push<J> = Pin<Box<dyn Sink<Task<Queued<J>>, Error = BoxDynError> + Send>>;

/// The backend type for jobs of type `J`.
pub type StreamBackend<J> = CustomBackend<Queued<J>, StreamConsumer, Fetch<J>, Push<J>>;

struct State {
    consumer: StreamConsumer,
    control: Control,
    queue: QueueName,
    /// Entries read and not started yet; the flag says read fresh (may be joined with
    /// the next ones) rather than claimed after a failure.
    buffer: VecDeque<(parafed::queue::consume::Entry, bool)>,
    last_claim: Instant,
    failures: u32,
}

/// Hand-backs started by stopping workers; [`finish_hand_backs`] waits for them.
static HAND_BACKS: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

impl Drop for State {
    /// apalis drops the fetch stream when the worker stops. Entries read but not started
    /// are handed back so another worker takes them now, not a `job_timeout` later.
    fn drop(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let ids: Vec<String> = self.buffer.drain(..).map(|(e, _)| e.id).collect();
        let consumer = self.consumer.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // no runtime left: the entries are claimed after the idle timeout
        };
        let task = rt.spawn(async move {
            match consumer.hand_back(&ids).await {
                Ok(()) => tracing::info!(count = ids.len(), "handed unstarted jobs back"),
                Err(e) => tracing::warn!(error = %e, "handing jobs back failed; they are claimed after the idle timeout"),
            }
        });
        HAND_BACKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }
}

/// Waits (at most `limit`) for the hand-backs of stopped workers to reach Redis.
pub async fn finish_hand_backs(limit: Duration) {
    let tasks: Vec<_> = HAND_BACKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .collect();
    let _ = tokio::time::timeout(limit, futures::future::join_all(tasks)).await;
}

fn fetch<J: DeserializeOwned + Coalesce + Send + 'static>(
    consumer: StreamConsumer,
    control: Control,
    queue: QueueName,
) -> Fetch<J> {
    let state = State {
        consumer,
        control,
        queue,
        buffer: VecDeque::new(),
        last_claim: Instant::now() - CLAIM_EVERY,
        failures: 0,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.control.is_paused(st.queue) {
                // Paused by an operator: take nothing (jobs already read stay buffered,
                // pending in the group, and run after the resume).
                tokio::time::sleep(crate::control::REFRESH).await;
                continue;
            }
            if let Some((e, fresh)) = st.buffer.pop_front() {
                match serde_json::from_slice::<J>(&e.payload) {
                    Ok(mut job) => {
                        let mut entry_ids = vec![e.id];
                        if fresh {
                            join_following(&mut st.buffer, &mut job, &mut entry_ids);
                        }
                        let task = Task::new(Queued { entry_ids, job });
                        return Some((Ok(Some(task)), st));
                    }
                    Err(err) => {
                        tracing::error!(entry = %e.id, error = %err, "undecodable job dropped");
                        let _ = st.consumer.ack(&e.id).await;
                        continue;
                    }
                }
            }
            if st.last_claim.elapsed() >= CLAIM_EVERY {
                st.last_claim = Instant::now();
                match st.consumer.claim_stale().await {
                    Ok((v, more)) => {
                        if more && !v.is_empty() {
                            // Claim again once these are worked through.
                            st.last_claim = Instant::now() - CLAIM_EVERY;
                        }
                        if !v.is_empty() {
                            tracing::info!(count = v.len(), "claimed abandoned jobs");
                            st.buffer.extend(v.into_iter().map(|e| (e, false)));
                            continue;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming abandoned jobs failed"),
                }
            }
            match st.consumer.read().await {
                Ok(v) => {
                    st.failures = 0;
                    st.buffer.extend(v.into_iter().map(|e| (e, true)));
                }
                Err(e) => {
                    st.failures = st.failures.saturating_add(1);
                    let wait = Duration::from_millis(100u64 << st.failures.min(6)).min(Duration::from_secs(5));
                    tracing::warn!(error = %e, retry_in = ?wait, "reading the queue failed; retrying");
                    metrics::counter!("parafed_queue_read_errors_total").increment(1);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    })
    .boxed()
}

/// Joins the fresh entries at the front of `buffer` into `job` while they decode and
/// fit ([`Coalesce::absorb`]); the first that does not stays where it is.
fn join_following<J: DeserializeOwned + Coalesce>(
    buffer: &mut VecDeque<(parafed::queue::consume::Entry, bool)>,
    job: &mut J,
    entry_ids: &mut Vec<String>,
) {
    while let Some((next, true)) = buffer.front() {
        let Ok(other) = serde_json::from_slice::<J>(&next.payload) else {
            return; // dropped (and acknowledged) when its turn comes
        };
        if job.absorb(other).is_some() {
            return;
        }
        if let Some((e, _)) = buffer.pop_front() {
            entry_ids.push(e.id);
        }
    }
}

/// Builds the backend for one queue consumer.
pub fn backend<J: DeserializeOwned + Coalesce + Send + 'static>(
    consumer: StreamConsumer,
    control: Control,
    queue: QueueName,
) -> StreamBackend<J> {
    BackendBuilder::new()
        .database(consumer)
        .fetcher(move |c: &mut StreamConsumer, _: &(), _| {
            fetch::<J>(c.clone(), control.clone(), queue)
        })
        .sink(|_: &mut StreamConsumer, _: &()| -> Push<J> {
            // Jobs are pushed with parafed's JobQueue, never through apalis.
            Box::pin(
                futures::sink::drain()
                    .sink_map_err(|e: std::convert::Infallible| -> BoxDynError { match e {} }),
            )
        })
        .build()
        .unwrap_or_else(|e| unreachable!("every part of the backend is set: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use parafed::queue::consume::Entry;
    use parafed::queue::VerifyJob;

    fn entry(id: &str, payload: &str, fresh: bool) -> (Entry, bool) {
        (
            Entry {
                id: id.into(),
                payload: payload.as_bytes().to_vec(),
            },
            fresh,
        )
    }

    fn job(ids: &[&str]) -> String {
        serde_json::to_string(&VerifyJob {
            event_ids: ids.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    /// Joins what follows the first job in `buffer` into it; returns the entry ids
    /// taken, the job, and the ids left in the buffer.
    fn join(mut buffer: VecDeque<(Entry, bool)>) -> (Vec<String>, VerifyJob, Vec<String>) {
        let (first, _) = buffer.pop_front().unwrap();
        let mut j: VerifyJob = serde_json::from_slice(&first.payload).unwrap();
        let mut ids = vec![first.id];
        join_following(&mut buffer, &mut j, &mut ids);
        let left = buffer.into_iter().map(|(e, _)| e.id).collect();
        (ids, j, left)
    }

    #[test]
    fn fresh_jobs_read_together_are_joined_in_order() {
        let buffer = VecDeque::from(vec![
            entry("1-0", &job(&["$a:x"]), true),
            entry("2-0", &job(&["$b:x", "$c:x"]), true),
            entry("3-0", &job(&["$d:x"]), true),
        ]);
        let (ids, j, left) = join(buffer);
        assert_eq!(ids, ["1-0", "2-0", "3-0"]);
        assert_eq!(j.event_ids, ["$a:x", "$b:x", "$c:x", "$d:x"]);
        assert!(left.is_empty());
    }

    #[test]
    fn a_claimed_entry_an_undecodable_one_or_a_full_batch_ends_the_join() {
        // A claimed entry (retried after a failure) runs alone.
        let (ids, _, left) = join(VecDeque::from(vec![
            entry("1-0", &job(&["$a:x"]), true),
            entry("2-0", &job(&["$b:x"]), false),
            entry("3-0", &job(&["$c:x"]), true),
        ]));
        assert_eq!(
            (ids, left),
            (
                vec!["1-0".to_owned()],
                vec!["2-0".to_owned(), "3-0".to_owned()]
            )
        );
        // An undecodable entry stays for its own turn (acknowledged and dropped there).
        let (ids, _, left) = join(VecDeque::from(vec![
            entry("1-0", &job(&["$a:x"]), true),
            entry("2-0", "{not json", true),
        ]));
        assert_eq!(
            (ids, left),
            (vec!["1-0".to_owned()], vec!["2-0".to_owned()])
        );
        // A job that would pass the batch bound stays whole for the next run.
        let many: Vec<String> = (0..parafed::queue::jobs::MAX_EVENTS_PER_JOB)
            .map(|i| format!("${i}:x"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let (ids, j, left) = join(VecDeque::from(vec![
            entry("1-0", &job(&many[..200]), true),
            entry("2-0", &job(&many[200..]), true),
            entry("3-0", &job(&["$z:x"]), true),
        ]));
        assert_eq!(ids, ["1-0", "2-0"]);
        assert_eq!(j.event_ids.len(), parafed::queue::jobs::MAX_EVENTS_PER_JOB);
        assert_eq!(left, ["3-0"]);
    }
}
