//! Probe rounds: the first request to many destinations that have not answered yet,
//! sent together.
//!
//! A destination new to us, or whose backoff just ended, gets one request — its probe —
//! before its backlog is drained (`delivery::destination`, `Sending::Probe`). A room's
//! first fan-out to hundreds of servers, and every backoff step of hundreds of dead ones,
//! make that many probes at once. Probed one by one, each cost about ten statements
//! (lease, open attempts, deferrals, rows, envelope, attempt, state, settle, release),
//! and with a thousand dead peers in a room those statements were the database's time
//! the healthy peers waited for. Here the probes a worker has in hand go in one round:
//! one statement per step for the whole round, every request sent at once, and the
//! answers recorded in groups as they come (a refused connection at once, a peer that
//! never answers at the request timeout) — a few statements per group.
//!
//! A round only sends a destination's first sendable waiting row. A destination whose
//! probe needs more — a deferral to catch up first, rows past their age, a wider look
//! past rows that wait for each other — is drained alone, as `deliver` drains it. A
//! destination that answered goes back to the deliver queue: its backlog is drained in a
//! job slot, with its window.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use parafed::delivery::destination::Sending;
use parafed::delivery::outcome::{self, Previous};
use parafed::delivery::{Destination, DestinationEvent};
use parafed::protocol::ServerName;
use parafed::store::destinations::{self, Health};
use parafed::store::outbound::{self, Waiting};
use parafed::store::{attempts, deferrals, events, StoreError};

use crate::context::{Ctx, JobError};
use crate::deliver::{self, Sent};
use crate::probe_queue::{Handover, Ticket};

/// Most destinations one round probes (its statements carry that many names).
pub const ROUND: usize = 256;

/// Waiting rows a round reads per destination: its probe is the first that may go;
/// when none of these may, the destination is drained alone (which looks further).
const ROWS_LOOKED_AT: i64 = 8;

/// Hands `destination` — one whose next step is a probe: new to us, its probe row just
/// written by this worker's fan-out, or due again after a backoff (the scheduler) —
/// straight to this worker's prober, without a deliver job. False when it must go
/// through the deliver queue instead: this process does not deliver, every probe permit
/// is taken, or the peer is not simply allowed (the deliver job applies a quarantine or
/// a block). In a fleet, several workers may hand over one destination: the lease
/// decides which round probes it.
pub async fn hand_over(ctx: &Ctx, destination: &str) -> Result<bool, JobError> {
    if !ctx.probing.running() || ctx.is_stopping() {
        return Ok(false);
    }
    let Ok(dest) = ServerName::parse(destination) else {
        return Ok(false);
    };
    if !matches!(
        ctx.app.trust.standing(&dest).await?,
        parafed::trust::Standing::Allowed { .. }
    ) {
        return Ok(false);
    }
    let Ok(permit) = ctx.probes.clone().try_acquire_owned() else {
        return Ok(false);
    };
    // Already handed over: its probe stands for this one too.
    Ok(ctx.probing.push(dest, permit) != Handover::NoProber)
}

/// The prober: runs until `stop`, starting a round (in the background, so the fleet
/// waits for it when stopping) for every [`ROUND`] destinations handed over. One round
/// prepares at a time (its statements up to the requests); what is handed over
/// meanwhile waits for the next, so under a storm of probes the rounds grow by
/// themselves, and a lone probe waits for nobody. Destinations handed over after `stop`
/// are left to the scheduler of a worker that runs.
pub async fn run(ctx: Arc<Ctx>, mut stop: tokio::sync::watch::Receiver<bool>) {
    ctx.probing.set_running(true);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                ctx.probing.set_running(false);
                return;
            }
            () = ctx.probing.handed_over() => {}
        }
        let mut all = ctx.probing.take();
        let mut prepared = Vec::new();
        while !all.is_empty() {
            let rest = all.split_off(all.len().min(ROUND));
            let batch = std::mem::replace(&mut all, rest);
            let (sending, prepared_rx) = tokio::sync::oneshot::channel();
            prepared.push(prepared_rx);
            let c = ctx.clone();
            ctx.background.spawn(async move {
                let n = batch.len();
                if let Err(e) = round(&c, batch, sending).await {
                    tracing::warn!(destinations = n, error = %e, "probe round failed; the scheduler retries its destinations");
                }
            });
        }
        // A round that failed drops its sender: that also ends the wait.
        for rx in prepared {
            let _ = rx.await;
        }
    }
}

/// One destination's probe, ready to send.
struct Probe {
    dest: ServerName,
    loaded: Health,
    row: Waiting,
    /// The request's attempt row (`None`: the event is gone; nothing is sent).
    attempt: Option<i64>,
    _ticket: Ticket,
}

