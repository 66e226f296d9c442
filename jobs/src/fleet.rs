//! Assembling a worker process: one apalis worker per queue, each over its own Redis
//! Stream consumer, plus the scheduler; all stopped together by one signal, in-flight jobs
//! finishing first.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{Data, Monitor, WorkerBuilder, WorkerBuilderExt};
use parafed::app::App;
use parafed::queue::{self, DeliverJob, FanoutJob, QueueName, VerifyJob};

use crate::backend::{backend, Queued};
use crate::context::{finish, worker_identity, Ctx, JobError};
use crate::{deliver, fanout, verify};
use parafed::queue::consume::StreamConsumer;

/// A job type and the handler that runs it.
trait Handler: serde::de::DeserializeOwned + queue::Coalesce + Send + Sync + Unpin + 'static {
    const QUEUE: QueueName;
    fn run(ctx: &Arc<Ctx>, job: &Self) -> impl Future<Output = Result<(), JobError>> + Send;
}

impl Handler for VerifyJob {
    const QUEUE: QueueName = QueueName::Verify;
    fn run(ctx: &Arc<Ctx>, job: &Self) -> impl Future<Output = Result<(), JobError>> + Send {
        verify::run(ctx, job)
    }
}

impl Handler for FanoutJob {
    const QUEUE: QueueName = QueueName::Fanout;
    fn run(ctx: &Arc<Ctx>, job: &Self) -> impl Future<Output = Result<(), JobError>> + Send {
        fanout::run(ctx, job)
    }
}

impl Handler for DeliverJob {
    const QUEUE: QueueName = QueueName::Deliver;
    fn run(ctx: &Arc<Ctx>, job: &Self) -> impl Future<Output = Result<(), JobError>> + Send {
        deliver::run(ctx, job)
    }
}

/// Runs one job and acknowledges it if it succeeded.
async fn task<J: Handler>(
    task: Queued<J>,
    ctx: Data<Arc<Ctx>>,
    c: Data<StreamConsumer>,
) -> Result<(), JobError> {
    let started = std::time::Instant::now();
    let r = J::run(&ctx, &task.job).await;
    metrics::histogram!("parafed_job_duration_seconds", "queue" => J::QUEUE.as_str())
        .record(started.elapsed().as_secs_f64());
    finish(&c, &task, r, J::QUEUE.as_str()).await
}

/// Adds the apalis worker for `J`'s queue (restarted with a new run number if it stops).
fn register<J: Handler>(
    monitor: Monitor,
    worker_id: &str,
    consumer: StreamConsumer,
    ctx: Arc<Ctx>,
    concurrency: usize,
) -> Monitor {
    let worker_id = worker_id.to_owned();
    monitor.register(move |run| {
        WorkerBuilder::new(format!("{worker_id}-{}-{run}", J::QUEUE.as_str()))
            .backend(backend::<J>(
                consumer.clone(),
                ctx.control.clone(),
                J::QUEUE,
            ))
            // A handler that panics fails its job (left unacknowledged, so it is retried
            // and, after 20 deliveries, moved to the dead stream) instead of taking the
            // worker down with it.
            .catch_panic()
            .concurrency(concurrency)
            .data(ctx.clone())
            .data(consumer.clone())
            .build(task::<J>)
    })
}

