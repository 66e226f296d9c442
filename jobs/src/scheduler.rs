//! The periodic duties every worker process runs (safe to run in all of them at once):
//!
//! * **retry / drain** — destinations whose backoff ended, and destinations with waiting
//!   rows and no drain in progress, get a deliver job (deduplicated in Redis; the drain
//!   lease keeps one drain per destination), or, when their next step is a probe, go
//!   straight to this worker's prober (`probe`);
//! * **reconcile** — events stored but never verified, and accepted events never fanned
//!   out, whose job Redis lost (it is older than `stale_after` and than every job still
//!   in its stream; see [`reconcile`]), are pushed again (rows are claimed with
//!   `SKIP LOCKED`, so workers split them). A job a dead worker held is not lost: it stays
//!   in the stream and another worker claims it after `job_timeout`;
//! * **gauges** — queue depths, destination states, the backlog (see `gauges`), every
//!   `gauges_interval_ms`, and this worker's heartbeat every tick;
//! * **expire and prune** — outbound rows older than the maximum age become dead;
//!   quarantines past their end time end (their held events are processed);
//!   attempts, finished rows and local transactions older than `retention_secs` are
//!   deleted (replay entries expire in Redis by themselves; acknowledged jobs are deleted
//!   from their stream at once);
//! * **statistics** — the fast-growing tables are analyzed once they may have doubled or
//!   emptied since their statistics were taken, every `STATISTICS_EVERY`, without
//!   waiting for autovacuum (`store::statistics`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parafed::delivery::destination::Sending;
use parafed::delivery::Destination;
use parafed::queue::{FanoutJob, QueueName, VerifyJob};
use parafed::store::{destinations, events, retention, statistics};

use crate::context::Ctx;

const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// How often the tables' change counters are looked at (`store::statistics`): one read
/// of `pg_stat_user_tables`, whose counters Postgres itself updates about once a second.
const STATISTICS_EVERY: Duration = Duration::from_secs(1);

