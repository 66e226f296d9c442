//! deliver: drain one destination's backlog.
//!
//! One job per destination, not per row. The job takes the destination's lease (so one
//! worker in the fleet drains it at a time, and at most `window` requests are in flight
//! to it), then sends its waiting rows, oldest first, until the backlog is empty, the
//! destination fails, or the job's time budget is spent (it then re-queues itself, so one
//! busy peer cannot hold a worker from the others).
//!
//! This file only does I/O. What it decides comes from `parafed::delivery`: which rows
//! may be in flight together (`order`: dependants after what they depend on), what an
//! answer means (`outcome`), what the attempt log keeps (`attempt`), and how the
//! destination's state moves (`destination`, saved through `store::destinations`).
//!
//! Every request has an attempt row written *before* it is sent; a row left open by a
//! worker that died mid-request is closed as interrupted by the next drain.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use chrono::Utc;
use http::Method;
use parafed::delivery::attempt::{self, AttemptResult};
use parafed::delivery::backoff::random_jitter;
use parafed::delivery::deferral;
use parafed::delivery::destination::Sending;
use parafed::delivery::order::{self, OrderKeys, Unsettled};
use parafed::delivery::outcome::{self, Previous};
use parafed::delivery::{Destination, DestinationEvent, Outcome};
use parafed::protocol::ServerName;
use parafed::queue::DeliverJob;
use parafed::remote::send::send_signed;
use parafed::store::attempts::{self, Finished};
use parafed::store::destinations::{self, Health};
use parafed::store::outbound::{self, Settled, Waiting};
use parafed::store::{deferrals, events, retention, StoreError};
use parafed::trust::Standing;

use crate::context::{Ctx, JobError};
use crate::probe_queue::Handover;

enum Drain {
    /// Nothing left to send.
    Empty,
    /// Rows wait, all behind earlier events not yet fanned out: their fan-outs queue
    /// the destination again.
    Waiting,
    /// The destination cannot take more now (backing off, held, paused, blocked rows).
    Stopped,
    /// The time budget is spent; the job re-queues itself.
    Budget,
}

/// One row's request(s) and what they meant.
pub(crate) struct Sent {
    pub row: Waiting,
    /// Every request sent for the row: its attempt row and result.
    pub attempts: Vec<(i64, AttemptResult)>,
    pub outcome: Outcome,
    pub status: Option<i32>,
}

pub async fn run(ctx: &Arc<Ctx>, job: &DeliverJob) -> Result<(), JobError> {
    let app = &ctx.app;
    // From here on, new rows for this destination queue a new job — until its drain,
    // if one starts, marks it as drained (`Reading::next`).
    if let Err(e) = app.queue.clear_scheduled(&job.destination).await {
        tracing::debug!(error = %e, "could not clear the scheduled mark");
    }
    let Ok(dest) = ServerName::parse(&job.destination) else {
        return Ok(());
    };
    let Some(health) = may_send(ctx, &dest).await? else {
        return Ok(());
    };
    let destination = Destination::from_row(health).map_err(StoreError::Corrupt)?;
    match destination.sending(Utc::now()) {
        Sending::Window => return drain_destination(ctx, &dest, false).await,
        // Backing off (a fan-out that saw it healthy queued this job before its probe
        // failed) or held: nothing is sent now, and the scheduler queues it again when
        // its time comes. No lease, no statement more.
        Sending::Wait | Sending::Recheck => return Ok(()),
        Sending::Probe => {}
    }
    // A destination that has not answered yet (new to us, or whose backoff just ended)
    // is probed in the background, holding a probe permit instead of this job's slot:
    // most such peers answer quickly or refuse at once, but one that never answers
    // would hold the slot for the request timeout, and a room with hundreds of those
    // would leave no slot to the peers that answer. The probes a worker has in hand go
    // together, a few statements for the lot (`probe`). Without a permit, the
    // destination waits for the scheduler's next tick. A worker that stops meanwhile
    // leaves the rows waiting and the attempt open, as any drain cut short does.
    let Ok(permit) = ctx.probes.clone().try_acquire_owned() else {
        tracing::debug!(destination = %dest, "every probe permit is taken; the scheduler brings it back");
        return Ok(());
    };
    let name = dest.to_string();
    match ctx.probing.push(dest, permit) {
        Handover::Queued => {}
        Handover::Busy => tracing::debug!(destination = %name, "already being probed here"),
        Handover::NoProber => {
            tracing::debug!(destination = %name, "no prober runs here; the scheduler brings it back")
        }
    }
    Ok(())
}