/// What a round does with a destination it looked at.
enum Plan {
    Probe(Waiting),
    /// Drained alone (see the module doc).
    Alone,
    /// It answered meanwhile: back to the deliver queue.
    Requeue,
    /// Nothing to send now (backing off, held, nothing waiting, rows waiting for others).
    Leave,
}

/// Probes `batch`; `sending` is told once the requests are about to go.
async fn round(
    ctx: &Arc<Ctx>,
    batch: Vec<(ServerName, Ticket)>,
    sending: tokio::sync::oneshot::Sender<()>,
) -> Result<(), JobError> {
    let app = &ctx.app;
    let owner = format!("{}-{:016x}", ctx.worker_id, rand::random::<u64>());
    // Before taking a connection (see `deliver::drain`).
    let key = app.signing_key().await?;
    let names: Vec<&str> = batch.iter().map(|(d, _)| d.as_str()).collect();
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let leased =
        destinations::acquire_leases(&mut conn, &names, &owner, deliver::lease_ttl(&app.cfg))
            .await?;
    let held: Vec<String> = leased.iter().map(|h| h.destination.clone()).collect();
    let ready = start(ctx, &mut conn, &owner, leased, batch).await;
    let (probes, bodies, alone, requeue) = match ready {
        Ok(r) => r,
        Err(e) => {
            // Give the leases back, so the scheduler's next job finds them free.
            let held: Vec<&str> = held.iter().map(String::as_str).collect();
            let _ = destinations::release_leases(&mut conn, &held, &owner).await;
            return Err(e);
        }
    };
    drop(conn);
    let _ = sending.send(());
    for (dest, ticket) in alone {
        let c = ctx.clone();
        ctx.background.spawn(async move {
            let _ticket = ticket;
            if let Err(e) = deliver::drain_destination(&c, &dest, true).await {
                tracing::warn!(destination = %dest, error = %e, "probing drain failed; the scheduler retries it");
            }
        });
    }
    if !requeue.is_empty() {
        if let Err(e) = app.queue.schedule_deliveries(&requeue).await {
            tracing::warn!(error = %e, "queueing destinations that answered meanwhile failed; the scheduler brings them back");
        }
    }
    // Every request at once, each in a task of its own (so a request's time is not
    // spent waiting while a group is recorded); the answers are recorded in groups as
    // they come.
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
    for p in probes {
        let body = p.attempt.and_then(|_| bodies.get(&p.row.event_id).cloned());
        let (c, key, answers) = (ctx.clone(), key.clone(), answers.clone());
        ctx.background.spawn(async move {
            let previous = Previous {
                resent: false,
                forbidden_in_a_row: p.loaded.consecutive_forbidden.max(0) as u32,
            };
            let sent =
                deliver::send_row(&c, &p.dest, &key, p.row.clone(), body, p.attempt, previous)
                    .await;
            let _ = answers.send((p, sent));
        });
    }
    drop(answers);
    while let Some(first) = answered.recv().await {
        let mut group = vec![first];
        while let Ok(more) = answered.try_recv() {
            group.push(more);
        }
        record(ctx, &owner, group).await;
    }
    Ok(())
}

/// What a round sends: the probes with their attempts begun, the bodies, the
/// destinations to drain alone (with their permits), those to hand back to the queue.
type Ready = (
    Vec<Probe>,
    HashMap<String, Bytes>,
    Vec<(ServerName, Ticket)>,
    Vec<String>,
);