pub async fn run(ctx: Arc<Ctx>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let cfg = &ctx.app.cfg.worker;
    let tick = Duration::from_millis(cfg.scheduler_interval_ms.max(10));
    let reconcile_every = Duration::from_millis(cfg.reconcile_interval_ms.max(10));
    let mut last_reconcile = Instant::now() - reconcile_every;
    let mut last_expire = Instant::now() - EXPIRE_EVERY;
    let mut last_statistics = Instant::now();
    let mut statistics_task = None;
    let gauges_every = Duration::from_millis(cfg.gauges_interval_ms.max(100));
    let mut last_gauges = Instant::now() - gauges_every;
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
        crate::gauges::heartbeat();
        if last_gauges.elapsed() >= gauges_every {
            last_gauges = Instant::now();
            if let Err(e) = crate::gauges::collect(&ctx).await {
                tracing::warn!(error = %e, "collecting the gauges failed");
            }
        }
        if let Err(e) = schedule_due(&ctx).await {
            tracing::warn!(error = %e, "scheduling deliveries failed");
        }
        if last_reconcile.elapsed() >= reconcile_every {
            last_reconcile = Instant::now();
            match reconcile(&ctx).await {
                Ok((v, f)) if v + f > 0 => {
                    tracing::info!(verify = v, fanout = f, "re-queued unfinished work")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        }
        if last_statistics.elapsed() >= STATISTICS_EVERY {
            last_statistics = Instant::now();
            refresh_statistics(&ctx, &mut statistics_task);
        }
        if last_expire.elapsed() >= EXPIRE_EVERY {
            last_expire = Instant::now();
            if let Err(e) = expire(&ctx).await {
                tracing::warn!(error = %e, "expiring old rows failed");
            }
        }
    }
}

/// Takes the statistics of the tables that outgrew them (`store::statistics`), in a task
/// of its own: an `ANALYZE` of a big table takes a fraction of a second, which the
/// scheduler's other duties and the heartbeat do not wait for. `running` is the previous
/// look's task: while it runs, no other starts. A failure is logged and tried again at
/// the next look; tables this role does not own are reported once per process.
fn refresh_statistics(ctx: &Arc<Ctx>, running: &mut Option<tokio::task::JoinHandle<()>>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID_NOT_OWNED: AtomicBool = AtomicBool::new(false);
    if running.as_ref().is_some_and(|t| !t.is_finished()) {
        return;
    }
    let ctx = ctx.clone();
    *running = Some(tokio::spawn(async move {
        let refreshed = match ctx.app.pool.get().await {
            Ok(mut conn) => statistics::refresh(&mut conn).await,
            Err(e) => Err(parafed::store::StoreError::from(e)),
        };
        match refreshed {
            Ok(r) => {
                if !r.analyzed.is_empty() {
                    tracing::debug!(tables = ?r.analyzed, "analyzed tables that outgrew their statistics");
                }
                if !r.not_owned.is_empty() && !SAID_NOT_OWNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        tables = ?r.not_owned,
                        "these tables belong to another role, so parafed cannot keep their \
                         planner statistics fresh; set autovacuum_naptime = 10s \
                         (docs/operations.md, \"Postgres settings\")"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "taking the tables' statistics failed"),
        }
    }));
}

/// Brings back the destinations that are due: those whose next step is a probe (their
/// backoff ended, or they never answered) go straight to this worker's prober, as a
/// fan-out hands over new ones (`probe::hand_over`: a thousand dead peers' backoff steps
/// are then a few statements per round, not a deliver job each); the others (and those
/// the prober cannot take) get a deliver job.
async fn schedule_due(ctx: &Ctx) -> Result<(), crate::context::JobError> {
    let due = {
        let mut conn = ctx.app.pool.get().await?;
        let pass_before = parafed::delivery::deferral::pass_before(
            chrono::Utc::now(),
            ctx.policy.dependency_wait,
        );
        destinations::due(&mut conn, 1000, pass_before).await?
    };
    let now = chrono::Utc::now();
    let mut queued = Vec::with_capacity(due.len());
    for h in due {
        let probe =
            Destination::from_row(h.clone()).is_ok_and(|d| d.sending(now) == Sending::Probe);
        if !probe || !crate::probe::hand_over(ctx, &h.destination).await? {
            queued.push(h.destination);
        }
    }
    ctx.app.queue.schedule_deliveries(&queued).await?;
    Ok(())
}

/// Pushes jobs again for unfinished work whose job is lost; returns the counts.
///
/// A job counts as lost when it was pushed more than `stale_after` ago *and* before the
/// oldest job still in its queue's stream (less `stale_after`, the allowance for clock
/// skew between Redis and Postgres). Only the first rule would re-push every waiting
/// event of a backlog longer than `stale_after`, again and again: the duplicates lengthen
/// the backlog, which makes more events stale — a spiral a loaded fleet never leaves.
/// Acknowledged entries are deleted from the stream, so a job pushed before the oldest
/// entry still there is finished or gone (FLUSHALL, a Redis restart without persistence).
pub async fn reconcile(ctx: &Ctx) -> Result<(usize, usize), crate::context::JobError> {
    let stale = chrono::Duration::milliseconds(ctx.app.cfg.worker.stale_after_ms as i64);
    let now = chrono::Utc::now();
    let cutoff = async |q: QueueName| -> Result<_, crate::context::JobError> {
        let oldest = ctx.app.queue.oldest_job_ms(q).await?;
        let bound = oldest
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map_or(now, |t| t.min(now));
        Ok(bound - stale)
    };
    let verify_cutoff = cutoff(QueueName::Verify).await?;
    let fanout_cutoff = cutoff(QueueName::Fanout).await?;
    let (mut v_total, mut f_total) = (0, 0);
    loop {
        let (verify, fanout) = {
            let mut conn = ctx.app.pool.get().await?;
            events::claim_stale(&mut conn, verify_cutoff, fanout_cutoff, 1000).await?
        };
        if verify.is_empty() && fanout.is_empty() {
            return Ok((v_total, f_total));
        }
        let (v, f) = (verify.len(), fanout.len());
        // Claimed in storage order, pushed as batches in that order.
        ctx.app
            .queue
            .push_many(QueueName::Verify, &VerifyJob::batches(verify))
            .await?;
        ctx.app
            .queue
            .push_many(QueueName::Fanout, &FanoutJob::batches(fanout))
            .await?;
        metrics::counter!("parafed_reconciled_jobs_total").increment((v + f) as u64);
        v_total += v;
        f_total += f;
    }
}

async fn expire(ctx: &Ctx) -> Result<(), crate::context::JobError> {
    let cutoff =
        chrono::Utc::now() - chrono::Duration::seconds(ctx.app.cfg.delivery.max_age_secs as i64);
    let mut conn = ctx.app.pool.get().await?;
    let n = retention::expire(&mut conn, cutoff).await?;
    if n > 0 {
        metrics::counter!("parafed_deliveries_total", "outcome" => "dead").increment(n as u64);
        tracing::info!(rows = n, "outbound rows expired");
    }
    // No request outlives its timeout: an attempt open for twice as long lost its sender.
    let abandoned = chrono::Utc::now()
        - chrono::Duration::milliseconds(2 * ctx.app.cfg.delivery.request_timeout_ms as i64 + 1000);
    let n = retention::close_abandoned_attempts(&mut conn, abandoned).await?;
    if n > 0 {
        tracing::info!(attempts = n, "closed attempts their sender left open");
    }
    drop(conn);
    // Quarantines whose time is up end, and what they held is processed.
    match parafed::admin::peers::lift_lapsed(&ctx.app).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(peers = n, "quarantines ended"),
        Err(e) => tracing::warn!(error = %e, "ending lapsed quarantines failed"),
    }
    let mut conn = ctx.app.pool.get().await?;
    let horizon =
        chrono::Utc::now() - chrono::Duration::seconds(ctx.app.cfg.worker.retention_secs as i64);
    let (attempts, rows, txns) = retention::prune(&mut conn, horizon).await?;
    if attempts + rows + txns > 0 {
        tracing::info!(attempts, rows, txns, "pruned history past retention");
    }
    Ok(())
}