/// Runs the given queues until `shutdown` resolves, then drains in-flight jobs.
pub async fn run(
    app: Arc<App>,
    queues: &[QueueName],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let worker_id = worker_identity();
    let ctx = Arc::new(Ctx::new(app.clone(), worker_id.clone()));
    // Reported from the start, so a scrape shows it before the first round.
    ctx.note_requests_in_flight();
    // Know the pauses before taking the first job.
    ctx.control.refresh(&app.queue).await;
    let concurrency = app.cfg.worker.concurrency as usize;
    let mut monitor = Monitor::new().shutdown_timeout(Duration::from_secs(30)).should_restart(|w, e| {
        tracing::warn!(worker = %w.name(), error = %e, "worker stopped with an error; restarting");
        true
    });
    for &q in queues {
        let reader = queue::connect(&app.cfg.redis.url)?;
        let mut consumer = StreamConsumer::new(
            reader,
            app.redis.clone(),
            app.keys.queue(q),
            app.keys.dead(q),
            format!("{worker_id}-{}", q.as_str()),
        );
        // Drains wait on peers, not on this machine: many run at once (see
        // `worker.deliver_concurrency`); verify and fanout use the CPU and the database.
        let n = match q {
            QueueName::Deliver => app.cfg.worker.deliver_concurrency as usize,
            QueueName::Verify | QueueName::Fanout => concurrency,
        };
        // Entries read ahead are this worker's until it starts them: read a bounded
        // number, so a busy worker does not hoard what an idle one could run. Verify
        // and fanout jobs read together run as one (`backend`), so those queues read as
        // many as one run takes: the read is the batch.
        consumer.batch = match q {
            QueueName::Deliver => n.clamp(1, 64),
            QueueName::Verify | QueueName::Fanout => 64,
        };
        // Verify jobs read together run as one: at a steady rate a read waits a moment
        // for the next group commit's job (`verify::LINGER`).
        if q == QueueName::Verify {
            consumer.linger = crate::verify::LINGER;
        }
        consumer.min_idle = Duration::from_millis(app.cfg.worker.job_timeout_ms.max(1000));
        if let Err(e) = consumer.ensure_group().await {
            tracing::warn!(queue = q.as_str(), error = %e, "cannot create the consumer group yet; will retry");
        }
        let (ctx, id) = (ctx.clone(), worker_id.as_str());
        monitor = match q {
            QueueName::Verify => register::<VerifyJob>(monitor, id, consumer, ctx, n),
            QueueName::Fanout => register::<FanoutJob>(monitor, id, consumer, ctx, n),
            QueueName::Deliver => register::<DeliverJob>(monitor, id, consumer, ctx, n),
        };
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let scheduler = tokio::spawn(crate::scheduler::run(ctx.clone(), stop_rx.clone()));
    // The prober runs where drains run.
    let prober = queues
        .contains(&QueueName::Deliver)
        .then(|| tokio::spawn(crate::probe::run(ctx.clone(), stop_rx.clone())));
    let heartbeat = parafed::queue::heartbeat::Heartbeat {
        role: "worker".into(),
        id: worker_id.clone(),
        queues: queues.iter().map(|q| q.as_str().to_owned()).collect(),
        paused: Vec::new(),
        version: env!("CARGO_PKG_VERSION").into(),
        at_ms: 0,
    };
    let control = tokio::spawn(
        ctx.control
            .clone()
            .watch(app.queue.clone(), heartbeat, stop_rx),
    );
    // Trust changes made anywhere in the fleet reach this process within a tick.
    let trust_watch = tokio::spawn(parafed::trust::Trust::watch(app.clone()));
    tracing::info!(worker = %worker_id, queues = ?queues, concurrency, "parafed-worker running");
    let stopping = ctx.stopping.clone();
    let signal = async move {
        shutdown.await;
        stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = stop_tx.send(true);
        Ok(())
    };
    monitor.run_with_signal(signal).await?;
    // Probing drains end their round and hand their destination back; a probe or drain
    // still waiting for a peer after this is cut off (its attempt is closed as
    // interrupted by the next drain, as after a crash).
    if let Some(prober) = prober {
        let _ = prober.await;
    }
    ctx.background.close();
    if tokio::time::timeout(Duration::from_secs(30), ctx.background.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            drains = ctx.background.len(),
            "probing drains still waiting for their peers; stopping without them"
        );
    }
    crate::backend::finish_hand_backs(Duration::from_secs(5)).await;
    let _ = scheduler.await;
    let _ = control.await;
    trust_watch.abort();
    tracing::info!(worker = %worker_id, "parafed-worker stopped");
    Ok(())
}