/// Takes the destination's lease and drains it (see the module doc). A `probing` drain
/// (in the background) stops once the peer answered, and the destination goes back to
/// the queue: the rest of its backlog is drained in a job slot, and the permit is free
/// for the next peer that has not answered yet.
pub(crate) async fn drain_destination(
    ctx: &Ctx,
    dest: &ServerName,
    probing: bool,
) -> Result<(), JobError> {
    let app = &ctx.app;
    let started = Instant::now();
    // The lease names this job run, not just the process: two deliver jobs of one worker
    // process must not both hold a destination.
    let owner = format!("{}-{:016x}", ctx.worker_id, rand::random::<u64>());
    let lease_ttl = lease_ttl(&app.cfg);
    let mut first = true;
    // Whether the drain already looked again after stopping on rows that wait.
    let mut looked_again = false;
    loop {
        {
            let mut conn = app.pool.get().await.map_err(StoreError::from)?;
            let held =
                destinations::acquire_lease(&mut conn, dest.as_str(), &owner, lease_ttl).await?;
            if held.is_none() {
                return Ok(()); // another worker is draining it
            }
            if first {
                // Nobody else sends to this destination while we hold the lease: an
                // attempt still open was cut short by a sender that stopped.
                let n = attempts::close_open(&mut conn, dest.as_str()).await?;
                if n > 0 {
                    tracing::info!(destination = %dest, attempts = n, "closed attempts a stopped worker left open");
                }
                first = false;
            }
        }
        let outcome = drain(ctx, dest, &owner, lease_ttl, started, probing).await;
        let released = async {
            let mut conn = app.pool.get().await.map_err(StoreError::from)?;
            destinations::release_lease(&mut conn, dest.as_str(), &owner).await?;
            Ok::<_, JobError>(conn)
        }
        .await;
        // The drain stops: from here on, rows written for the destination queue a job
        // again (`JobQueue::schedule_deliveries`; each round marked it as drained).
        // Cleared before the last look below, so a row written after that look finds
        // the mark gone and queues its job.
        if let Err(e) = app.queue.clear_scheduled(dest.as_str()).await {
            tracing::warn!(destination = %dest, error = %e, "could not clear the destination's scheduled mark; fan-outs queue no job for it until the mark expires");
        }
        let mut conn = released?;
        match outcome? {
            Drain::Stopped => return Ok(()),
            // The fan-outs the rows waited for that finished while the mark was set
            // queued no job: one more look, once (an event that stays unfanned would
            // otherwise make the drain spin).
            Drain::Waiting if !looked_again => looked_again = true,
            Drain::Waiting => return Ok(()),
            Drain::Budget => {
                app.queue.schedule_deliveries(&[dest.to_string()]).await?;
                return Ok(());
            }
            Drain::Empty => {
                // Rows that arrived while we held the lease, after our last look.
                let pass_before = deferral::pass_before(Utc::now(), ctx.policy.dependency_wait);
                if !outbound::has_waiting(&mut conn, dest.as_str(), pass_before).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// How long a drain's lease lasts: it outlives one batch (renewed before each), so a
/// worker that dies frees the destination within about `job_timeout_ms`.
pub(crate) fn lease_ttl(cfg: &parafed::config::Config) -> chrono::Duration {
    chrono::Duration::milliseconds(
        cfg.worker
            .job_timeout_ms
            .max(2 * cfg.delivery.request_timeout_ms + 1000) as i64,
    )
}

/// Applies `events` to the destination's state through the one save path, starting from
/// `loaded` when the caller has the row.
async fn transition(
    ctx: &Ctx,
    dest: &ServerName,
    loaded: Option<Health>,
    events: Vec<DestinationEvent>,
) -> Result<Option<Health>, JobError> {
    let mut conn = ctx.app.pool.get().await.map_err(StoreError::from)?;
    let policy = &ctx.policy;
    Ok(
        destinations::update_from(&mut conn, dest.as_str(), loaded, |h| {
            let mut d = Destination::from_row(h).map_err(StoreError::Corrupt)?;
            for e in &events {
                d = d.apply(e.clone(), policy);
            }
            Ok(d.to_row())
        })
        .await?,
    )
}

/// Whether the peer may be sent to now (its standing `Allowed`): this process's cached
/// trust decision (`trust::Trust::standing`), no statement while it is fresh.
async fn allowed(ctx: &Ctx, dest: &ServerName) -> Result<bool, JobError> {
    Ok(matches!(
        ctx.app.trust.standing(dest).await?,
        Standing::Allowed { .. }
    ))
}

/// The trust decision about the destination: a blocked peer's waiting rows are
/// cancelled, a quarantined peer's wait (the destination is held and looked at again
/// after `hold_recheck`), an allowed peer's destination is released if it was held.
/// Returns the destination's row when it may be sent to (and has one).
async fn may_send(ctx: &Ctx, dest: &ServerName) -> Result<Option<Health>, JobError> {
    let app = &ctx.app;
    match app.trust.standing(dest).await? {
        Standing::Allowed { .. } => {
            let health = {
                let mut conn = app.pool.get().await.map_err(StoreError::from)?;
                destinations::get(&mut conn, dest.as_str()).await?
            };
            match health {
                Some(h) if h.state == "held" => {
                    transition(ctx, dest, Some(h), vec![DestinationEvent::Release]).await
                }
                other => Ok(other),
            }
        }
        Standing::Quarantined { .. } => {
            let until = Utc::now()
                + chrono::Duration::from_std(ctx.policy.hold_recheck)
                    .unwrap_or(chrono::Duration::minutes(1));
            let reason = format!("outbound held: {dest} is quarantined");
            transition(
                ctx,
                dest,
                None,
                vec![DestinationEvent::Hold { reason, until }],
            )
            .await?;
            Ok(None)
        }
        Standing::Refused { reason } => {
            let mut conn = app.pool.get().await.map_err(StoreError::from)?;
            let n = outbound::cancel_waiting(&mut conn, dest.as_str(), &reason).await?;
            if n > 0 {
                metrics::counter!("parafed_deliveries_total", "outcome" => "cancelled")
                    .increment(n as u64);
                tracing::info!(destination = %dest, rows = n, %reason, "waiting rows cancelled");
            }
            Ok(None)
        }
    }
}

/// A round read and chosen: the rows to send now, their envelopes, and the
/// destination's state as the round's lease renewal found it. Its attempts are not
/// begun yet (an attempt row stands for a request sent).
struct Round {
    key: parafed::protocol::Keypair,
    health: Health,
    destination: Destination,
    /// A full window: the destination answers, and more rows waited than one round
    /// sends (a backlog), so the next round is worth reading while this one is out.
    full: bool,
    chosen: Vec<Waiting>,
    bodies: HashMap<String, parafed::protocol::Envelope>,
}

/// What opening a round's attempts came to.
enum Begin {
    /// Attempts opened (outbound id → attempt id), with the state the renewed lease
    /// read when the round was read ahead.
    Begun(Vec<attempts::Started>, Option<Box<Health>>),
    /// Another worker holds the destination now.
    LeaseLost,
    /// The destination is no longer the same healthy window, or the peer no longer
    /// allowed: read the round anew (which stops the drain if it may not be sent to).
    Changed,
}

/// What a drain did while a round was out: whether settling the round kept before it
/// backed the destination off, and the next round if it was read ahead.
type Meanwhile = Result<(bool, Option<Next>), JobError>;

/// Whether a drain started at `started` ends before its next round: its time budget
/// (`policy.drain_budget`) is spent, the deliver queue is paused by an operator, or the
/// worker is stopping. The job then queues itself again.
fn drain_ends(ctx: &Ctx, started: Instant) -> bool {
    started.elapsed() > ctx.policy.drain_budget
        || ctx.control.is_paused(parafed::queue::QueueName::Deliver)
        || ctx.is_stopping()
}

/// A round's share of the worker's budget of requests in flight
/// (`worker.max_requests_in_flight`, `Ctx::requests`), given back when dropped; the
/// gauge `parafed_delivery_requests_in_flight` follows both.
struct Share<'c> {
    permits: Option<tokio::sync::OwnedSemaphorePermit>,
    ctx: &'c Ctx,
}

impl<'c> Share<'c> {
    /// A share of `permits`, reported.
    fn of(ctx: &'c Ctx, permits: tokio::sync::OwnedSemaphorePermit) -> Share<'c> {
        ctx.note_requests_in_flight();
        Share {
            permits: Some(permits),
            ctx,
        }
    }

    /// `requests` permits if the budget has them now.
    fn try_take(ctx: &'c Ctx, requests: usize) -> Option<Share<'c>> {
        let permits = ctx
            .requests
            .clone()
            .try_acquire_many_owned(u32::try_from(requests).unwrap_or(u32::MAX))
            .ok()?;
        Some(Share::of(ctx, permits))
    }

    /// No share: a probing drain's one request is bounded by its probe permit
    /// (`worker.probe_concurrency`), not by the budget.
    fn none(ctx: &'c Ctx) -> Share<'c> {
        Share { permits: None, ctx }
    }

    /// Waits for `requests` permits, all at once.
    async fn take(ctx: &'c Ctx, requests: usize) -> Result<Share<'c>, JobError> {
        let permits = ctx
            .requests
            .clone()
            .acquire_many_owned(u32::try_from(requests).unwrap_or(u32::MAX))
            .await
            .map_err(|e| -> JobError { Box::new(e) })?;
        Ok(Share::of(ctx, permits))
    }
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        drop(self.permits.take());
        self.ctx.note_requests_in_flight();
    }
}

/// What reading the next round came to.
enum Next {
    Round(Box<Round>),
    Done(Drain),
}

async fn drain(
    ctx: &Ctx,
    dest: &ServerName,
    owner: &str,
    lease_ttl: chrono::Duration,
    started: Instant,
    probing: bool,
) -> Result<Drain, JobError> {
    let app = &ctx.app;
    let policy = &ctx.policy;
    // The destination's deferrals (`delivery::deferral`): read once per drain, again
    // after each round that caught them up. Rows of their rooms after their cursors are
    // held back until the cursor passed them.
    let mut deferred: Vec<deferrals::Stored> = {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        deferrals::of(&mut conn, dest.as_str()).await?
    };
    let reading = Reading {
        ctx,
        dest,
        owner,
        lease_ttl,
        started,
        probing,
    };
    let none = HashSet::new();
    let mut next = reading.next(&mut deferred, &none).await?;
    // A round whose requests were all delivered, kept unsettled while the next round
    // (read ahead) is out: its settle leaves the chain of rounds too. Its rows are still
    // `pending`, so nothing reads the destination's rows before it is settled: every
    // path below settles it first (`settle_kept`). There is one exactly when `next` was
    // read while the previous round's requests were out.
    let mut kept: Option<(Health, Vec<Sent>)> = None;
    loop {
        let round_started = Instant::now();
        let read_ahead = kept.is_some();
        let round = match next {
            Next::Round(r) => r,
            Next::Done(d) => {
                settle_kept(ctx, dest, &mut kept).await?;
                return Ok(d);
            }
        };
        let Round {
            key,
            mut health,
            destination,
            full,
            chosen,
            mut bodies,
        } = *round;
        // Attempts open only for rows that will be sent, just before they are.
        let first_attempts: Vec<(i64, i32)> = chosen
            .iter()
            .filter(|r| bodies.contains_key(&r.event_id))
            .map(|r| (r.id, r.attempts + 1))
            .collect();
        // The worker's budget of requests in flight (`worker.max_requests_in_flight`),
        // shared by all its drains: this round's share is taken before its attempts are
        // begun (an attempt row is a request sent) and given back as soon as its answers
        // are in (`sends`, below). A round asks for all of its share at once and holds
        // no other share meanwhile, so drains cannot wait on each other in a circle; a
        // full window always fits (the configuration is checked for it). A probing
        // drain's request is bounded by its probe permit instead.
        // Whether this round waited for its share (and may have gone stale meanwhile).
        let mut waited = false;
        let at_once = if probing {
            Some(Share::none(ctx))
        } else {
            Share::try_take(ctx, first_attempts.len())
        };
        let permits = match at_once {
            Some(share) => share,
            None => {
                // The budget is in use. The round kept unsettled is settled first:
                // its attempts would otherwise stay open for the whole wait, and a
                // drain that took the destination over meanwhile would send its rows
                // again. A wait long enough for the lease to need renewing reads the
                // round again (the lease, the state, the rows), with nothing begun;
                // after a shorter one the round is checked as one read ahead is
                // (below), and against a pause, a stop and the drain's budget.
                if settle_kept(ctx, dest, &mut kept).await? {
                    return Ok(Drain::Stopped);
                }
                let asked = Instant::now();
                let share = Share::take(ctx, first_attempts.len()).await?;
                if asked.elapsed() > lease_ttl.to_std().unwrap_or_default() / 4 {
                    drop(share);
                    next = reading.next(&mut deferred, &none).await?;
                    continue;
                }
                waited = true;
                share
            }
        };
        // Read a round ago (`read_ahead`), or before a wait for the budget (`waited`):
        // the lease is renewed and the state read again just before sending, as a round
        // read now would have them. Anything but the same healthy window (an operator's
        // pause or hold, say) reads the round again, after the kept round is settled;
        // nothing of it was begun.
        let recheck = read_ahead || waited;
        let step: Result<Begin, JobError> = async {
            // What reading the round now would stop at (`Reading::next`): the drain's
            // budget, a paused queue, a stopping worker — then the peer's standing.
            if waited && drain_ends(ctx, started) {
                return Ok(Begin::Changed);
            }
            if recheck && !allowed(ctx, dest).await? {
                return Ok(Begin::Changed);
            }
            let mut conn = app.pool.get().await.map_err(StoreError::from)?;
            let mut renewed = None;
            if recheck {
                let Some(now) =
                    destinations::acquire_lease(&mut conn, dest.as_str(), owner, lease_ttl).await?
                else {
                    return Ok(Begin::LeaseLost);
                };
                let same = now.state == health.state
                    && now.consecutive_forbidden == health.consecutive_forbidden
                    && Destination::from_row(now.clone())
                        .is_ok_and(|d| d.sending(Utc::now()) == Sending::Window);
                if !same {
                    return Ok(Begin::Changed);
                }
                renewed = Some(Box::new(now));
            }
            let begun = attempts::begin(&mut conn, &first_attempts).await?;
            Ok(Begin::Begun(begun, renewed))
        }
        .await;
        let begun = match step {
            Ok(Begin::Begun(begun, renewed)) => {
                if let Some(now) = renewed {
                    health = *now;
                }
                begun
            }
            Ok(Begin::LeaseLost) => {
                drop(permits);
                settle_kept(ctx, dest, &mut kept).await?;
                return Ok(Drain::Stopped);
            }
            Ok(Begin::Changed) => {
                drop(permits);
                if settle_kept(ctx, dest, &mut kept).await? {
                    return Ok(Drain::Stopped);
                }
                next = reading.next(&mut deferred, &none).await?;
                continue;
            }
            Err(e) => {
                drop(permits);
                // The kept round was delivered: its answers are saved (if the database
                // lets us) before the error goes up, so its rows are not sent again.
                if let Err(settling) = settle_kept(ctx, dest, &mut kept).await {
                    tracing::warn!(destination = %dest, error = %settling, "a delivered round was not settled; its rows will be sent again");
                }
                return Err(e);
            }
        };
        let mut attempt_of: HashMap<i64, i64> =
            begun.into_iter().map(|s| (s.outbound_id, s.id)).collect();
        let previous = Previous {
            resent: false,
            forbidden_in_a_row: destination.forbidden_in_a_row,
        };
        let in_flight: HashSet<i64> = chosen.iter().map(|r| r.id).collect();
        let begun_at = Instant::now();
        let sends = futures::future::join_all(chosen.into_iter().map(|r| {
            let body = bodies.remove(&r.event_id).map(|e| Bytes::from(e.to_wire()));
            let attempt_id = attempt_of.remove(&r.id);
            send_row(ctx, dest, &key, r, body, attempt_id, previous)
        }));
        // Each side's end, for the round's timings (below). The budget's share goes back
        // with the last answer, not after what runs beside the requests.
        let sends = async {
            let r = sends.await;
            drop(permits);
            (r, Instant::now())
        };
        // While this round's requests are out, on the drain's one connection: the
        // previous round is settled if it was kept, and, while a full window is out (a
        // backlog), the next round is read and chosen without the rows in flight. Both
        // leave the chain of rounds (docs/performance.md, "Drain rounds that overlap").
        // The round read ahead is kept only if every request of this round was
        // delivered (below) — then nothing it chose can depend on a row that failed,
        // and it is sent after this round's answers, so dependants still follow what
        // they depend on; any other answer settles first and the next round is read
        // again.
        let read_now = full && !probing;
        let meanwhile = async {
            // A kept round was delivered in full, so its settle does not back off;
            // should it, nothing is read ahead and the drain stops after this round.
            if settle_kept(ctx, dest, &mut kept).await? {
                return Ok((true, None));
            }
            if read_now {
                Ok((false, Some(reading.next(&mut deferred, &in_flight).await?)))
            } else {
                Ok((false, None))
            }
        };
        let meanwhile = async {
            let r: Meanwhile = meanwhile.await;
            (r, Instant::now())
        };
        let ((mut results, sent_at), (ahead, meanwhile_at)) = futures::join!(sends, meanwhile);
        // Where a round's time went (docs/performance.md, "Drain rounds that overlap"):
        // from the loop's top to the requests going out (the renewed lease and the
        // attempts begun), the requests, and what ran beside them.
        tracing::debug!(
            destination = %dest,
            rows = results.len(),
            begin_ms = (begun_at - round_started).as_secs_f64() * 1e3,
            requests_ms = (sent_at - begun_at).as_secs_f64() * 1e3,
            meanwhile_ms = (meanwhile_at - begun_at).as_secs_f64() * 1e3,
            "round out"
        );
        // Every request of the batch was classified with the 403 run as it stood before
        // it; count the run across the batch in row order.
        outcome::apply_forbidden_run(
            results
                .iter_mut()
                .map(|s| (s.status.map(|c| c as u16), &mut s.outcome)),
            destination.forbidden_in_a_row,
            policy,
        );
        // The round read ahead is kept after deliveries alone to a destination that
        // was healthy with no run of 403s: its state is then what the read saw, and
        // this round's settle changes nothing but its rows, so it can wait for the
        // next round's requests.
        let keep = results.iter().all(|s| s.outcome == Outcome::Delivered)
            && health.state == "healthy"
            && health.consecutive_forbidden == 0;
        let stopped = match ahead {
            // A round read ahead that is not full is read anew (below): rows that
            // arrived while this round was out would otherwise wait for the next one.
            Ok((false, Some(Next::Round(r)))) if keep && r.full => {
                kept = Some((health, results));
                next = Next::Round(r);
                continue;
            }
            Ok((stopped, _)) => stopped,
            Err(e) => {
                // The kept round's settle or the read failed: this round's answers are
                // saved before the error goes up.
                settle(ctx, dest, health, results).await?;
                return Err(e);
            }
        };
        if settle(ctx, dest, health, results).await? || stopped {
            return Ok(Drain::Stopped);
        }
        next = reading.next(&mut deferred, &none).await?;
    }
}

/// Settles the round kept unsettled while the next one was out, if there is one;
/// returns whether the destination now backs off (as [`settle`]).
async fn settle_kept(
    ctx: &Ctx,
    dest: &ServerName,
    kept: &mut Option<(Health, Vec<Sent>)>,
) -> Result<bool, JobError> {
    match kept.take() {
        Some((health, results)) => settle(ctx, dest, health, results).await,
        None => Ok(false),
    }
}

/// What a drain reads its rounds with.
struct Reading<'a> {
    ctx: &'a Ctx,
    dest: &'a ServerName,
    owner: &'a str,
    lease_ttl: chrono::Duration,
    started: Instant,
    probing: bool,
}

impl Reading<'_> {
    /// Renews the lease and reads the next round: the destination's oldest waiting rows
    /// that may go now (`choose`), without those in `in_flight`, and their envelopes —
    /// or why there is none.
    async fn next(
        &self,
        deferred: &mut Vec<deferrals::Stored>,
        in_flight: &HashSet<i64>,
    ) -> Result<Next, JobError> {
        let Reading {
            ctx,
            dest,
            owner,
            lease_ttl,
            started,
            probing,
        } = *self;
        let app = &ctx.app;
        let policy = &ctx.policy;
        loop {
            // An operator's pause of the deliver queue stops the drain between batches;
            // the job re-queues itself and waits in the paused queue.
            if drain_ends(ctx, started) {
                return Ok(Next::Done(Drain::Budget));
            }
            // An operator's (or the automatic) quarantine or block of the peer stops the
            // drain between rounds, not only at the next job: a backlog being drained
            // would otherwise go out whole to a peer quarantined meanwhile. The
            // destination is held or its rows cancelled here (`may_send`) once no round is
            // out, or by the next job if the drain stops first (a settle that backs the
            // destination off). The standing is this process's cached one
            // (`trust::Trust`: no statement while it is cached; a decision made in
            // another process reaches the cache within about a quarter of a second).
            if !allowed(ctx, dest).await? {
                // Read while a round is out (`in_flight`): its rows are still pending, so
                // the hold or the cancelling waits until that round is settled and the
                // drain reads again (with nothing in flight).
                if in_flight.is_empty() {
                    may_send(ctx, dest).await?;
                }
                return Ok(Next::Done(Drain::Stopped));
            }
            // Before taking a connection: reading the key may take one of its own, and
            // drains that each hold one while waiting for another can empty the pool.
            let key = app.signing_key().await?;
            let mut conn = app.pool.get().await.map_err(StoreError::from)?;
            let (lease, marked) = futures::join!(
                destinations::acquire_lease(&mut conn, dest.as_str(), owner, lease_ttl),
                // While the drain runs, fan-outs and the scheduler queue no job for the
                // destination: one would only find the lease held (this drain sends
                // their rows). Set each round, as a job that started meanwhile clears it.
                app.queue.mark_scheduled(dest.as_str())
            );
            if let Err(e) = marked {
                tracing::debug!(destination = %dest, error = %e, "could not mark the destination as drained");
            }
            let Some(health) = lease? else {
                // Our lease lapsed and another worker took over.
                return Ok(Next::Done(Drain::Stopped));
            };
            let destination = Destination::from_row(health.clone()).map_err(StoreError::Corrupt)?;
            let limit = match destination.sending(Utc::now()) {
                // The probe was answered: the backlog is for a job slot.
                Sending::Window if probing => return Ok(Next::Done(Drain::Budget)),
                Sending::Window => policy.window,
                Sending::Probe => 1,
                Sending::Wait | Sending::Recheck => return Ok(Next::Done(Drain::Stopped)),
            };
            let scan = policy.order_scan.max(limit) as i64;
            let since = Utc::now()
                - chrono::Duration::from_std(policy.dependency_wait)
                    .unwrap_or(chrono::Duration::minutes(5));
            let mut rows = outbound::waiting(&mut conn, dest.as_str(), scan, since).await?;
            // A deferral's rows are written a few windows ahead of what is sent, when
            // fewer are left than a round looks at; for a probe (one request), only when
            // nothing is left: a peer that stays down does not collect rows one probe
            // after another.
            let sendable = rows.iter().filter(|r| !behind(r, deferred)).count();
            if !deferred.is_empty() && (sendable == 0 || (limit > 1 && (sendable as i64) < scan)) {
                let budget = if limit > 1 { 4 * scan as usize } else { 16 };
                // Read again: a deferral ends only if no fan-out relied on it since it
                // was read (`touched`), so the read is just before the backfill.
                *deferred = deferrals::of(&mut conn, dest.as_str()).await?;
                parafed::backfill::catch_up(
                    &mut conn,
                    dest.as_str(),
                    deferred,
                    budget,
                    policy.dependency_wait,
                    limit > 1,
                )
                .await?;
                *deferred = deferrals::of(&mut conn, dest.as_str()).await?;
                rows = outbound::waiting(&mut conn, dest.as_str(), scan, since).await?;
            }
            let full = rows.len() as i64 >= scan;
            rows.retain(|r| !in_flight.contains(&r.id));
            if rows.is_empty() {
                return Ok(Next::Done(Drain::Empty));
            }
            let rows = held_back(rows, deferred);
            // Rows past their maximum age are not sent any more.
            let cutoff = Utc::now()
                - chrono::Duration::from_std(policy.max_age).unwrap_or(chrono::Duration::days(1));
            let (expired, rows): (Vec<Waiting>, Vec<Waiting>) =
                rows.into_iter().partition(|r| r.created_at < cutoff);
            if !expired.is_empty() {
                let dead: Vec<(i64, String)> = expired
                    .iter()
                    .map(|r| (r.id, retention::EXPIRED.to_owned()))
                    .collect();
                let n = outbound::dead(&mut conn, &dead).await?;
                metrics::counter!("parafed_deliveries_total", "outcome" => "dead")
                    .increment(n as u64);
                continue;
            }
            let mut chosen =
                choose(ctx, &mut conn, rows, limit, since, &mut Earlier::new()).await?;
            if chosen.is_empty() && full {
                // Everything looked at waits behind one dependency: look further once,
                // so unrelated rows behind a busy message's reactions still go.
                let mut wider =
                    outbound::waiting(&mut conn, dest.as_str(), scan * 8, since).await?;
                wider.retain(|r| !in_flight.contains(&r.id));
                chosen = choose(
                    ctx,
                    &mut conn,
                    held_back(wider, deferred),
                    limit,
                    since,
                    &mut Earlier::new(),
                )
                .await?;
            }
            if chosen.is_empty() {
                // Everything waits for earlier events not yet fanned out: their
                // fan-outs queue the destination again (`drain_destination` looks once
                // more for those that finished while this drain held the mark), and
                // the scheduler brings it back within a tick in any case.
                return Ok(Next::Done(Drain::Waiting));
            }
            // The deferrals as they stand *after* the rows and the order check were read
            // (`fresh_deferrals`): what was held back above used an older read.
            *deferred = deferrals::of(&mut conn, dest.as_str()).await?;
            let Some(chosen) = fresh_deferrals(chosen, deferred) else {
                // Every row chosen is now behind a cursor a fan-out moved back: read
                // again, which catches the deferral up first.
                continue;
            };
            let ids: Vec<&str> = chosen.iter().map(|r| r.event_id.as_str()).collect();
            let bodies = events::envelopes(&mut conn, &ids).await?;
            return Ok(Next::Round(Box::new(Round {
                key,
                health,
                destination,
                full: limit > 1 && chosen.len() >= limit,
                chosen,
                bodies,
            })));
        }
    }
}

/// `rows` without those after their room's deferral cursor: they were written by a late
/// fan-out, ahead of events the deferral still owes, and wait until the cursor passed
/// them (the room's events leave in storage order).
pub(crate) fn held_back(rows: Vec<Waiting>, deferred: &[deferrals::Stored]) -> Vec<Waiting> {
    if deferred.is_empty() {
        return rows;
    }
    rows.into_iter().filter(|r| !behind(r, deferred)).collect()
}

/// The rows `choose` picked, without those behind a cursor in `fresh` — deferrals read
/// after the rows and after the order check (`events::unsettled_before`); `None` when
/// none is left.
///
/// Why a second look: the order check counts an event fanned out as settled, and an
/// event fanned out as a deferral has no row — it is owed only through its room's
/// cursor. A fan-out decides from a view it read before it writes
/// (`deferrals::fan_out_view`), so an earlier event whose fan-out saw the destination
/// unreachable (new, its first request in flight) can defer after a later event got a
/// row: the cursor moves back before that row. Deferrals read before the rows miss
/// that move, and the later row — say a reaction — would go before the message it
/// refers to. Read after both, they cannot: the fan-out that moves the cursor marks
/// the event fanned out in the same statement or a later one (a batch written in
/// several statements marks its events in the last), so an event the order check saw
/// settled has its cursor move in this read, and one it saw unsettled holds its
/// dependants anyway. The rows left need nothing held back: a row depends only on
/// earlier events of its room, and every row of a room after a held one is held too.
pub(crate) fn fresh_deferrals(
    chosen: Vec<Waiting>,
    fresh: &[deferrals::Stored],
) -> Option<Vec<Waiting>> {
    let chosen = held_back(chosen, fresh);
    (!chosen.is_empty()).then_some(chosen)
}

/// Whether `r` is after its room's deferral cursor.
pub(crate) fn behind(r: &Waiting, deferred: &[deferrals::Stored]) -> bool {
    deferred
        .iter()
        .any(|d| d.room_id == r.room_id && r.event_seq > d.from_seq)
}

/// Earlier events still unsettled, as `choose` looked them up: by (rooms, last event
/// looked at), their (seq, ordering keys) and the horizon of a list cut at its bound.
/// A probe round's destinations mostly probe the same event: one lookup for all.
pub(crate) type Earlier = HashMap<(Vec<String>, i64), (Vec<(i64, OrderKeys)>, Option<i64>)>;

/// The rows that may be sent now, at most `limit`, in order (`delivery::order`), the
/// earlier events' lookups kept in `known` (pass an empty map for a fresh look).
pub(crate) async fn choose(
    ctx: &Ctx,
    conn: &mut parafed::store::PgConn,
    rows: Vec<Waiting>,
    limit: usize,
    since: chrono::DateTime<Utc>,
    known: &mut Earlier,
) -> Result<Vec<Waiting>, JobError> {
    let keys: Vec<OrderKeys> = rows
        .iter()
        .map(|r| OrderKeys {
            provides: r.order_provides.clone(),
            waits: r.order_waits.clone(),
        })
        .collect();
    let mut rooms: Vec<String> = rows.iter().map(|r| r.room_id.clone()).collect();
    rooms.sort_unstable();
    rooms.dedup();
    let last_seq = rows.iter().map(|r| r.event_seq).max().unwrap_or(0);
    // The usual case — everything earlier is fanned out — costs no second query.
    let looked_up;
    let (earlier_keys, horizon): &(Vec<(i64, OrderKeys)>, Option<i64>) =
        if rows.iter().any(|r| r.earlier_unsettled) {
            let key = (rooms, last_seq);
            if !known.contains_key(&key) {
                let rooms: Vec<&str> = key.0.iter().map(String::as_str).collect();
                let earlier = events::unsettled_before(
                    conn,
                    &rooms,
                    last_seq,
                    since,
                    ctx.policy.order_scan as i64,
                )
                .await?;
                // A list cut at its bound says nothing about events after its last one.
                let horizon = (earlier.len() >= ctx.policy.order_scan)
                    .then(|| earlier.last().map(|e| e.seq))
                    .flatten();
                let keys = earlier
                    .iter()
                    .map(|e| (e.seq, order::keys_of(&e.envelope)))
                    .collect();
                known.insert(key.clone(), (keys, horizon));
            }
            &known[&key]
        } else {
            looked_up = (Vec::new(), None);
            &looked_up
        };
    let horizon = *horizon;
    let candidates: Vec<Unsettled> = rows
        .iter()
        .zip(&keys)
        .map(|(r, k)| Unsettled {
            seq: r.event_seq,
            keys: k,
        })
        .collect();
    let pending: Vec<Unsettled> = earlier_keys
        .iter()
        .map(|(seq, k)| Unsettled { seq: *seq, keys: k })
        .collect();
    let picked = order::sendable(&candidates, &pending, horizon, limit);
    let mut rows: Vec<Option<Waiting>> = rows.into_iter().map(Some).collect();
    Ok(picked.into_iter().filter_map(|i| rows[i].take()).collect())
}

/// Records the results: attempts completed and rows settled (one statement), the
/// destination's state moved (one save). True when the destination backed off.
async fn settle(
    ctx: &Ctx,
    dest: &ServerName,
    loaded: Health,
    results: Vec<Sent>,
) -> Result<bool, JobError> {
    let app = &ctx.app;
    let s = settlement(&loaded, &results, Utc::now());
    // The destination's state first: whoever sees a row settled sees the state its
    // answer led to (a backoff, a run of 403s) already saved.
    let saved = if s.unchanged {
        None
    } else {
        transition(ctx, dest, Some(loaded), s.changes).await?
    };
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let n_dead = outbound::settle(&mut conn, &s.finished, &s.rows).await?;
    drop(conn);
    count(s.delivered, n_dead, u64::from(s.backs_off));
    if s.backs_off {
        if let Some(h) = saved {
            tracing::info!(destination = %dest, error = ?h.last_error, until = ?h.backoff_until, "destination backing off");
        }
    }
    Ok(s.backs_off)
}

/// The metrics of settled rounds: deliveries, rows turned dead, destinations that
/// backed off.
pub(crate) fn count(delivered: u64, dead: usize, backoffs: u64) {
    metrics::counter!("parafed_deliveries_total", "outcome" => "delivered").increment(delivered);
    metrics::counter!("parafed_deliveries_total", "outcome" => "dead").increment(dead as u64);
    metrics::counter!("parafed_destination_backoffs_total").increment(backoffs);
}

/// What a round's results mean: the attempts to complete, each row settled, the
/// destination's state changes.
pub(crate) struct Settlement<'a> {
    pub finished: Vec<Finished<'a>>,
    pub rows: Vec<(i64, Settled)>,
    pub changes: Vec<DestinationEvent>,
    pub delivered: u64,
    /// A request failed: the destination backs off (one step per round).
    pub backs_off: bool,
    /// Only deliveries, to a destination saved healthy in the last few seconds: its
    /// state is not worth a write.
    pub unchanged: bool,
}

/// Reads a round's results against the destination's state as `loaded` (see
/// [`Settlement`]).
pub(crate) fn settlement<'a>(
    loaded: &Health,
    results: &'a [Sent],
    now: chrono::DateTime<Utc>,
) -> Settlement<'a> {
    let finished: Vec<Finished> = results
        .iter()
        .flat_map(|s| {
            s.attempts.iter().map(|(id, a)| Finished {
                id: *id,
                status_code: a.status_code,
                error_class: a.error_class,
                latency_ms: a.latency_ms,
                response_excerpt: a.response_excerpt.as_deref(),
            })
        })
        .collect();
    let mut rows = Vec::with_capacity(results.len());
    let mut delivered = 0u64;
    let mut changes = Vec::new();
    let mut failure = None;
    for s in results {
        let forbidden = s.status == Some(403);
        let settled = match &s.outcome {
            Outcome::Delivered => {
                delivered += 1;
                let latency = (now - s.row.received_at).to_std().unwrap_or_default();
                metrics::histogram!("parafed_delivery_latency_seconds")
                    .record(latency.as_secs_f64());
                changes.push(DestinationEvent::Delivered { at: now });
                Settled::Delivered
            }
            Outcome::Permanent { reason } => {
                changes.push(DestinationEvent::EventRefused {
                    at: now,
                    reason: reason.clone(),
                    status: s.status,
                    forbidden,
                });
                Settled::Dead(reason.clone())
            }
            Outcome::Transient {
                reason,
                retry_after,
            }
            | Outcome::DestinationProblem {
                reason,
                retry_after,
            } => {
                // One backoff step per batch, however many of its requests failed.
                failure.get_or_insert(DestinationEvent::Failed {
                    at: now,
                    reason: reason.clone(),
                    status: s.status,
                    retry_after: *retry_after,
                    forbidden,
                    jitter: random_jitter(),
                });
                Settled::Waiting(reason.clone())
            }
            // `send_row` resends after a 409; it never returns this.
            Outcome::Resign => Settled::Waiting("HTTP 409".to_owned()),
        };
        rows.push((s.row.id, settled));
    }
    let backs_off = failure.is_some();
    changes.extend(failure);
    // A healthy destination that took the whole batch only moves its last success: not
    // worth a write more than every few seconds.
    let only_deliveries = changes
        .iter()
        .all(|c| matches!(c, DestinationEvent::Delivered { .. }));
    let recent = loaded
        .last_success_at
        .is_some_and(|t| now - t < chrono::Duration::seconds(5));
    let unchanged =
        only_deliveries && recent && loaded.state == "healthy" && loaded.consecutive_forbidden == 0;
    Settlement {
        finished,
        rows,
        changes,
        delivered,
        backs_off,
        unchanged,
    }
}

/// Sends one row (and, after a 409, once more with a fresh signature), each request
/// with its attempt row written first.
pub(crate) async fn send_row(
    ctx: &Ctx,
    dest: &ServerName,
    key: &parafed::protocol::Keypair,
    row: Waiting,
    body: Option<Bytes>,
    attempt_id: Option<i64>,
    mut previous: Previous,
) -> Sent {
    let app = &ctx.app;
    let (Some(body), Some(mut attempt_id)) = (body, attempt_id) else {
        return Sent {
            row,
            attempts: Vec::new(),
            outcome: Outcome::Permanent {
                reason: "the event no longer exists".into(),
            },
            status: None,
        };
    };
    let mut attempts = Vec::new();
    loop {
        let started = Instant::now();
        let r = send_signed(
            &app.client,
            &app.directory,
            key,
            &app.cfg.server_name,
            dest,
            Method::POST,
            "/event",
            body.clone(),
        )
        .await;
        metrics::histogram!("parafed_delivery_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        attempts.push((
            attempt_id,
            attempt::result_of(r.as_ref(), started.elapsed()),
        ));
        let status = r.as_ref().ok().map(|resp| i32::from(resp.status.as_u16()));
        let outcome = outcome::classify(
            r.as_ref(),
            &row.event_id,
            previous,
            &ctx.policy,
            SystemTime::now(),
        );
        let result = match &outcome {
            Outcome::Delivered => "delivered",
            Outcome::Resign => "resign",
            Outcome::Permanent { .. } => "permanent",
            Outcome::Transient { .. } => "transient",
            Outcome::DestinationProblem { .. } => "destination_problem",
        };
        metrics::counter!("parafed_delivery_attempts_total", "result" => result).increment(1);
        if outcome == Outcome::Resign {
            // A 409: an identical request was seen. Sign afresh and send once more, as
            // a new attempt with its own number.
            previous.resent = true;
            let begun = match app.pool.get().await {
                Ok(mut conn) => {
                    // Requests already sent for the row: those finished before this
                    // round, and this round's.
                    let number = row.attempts + attempts.len() as i32 + 1;
                    attempts::begin(&mut conn, &[(row.id, number)])
                        .await
                        .map(|v| v.first().map(|s| s.id))
                }
                Err(e) => Err(StoreError::from(e)),
            };
            match begun {
                Ok(Some(id)) => attempt_id = id,
                // The row is gone (purged meanwhile): nothing to resend.
                Ok(None) => {
                    break Sent {
                        row,
                        attempts,
                        outcome: Outcome::Permanent {
                            reason: "the outbound row no longer exists".into(),
                        },
                        status,
                    }
                }
                // No resend without its attempt on record: try again after a backoff.
                Err(e) => {
                    break Sent {
                        row,
                        attempts,
                        outcome: Outcome::Transient {
                            reason: format!("HTTP 409, and the resend could not be recorded: {e}"),
                            retry_after: None,
                        },
                        status,
                    }
                }
            }
            continue;
        }
        break Sent {
            row,
            attempts,
            outcome,
            status,
        };
    }
}