/// Plans the round (`prepare`), reads the probe events' bodies (one statement; new
/// peers mostly share their probe event), begins an attempt for every request about
/// to go (one), and gives back the leases of destinations not probed here (one).
async fn start(
    ctx: &Ctx,
    conn: &mut parafed::store::PgConn,
    owner: &str,
    leased: Vec<Health>,
    batch: Vec<(ServerName, Ticket)>,
) -> Result<Ready, JobError> {
    let plans = prepare(ctx, conn, &leased).await?;
    let mut tickets: HashMap<String, Ticket> = batch
        .into_iter()
        .map(|(d, p)| (d.as_str().to_owned(), p))
        .collect();
    let mut probes = Vec::new();
    let (mut alone, mut requeue, mut free) = (Vec::new(), Vec::new(), Vec::new());
    for (h, plan) in leased.into_iter().zip(plans) {
        let (Some(ticket), Ok(dest)) = (
            tickets.remove(&h.destination),
            ServerName::parse(&h.destination),
        ) else {
            free.push(h.destination);
            continue;
        };
        match plan {
            Plan::Probe(row) => probes.push(Probe {
                dest,
                loaded: h,
                row,
                attempt: None,
                _ticket: ticket,
            }),
            Plan::Alone => {
                free.push(h.destination);
                alone.push((dest, ticket));
            }
            Plan::Requeue => {
                free.push(h.destination);
                requeue.push(dest.to_string());
            }
            Plan::Leave => free.push(h.destination),
        }
    }
    let mut ids: Vec<&str> = probes.iter().map(|p| p.row.event_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let bodies: HashMap<String, Bytes> = events::envelopes(conn, &ids)
        .await?
        .into_iter()
        .map(|(id, e)| (id, Bytes::from(e.to_wire())))
        .collect();
    let first: Vec<(i64, i32)> = probes
        .iter()
        .filter(|p| bodies.contains_key(&p.row.event_id))
        .map(|p| (p.row.id, p.row.attempts + 1))
        .collect();
    let begun: HashMap<i64, i64> = attempts::begin(conn, &first)
        .await?
        .into_iter()
        .map(|s| (s.outbound_id, s.id))
        .collect();
    for p in &mut probes {
        p.attempt = begun.get(&p.row.id).copied();
    }
    tracing::debug!(
        probes = probes.len(),
        alone = alone.len(),
        requeue = requeue.len(),
        left = free.len() - alone.len() - requeue.len(),
        "probe round"
    );
    let free: Vec<&str> = free.iter().map(String::as_str).collect();
    destinations::release_leases(conn, &free, owner).await?;
    Ok((probes, bodies, alone, requeue))
}

/// Decides, for each leased destination (in `leased`'s order), what the round does
/// with it; reads the rows and deferrals of all in two statements.
async fn prepare(
    ctx: &Ctx,
    conn: &mut parafed::store::PgConn,
    leased: &[Health],
) -> Result<Vec<Plan>, JobError> {
    let policy = &ctx.policy;
    let names: Vec<&str> = leased.iter().map(|h| h.destination.as_str()).collect();
    // Nobody else sends to these while we hold their leases: an attempt still open was
    // cut short by a sender that stopped.
    let n = attempts::close_open_of(conn, &names).await?;
    if n > 0 {
        tracing::info!(attempts = n, "closed attempts a stopped worker left open");
    }
    let since = Utc::now()
        - chrono::Duration::from_std(policy.dependency_wait)
            .unwrap_or(chrono::Duration::minutes(5));
    let deferred = deferrals::of_many(conn, &names).await?;
    let mut waiting = outbound::waiting_of(conn, &names, ROWS_LOOKED_AT, since).await?;
    let cutoff = Utc::now()
        - chrono::Duration::from_std(policy.max_age).unwrap_or(chrono::Duration::days(1));
    let mut plans = Vec::with_capacity(leased.len());
    let mut known = deliver::Earlier::new();
    for h in leased {
        let destination = match Destination::from_row(h.clone()) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(destination = %h.destination, error = %e, "unreadable destination state");
                plans.push(Plan::Leave);
                continue;
            }
        };
        match destination.sending(Utc::now()) {
            Sending::Probe => {}
            Sending::Window => {
                plans.push(Plan::Requeue);
                continue;
            }
            Sending::Wait | Sending::Recheck => {
                plans.push(Plan::Leave);
                continue;
            }
        }
        let rows = waiting.remove(&h.destination).unwrap_or_default();
        let owed = deferred.get(&h.destination).map_or(&[][..], Vec::as_slice);
        let looked_at = rows.len();
        let rows = deliver::held_back(rows, owed);
        if rows.is_empty() {
            // Nothing written to send: a deferral to catch up is the alone drain's work.
            plans.push(if owed.is_empty() {
                Plan::Leave
            } else {
                Plan::Alone
            });
            continue;
        }
        if rows.iter().any(|r| r.created_at < cutoff) {
            plans.push(Plan::Alone);
            continue;
        }
        let mut chosen = deliver::choose(ctx, conn, rows, 1, since, &mut known).await?;
        plans.push(match chosen.pop() {
            Some(row) => Plan::Probe(row),
            None if looked_at as i64 >= ROWS_LOOKED_AT => Plan::Alone,
            None => Plan::Leave,
        });
    }
    // The deferrals as they stand after the rows and the order check were read
    // (`deliver::fresh_deferrals` says why): a probe now behind a cursor that a fan-out
    // moved back is left to the alone drain, which catches the deferral up first.
    let probing: Vec<&str> = leased
        .iter()
        .zip(&plans)
        .filter(|(_, p)| matches!(p, Plan::Probe(_)))
        .map(|(h, _)| h.destination.as_str())
        .collect();
    if !probing.is_empty() {
        let fresh = deferrals::of_many(conn, &probing).await?;
        for (h, plan) in leased.iter().zip(plans.iter_mut()) {
            let Some(owed) = fresh.get(&h.destination) else {
                continue;
            };
            if matches!(plan, Plan::Probe(row) if deliver::behind(row, owed)) {
                *plan = Plan::Alone;
            }
        }
    }
    Ok(plans)
}

