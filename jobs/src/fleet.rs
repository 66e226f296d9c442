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
use crate::stream::StreamConsumer;
use crate::{deliver, fanout, verify};

async fn verify_task(
    task: Queued<VerifyJob>,
    ctx: Data<Arc<Ctx>>,
    c: Data<StreamConsumer>,
) -> Result<(), JobError> {
    let r = verify::run(&ctx, &task.job).await;
    finish(&c, &task, r, "verify").await
}

async fn fanout_task(
    task: Queued<FanoutJob>,
    ctx: Data<Arc<Ctx>>,
    c: Data<StreamConsumer>,
) -> Result<(), JobError> {
    let r = fanout::run(&ctx, &task.job).await;
    finish(&c, &task, r, "fanout").await
}

async fn deliver_task(
    task: Queued<DeliverJob>,
    ctx: Data<Arc<Ctx>>,
    c: Data<StreamConsumer>,
) -> Result<(), JobError> {
    let r = deliver::run(&ctx, &task.job).await;
    finish(&c, &task, r, "deliver").await
}

/// Runs the given queues until `shutdown` resolves, then drains in-flight jobs.
pub async fn run(
    app: Arc<App>,
    queues: &[QueueName],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let worker_id = worker_identity();
    let ctx = Arc::new(Ctx {
        app: app.clone(),
        worker_id: worker_id.clone(),
    });
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
        consumer.batch = concurrency.max(1);
        consumer.min_idle = Duration::from_millis(app.cfg.worker.job_timeout_ms.max(1000));
        if let Err(e) = consumer.ensure_group().await {
            tracing::warn!(queue = q.as_str(), error = %e, "cannot create the consumer group yet; will retry");
        }
        let (ctx, wid) = (ctx.clone(), worker_id.clone());
        monitor = match q {
            QueueName::Verify => monitor.register(move |run| {
                WorkerBuilder::new(format!("{wid}-verify-{run}"))
                    .backend(backend::<VerifyJob>(consumer.clone()))
                    .concurrency(concurrency)
                    .data(ctx.clone())
                    .data(consumer.clone())
                    .build(verify_task)
            }),
            QueueName::Fanout => monitor.register(move |run| {
                WorkerBuilder::new(format!("{wid}-fanout-{run}"))
                    .backend(backend::<FanoutJob>(consumer.clone()))
                    .concurrency(concurrency)
                    .data(ctx.clone())
                    .data(consumer.clone())
                    .build(fanout_task)
            }),
            QueueName::Deliver => monitor.register(move |run| {
                WorkerBuilder::new(format!("{wid}-deliver-{run}"))
                    .backend(backend::<DeliverJob>(consumer.clone()))
                    .concurrency(concurrency)
                    .data(ctx.clone())
                    .data(consumer.clone())
                    .build(deliver_task)
            }),
        };
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let scheduler = tokio::spawn(crate::scheduler::run(ctx.clone(), stop_rx));
    tracing::info!(worker = %worker_id, queues = ?queues, concurrency, "parafed-worker running");
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        Ok(())
    };
    monitor.run_with_signal(signal).await?;
    let _ = scheduler.await;
    tracing::info!(worker = %worker_id, "parafed-worker stopped");
    Ok(())
}
