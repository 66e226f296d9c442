//! The operator's queue pause, as this worker process sees it.
//!
//! `parafed admin queues pause <queue>` sets a flag in Redis (`queue::admin`). Every
//! worker reads the flags every [`REFRESH`] (one `MGET`) into memory, where the fetch
//! loop (`backend`) checks them before taking jobs and a running drain (`deliver`)
//! checks them before each batch — so a pause stops the whole fleet within a second,
//! and costs nothing per job. While Redis cannot be read, the last known flags stand.
//!
//! The same loop writes the worker's heartbeat (`queue::heartbeat`): every
//! `heartbeat::EVERY_MS`, and at once when the flags it sees change, so `parafed admin
//! status` shows when a pause has reached every worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parafed::queue::heartbeat::{self, Heartbeat};
use parafed::queue::{JobQueue, QueueName};

/// How often the flags are read.
pub const REFRESH: Duration = Duration::from_millis(250);

/// The pause flags of every queue (cheap to clone).
#[derive(Clone, Default)]
pub struct Control {
    paused: Arc<[AtomicBool; 3]>,
}

fn index(q: QueueName) -> usize {
    QueueName::ALL.iter().position(|&x| x == q).unwrap_or(0)
}

impl Control {
    /// Whether an operator paused `q`.
    pub fn is_paused(&self, q: QueueName) -> bool {
        self.paused[index(q)].load(Ordering::Relaxed)
    }

    /// Reads the flags once; true when they changed.
    pub async fn refresh(&self, queue: &JobQueue) -> bool {
        let mut changed = false;
        match queue.paused().await {
            Ok(paused) => {
                for q in QueueName::ALL {
                    let now = paused.contains_key(&q);
                    let was = self.paused[index(q)].swap(now, Ordering::Relaxed);
                    if now != was {
                        changed = true;
                        tracing::info!(queue = q.as_str(), paused = now, "queue pause changed");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading the queue pause flags failed"),
        }
        changed
    }

    /// The queues seen paused.
    pub fn paused_queues(&self) -> Vec<String> {
        QueueName::ALL
            .into_iter()
            .filter(|&q| self.is_paused(q))
            .map(|q| q.as_str().to_owned())
            .collect()
    }

    /// Keeps the flags fresh and the heartbeat written until `stop` is set.
    pub async fn watch(
        self,
        queue: JobQueue,
        mut heartbeat: Heartbeat,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let every = Duration::from_millis(heartbeat::EVERY_MS);
        let mut last_beat: Option<Instant> = None;
        loop {
            let changed = self.refresh(&queue).await;
            if changed || last_beat.is_none_or(|t| t.elapsed() >= every) {
                heartbeat.paused = self.paused_queues();
                heartbeat.at_ms = chrono::Utc::now().timestamp_millis();
                match queue.beat(&heartbeat).await {
                    Ok(()) => last_beat = Some(Instant::now()),
                    Err(e) => tracing::debug!(error = %e, "writing the heartbeat failed"),
                }
            }
            tokio::select! {
                () = tokio::time::sleep(REFRESH) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
