//! What every handler shares: the application state, this worker's identity, and the
//! acknowledgement of finished jobs.

use std::sync::Arc;

use parafed::app::App;

use crate::backend::Queued;
use parafed::queue::consume::StreamConsumer;

/// Shared by all handlers of one worker process.
pub struct Ctx {
    pub app: Arc<App>,
    /// Unique per process start (`<host>-<pid>-<random>`): names Redis consumers, and
    /// prefixes destination lease owners (which add a per-job-run suffix).
    pub worker_id: String,
    /// The delivery rules' numbers, from the configuration.
    pub policy: parafed::delivery::Policy,
    /// The operator's queue pauses, as last read.
    pub control: crate::control::Control,
    /// Drains that may probe at once (`worker.probe_concurrency`): see `deliver`.
    pub probes: Arc<tokio::sync::Semaphore>,
    /// The delivery requests this process's drains may have in flight, all destinations
    /// together (`worker.max_requests_in_flight`): a round takes one permit per request
    /// before its attempts are begun and returns them when its answers are in (`deliver`).
    pub requests: Arc<tokio::sync::Semaphore>,
    /// Destinations handed over for a probe, each with its permit (`probe`).
    pub probing: crate::probe_queue::Probes,
    /// The probe rounds and probing drains, which run outside any job: the fleet waits
    /// for them when it stops.
    pub background: tokio_util::task::TaskTracker,
    /// Set when the fleet starts stopping: drains end their round and hand the
    /// destination back (released lease, scheduled again).
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Ctx {
    /// The context of a worker process named `worker_id`, its numbers from `app`'s
    /// configuration.
    pub fn new(app: Arc<App>, worker_id: String) -> Ctx {
        Ctx {
            policy: parafed::delivery::Policy::from_config(&app.cfg),
            probes: Arc::new(tokio::sync::Semaphore::new(
                app.cfg.worker.probe_concurrency as usize,
            )),
            requests: Arc::new(tokio::sync::Semaphore::new(
                app.cfg.worker.max_requests_in_flight as usize,
            )),
            app,
            worker_id,
            control: crate::control::Control::default(),
            probing: crate::probe_queue::Probes::default(),
            background: tokio_util::task::TaskTracker::new(),
            stopping: Arc::default(),
        }
    }
}

/// The error type handlers return; a job that failed runs again after its backoff
/// ([`finish`]).
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

/// Acknowledges a job whose handler succeeded (every entry it was joined from); leaves
/// it pending otherwise, its error noted on each entry.
///
/// A joined job that failed does not say which of its jobs failed (verify settles every
/// event it could judge and fails for the rest): its entries are handed back at once,
/// marked idle, so the next claim round (seconds, not `job_timeout_ms`) runs each alone
/// — those already settled finish at once, and only the one that fails again waits for
/// its retry. A job of one entry that failed runs again after its backoff
/// (`StreamConsumer::retry_later`: seconds for the first retries, doubling up to
/// `job_timeout_ms`), not after `job_timeout_ms`, the wait for a worker that died.
pub async fn finish<J>(
    consumer: &StreamConsumer,
    q: &Queued<J>,
    result: Result<(), JobError>,
    queue: &'static str,
) -> Result<(), JobError> {
    let ids: Vec<&str> = q.entry_ids.iter().map(String::as_str).collect();
    // For the log lines, which only the failures write.
    let entries = || ids.join(",");
    match result {
        Ok(()) => {
            metrics::counter!("parafed_jobs_total", "queue" => queue, "outcome" => "ok")
                .increment(ids.len() as u64);
            if let Err(e) = consumer.ack_all(&ids).await {
                // The job is done; an unacked entry only means it may run once more.
                tracing::warn!(entries = entries(), error = %e, "ack failed");
            }
            Ok(())
        }
        Err(e) => {
            metrics::counter!("parafed_jobs_total", "queue" => queue, "outcome" => "error")
                .increment(ids.len() as u64);
            tracing::warn!(queue, entries = entries(), error = %e, "job failed; it will be retried");
            if let Err(re) = consumer.note_errors(&ids, &e.to_string()).await {
                tracing::debug!(entries = entries(), error = %re, "recording the job's error failed");
            }
            match q.entry_ids.as_slice() {
                [one] => match consumer.retry_later(one).await {
                    Ok(Some(wait)) => {
                        tracing::debug!(entry = %one, retry_in = ?wait, "job scheduled to run again")
                    }
                    Ok(None) => {}
                    Err(re) => {
                        tracing::debug!(entries = entries(), error = %re, "scheduling the retry failed; the job is claimed after the idle timeout")
                    }
                },
                _ => {
                    if let Err(re) = consumer.hand_back(&q.entry_ids).await {
                        tracing::debug!(entries = entries(), error = %re, "handing a joined job back failed; its entries are claimed after the idle timeout");
                    }
                }
            }
            Err(e)
        }
    }
}

/// A worker identity unique to this process start.
pub fn worker_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let r: u32 = rand::random();
    format!("{host}-{}-{r:08x}", std::process::id())
}

impl Ctx {
    /// Reports the delivery requests this process's drains have out now
    /// (`parafed_delivery_requests_in_flight`): the budget's permits in use.
    pub fn note_requests_in_flight(&self) {
        let budget = self.app.cfg.worker.max_requests_in_flight as usize;
        let out = budget.saturating_sub(self.requests.available_permits());
        metrics::gauge!("parafed_delivery_requests_in_flight").set(out as f64);
    }

    /// True once the fleet is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }
}
