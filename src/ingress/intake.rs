//! Group commit of inbound events: many requests, one INSERT and one pipelined XADD.
//!
//! Each accepted `POST /event` hands its envelope to the intake and waits for the
//! outcome. Writer tasks take whatever is waiting — up to [`MAX_BATCH`], gathering for at
//! most [`LINGER`] — store it with one multi-row insert, push the verify jobs of the new
//! rows in one Redis round trip, and answer every request of the batch. Under heavy load
//! batches fill by themselves, which is what lets one Postgres take thousands of events a
//! second; at a steady rate the linger is what makes them more than one event each.
//!
//! Every request is answered only after its row is committed and its job pushed (or the
//! push failed and was logged: the reconciler pushes it later), exactly as a lone insert
//! would be. A batch that fails is tried once more; if it fails again, each of its
//! requests gets the batch's error — a 503 the peer retries for a transient failure —
//! and nothing of it is stored.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot, Mutex};

use crate::protocol::{Envelope, ServerName};
use crate::queue::{JobQueue, QueueName, VerifyJob};
use crate::store::events::{self, EventStatus, NewEvent};
use crate::store::{PgPool, StoreError};

/// Most events stored by one statement.
pub const MAX_BATCH: usize = 256;
/// How long a writer gathers events before it writes what it has (a batch that fills
/// is written at once). At a steady 1 000 events/s without it nearly every event was its
/// own insert, commit and verify job; with it a batch holds about three, the ingress and
/// Postgres spend 7–15 % less CPU per event and the end-to-end p99 falls by a fifth, for
/// about 1.5 ms more at the ingress (docs/performance.md, eleventh round). Tokio's timer
/// has a 1 ms resolution: a lone event waits 1–2 ms.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
/// Writer tasks: while one writes a batch, another gathers the next.
const WRITERS: usize = 2;
/// Events waiting for a writer before new requests wait to hand theirs over.
const QUEUE_DEPTH: usize = 4 * MAX_BATCH;

struct Item {
    envelope: Envelope,
    received_from: ServerName,
    status: EventStatus,
    signature_checked: bool,
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

pub struct Intake {
    pool: PgPool,
    queue: JobQueue,
    /// Started on first use, on the runtime of the first request.
    tx: OnceLock<mpsc::Sender<Item>>,
}

impl Intake {
    pub fn new(pool: PgPool, queue: JobQueue) -> Self {
        Self {
            pool,
            queue,
            tx: OnceLock::new(),
        }
    }

    fn sender(&self) -> &mpsc::Sender<Item> {
        self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            let rx = Arc::new(Mutex::new(rx));
            for _ in 0..WRITERS {
                tokio::spawn(writer(rx.clone(), self.pool.clone(), self.queue.clone()));
            }
            tx
        })
    }

    /// Stores an inbound event (idempotently, see [`events::insert`]) and, when it is new
    /// and pending, pushes its verify job. `signature_checked`: its envelope signature
    /// was verified before storing (such a copy replaces an unchecked one). `true` when
    /// this call stored it.
    pub async fn store(
        &self,
        envelope: Envelope,
        received_from: ServerName,
        status: EventStatus,
        signature_checked: bool,
    ) -> Result<bool, StoreError> {
        let (reply, answer) = oneshot::channel();
        let item = Item {
            envelope,
            received_from,
            status,
            signature_checked,
            reply,
        };
        let stopped = || StoreError::Unavailable("the event intake has stopped".into());
        self.sender().send(item).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn writer(rx: Arc<Mutex<mpsc::Receiver<Item>>>, pool: PgPool, queue: JobQueue) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return; // every sender is gone: the app is shutting down
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + LINGER;
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(item)) => batch.push(item),
                        _ => break,
                    },
                }
            }
            batch
        };
        metrics::histogram!("parafed_intake_batch_size").record(batch.len() as f64);
        match write(&pool, &queue, &batch).await {
            Ok(inserted) => {
                for (item, inserted) in batch.into_iter().zip(inserted) {
                    let _ = item.reply.send(Ok(inserted));
                }
            }
            Err(e) => {
                for item in batch {
                    let _ = item.reply.send(Err(e.for_each_caller()));
                }
            }
        }
    }
}

async fn write(pool: &PgPool, queue: &JobQueue, batch: &[Item]) -> Result<Vec<bool>, StoreError> {
    let rows: Vec<NewEvent> = batch
        .iter()
        .map(|i| NewEvent {
            envelope: &i.envelope,
            received_from: Some(&i.received_from),
            status: i.status,
            signature_checked: i.signature_checked,
        })
        .collect();
    let insert = async || -> Result<Vec<bool>, StoreError> {
        let mut conn = pool.get().await?;
        events::insert(&mut conn, &rows).await
    };
    // A batch that failed for a reason that goes away (a deadlock with another batch, a
    // serialization failure, a dropped connection) is tried once more before its
    // requests are answered 503: the insert is idempotent.
    let inserted = match insert().await {
        Err(e) if matches!(e, StoreError::Transient(_) | StoreError::Query(_)) => {
            tracing::warn!(error = %e, events = rows.len(), "group commit failed; trying once more");
            insert().await?
        }
        r => r?,
    };
    // One verify job for the batch's new pending events: the worker then judges the
    // batch with a few statements, as it was stored with one.
    let new: Vec<String> = batch
        .iter()
        .zip(&inserted)
        .filter(|(i, new)| **new && i.status == EventStatus::Pending)
        .map(|(i, _)| i.envelope.event_id.to_string())
        .collect();
    let count = new.len();
    let jobs = VerifyJob::batches(new);
    // The rows are stored: if Redis is down now, the reconciler pushes the jobs later.
    if let Err(e) = queue.push_many(QueueName::Verify, &jobs).await {
        metrics::counter!("parafed_enqueue_failures_total", "queue" => "verify")
            .increment(count as u64);
        tracing::warn!(events = count, error = %e, "verify jobs not pushed; the reconciler will");
    }
    Ok(inserted)
}