/// Records a group of answers: the destinations' states (one statement), the attempts
/// and rows (one), the leases given back (one); destinations that answered go back to
/// the deliver queue for the rest of their backlog. When recording fails, the leases
/// are given back all the same (the attempts stay open: the next drain closes them as
/// interrupted, as after a crash) and those that answered are queued.
async fn record(ctx: &Ctx, owner: &str, group: Vec<(Probe, Sent)>) {
    let app = &ctx.app;
    let policy = &ctx.policy;
    let now = Utc::now();
    let mut results: Vec<Sent> = Vec::with_capacity(group.len());
    let mut probes: Vec<Probe> = Vec::with_capacity(group.len());
    for (p, mut sent) in group {
        outcome::apply_forbidden_run(
            [(sent.status.map(|c| c as u16), &mut sent.outcome)],
            p.loaded.consecutive_forbidden.max(0) as u32,
            policy,
        );
        probes.push(p);
        results.push(sent);
    }
    let settled: Vec<deliver::Settlement> = probes
        .iter()
        .zip(&results)
        .map(|(p, r)| deliver::settlement(&p.loaded, std::slice::from_ref(r), now))
        .collect();
    let names: Vec<&str> = probes.iter().map(|p| p.dest.as_str()).collect();
    let saved = save(ctx, owner, &probes, &settled, &names).await;
    if let Err(e) = &saved {
        tracing::warn!(destinations = names.len(), error = %e, "recording probe answers failed; their attempts are closed as interrupted by the next drain");
        if let Ok(mut conn) = app.pool.get().await {
            let _ = destinations::release_leases(&mut conn, &names, owner).await;
        }
    }
    let delivered: u64 = settled.iter().map(|s| s.delivered).sum();
    let backoffs = settled.iter().filter(|s| s.backs_off).count();
    deliver::count(delivered, saved.unwrap_or(0), backoffs as u64);
    for (p, s) in probes.iter().zip(&settled).filter(|(_, s)| s.backs_off) {
        let error = s.changes.iter().find_map(|c| match c {
            DestinationEvent::Failed { reason, .. } => Some(reason.as_str()),
            _ => None,
        });
        tracing::debug!(destination = %p.dest, error, "probe failed; destination backing off");
    }
    if backoffs > 0 {
        tracing::info!(
            destinations = backoffs,
            "probes failed; those destinations back off"
        );
    }
    let answered: Vec<String> = probes
        .iter()
        .zip(&settled)
        .filter(|(_, s)| !s.backs_off)
        .map(|(p, _)| p.dest.to_string())
        .collect();
    if !answered.is_empty() {
        if let Err(e) = app.queue.schedule_deliveries(&answered).await {
            tracing::warn!(error = %e, "queueing destinations that answered failed; the scheduler brings them back");
        }
    }
}

/// The database part of [`record`]: states first (as `deliver::settle` does: whoever
/// sees a row settled sees the state its answer led to), then attempts and rows, then
/// the leases. Returns how many rows turned dead.
async fn save(
    ctx: &Ctx,
    owner: &str,
    probes: &[Probe],
    settled: &[deliver::Settlement<'_>],
    names: &[&str],
) -> Result<usize, JobError> {
    let mut changes: HashMap<&str, &[DestinationEvent]> = HashMap::new();
    let mut to_save = Vec::new();
    for (p, s) in probes.iter().zip(settled) {
        if !s.unchanged {
            changes.insert(p.loaded.destination.as_str(), &s.changes);
            to_save.push(p.loaded.clone());
        }
    }
    let policy = &ctx.policy;
    let mut conn = ctx.app.pool.get().await.map_err(StoreError::from)?;
    destinations::update_many(&mut conn, to_save, |h| {
        let mut d = Destination::from_row(h).map_err(StoreError::Corrupt)?;
        let events = changes.get(d.name.as_str()).copied().unwrap_or_default();
        for e in events {
            d = d.apply(e.clone(), policy);
        }
        Ok(d.to_row())
    })
    .await?;
    let finished: Vec<_> = settled
        .iter()
        .flat_map(|s| s.finished.iter().cloned())
        .collect();
    let rows: Vec<_> = settled
        .iter()
        .flat_map(|s| s.rows.iter().cloned())
        .collect();
    let dead = outbound::settle(&mut conn, &finished, &rows).await?;
    destinations::release_leases(&mut conn, names, owner).await?;
    Ok(dead)
}
