//! fanout: who receives accepted events, as one outbound row per (event, destination).
//!
//! In a room hosted here, every joined server except us, the event's origin and the
//! server that handed it to us (relay, hub and spoke); for our own event in a room hosted
//! elsewhere, the host. Blocked peers get nothing. Deliver jobs are pushed only for
//! destinations that are healthy now; the others are drained when their backoff ends.
//!
//! A job carries a batch (one local event, or what the reconciler found unfanned). Its
//! cost is per batch: one read of the events, one of each room's servers, the rows of
//! every event written (and the events marked fanned out) by one statement, one look at
//! which destinations are healthy, one Redis round trip to schedule them.
//!
//! Events accepted by `verify` are fanned out by verify itself, with [`targets`],
//! [`rows_of`] and [`schedule`], in the transaction that accepts them: no second job,
//! and one row version of the event fewer. This job is for the rest.

use std::collections::{HashMap, HashSet};

use parafed::delivery::deferral::{self, How, Open, Reach};
use parafed::delivery::order;
use parafed::protocol::ServerName;
use parafed::queue::FanoutJob;
use parafed::store::deferrals;
use parafed::store::events::{self, StoredEvent};
use parafed::store::outbound::{self, Deferred, Enqueued, Fanned, NewOutbound};
use parafed::store::rooms::{self, Membership};
use parafed::trust::Standing;

use crate::context::{Ctx, JobError};

pub async fn run(ctx: &Ctx, job: &FanoutJob) -> Result<(), JobError> {
    let app = &ctx.app;
    let me = app.cfg.server_name.as_str();
    let ids: Vec<&str> = job.event_ids.iter().map(String::as_str).collect();
    let mut conn = app.pool.get().await?;
    // Not accepted, or a duplicate job (the reconciler re-pushed it, or a claim after a
    // slow ack): nothing to do, and cheap to find out.
    let mut batch: Vec<StoredEvent> = events::get_many(&mut conn, &ids)
        .await?
        .into_values()
        .filter(|e| e.status == "accepted" && !e.fanned_out)
        .collect();
    if batch.is_empty() {
        return Ok(());
    }
    batch.sort_by_key(|e| e.seq);
    let hosted = |e: &StoredEvent| hosted_here(app, e);
    // Our own member events change membership in our rooms here, in order, before the
    // room's servers are read.
    for e in batch.iter().filter(|e| hosted(e)) {
        let env = &e.envelope;
        let m = match env.event_type.as_str() {
            "m.member.join" => Some(Membership::Joined),
            "m.member.leave" => Some(Membership::Left),
            _ => None,
        };
        if let (Some(m), true) = (m, env.origin_server.as_str() == me) {
            rooms::set_member(
                &mut conn,
                env.room_id.as_str(),
                env.sender.as_str(),
                me,
                m,
                Some(env.event_id.as_str()),
            )
            .await?;
        }
    }
    drop(conn);
    let batch: Vec<&StoredEvent> = batch.iter().collect();
    let targets = targets(ctx, &batch).await?;
    let keys: Vec<order::OrderKeys> = batch.iter().map(|e| order::keys_of(&e.envelope)).collect();
    let fanned = decide(ctx, &batch, &keys, targets).await?;
    let done: Vec<&str> = batch.iter().map(|e| e.envelope.event_id.as_str()).collect();
    let written = {
        let mut conn = app.pool.get().await?;
        outbound::enqueue(&mut conn, &fanned, &done).await?
    };
    schedule(ctx, &written).await
}

/// After rows were written: a drain queued for each destination that got some and is
/// healthy now (the others are drained when their backoff ends), one Redis round trip,
/// no database read (the statement that wrote them said which are healthy).
///
/// A destination new to us that got its probe here is handed to this worker's prober
/// instead (`probe::hand_over`): a room's first fan-out to a thousand servers would
/// otherwise queue a thousand deliver jobs, each a read of a state row the statement
/// just wrote, and the peers that answer would wait behind them.
pub(crate) async fn schedule(ctx: &Ctx, written: &Enqueued) -> Result<(), JobError> {
    metrics::counter!("parafed_outbound_rows_total").increment(written.rows as u64);
    metrics::counter!("parafed_outbound_deferred_total").increment(written.deferred as u64);
    let mut queued = Vec::with_capacity(written.healthy.len());
    for d in &written.healthy {
        if written.new.binary_search(d).is_err() || !crate::probe::hand_over(ctx, d).await? {
            queued.push(d.clone());
        }
    }
    if !queued.is_empty() {
        ctx.app.queue.schedule_deliveries(&queued).await?;
    }
    Ok(())
}

/// The destinations of each event of `batch` (in storage order), in the same order: in
/// a room hosted here, its joined servers (read once per room), but never us, the
/// event's origin or the server that handed it to us; for our own event in a room
/// hosted elsewhere, the host. Peers the operator refused are left out (their standing
/// looked up once per batch).
pub(crate) async fn targets(
    ctx: &Ctx,
    batch: &[&StoredEvent],
) -> Result<Vec<Vec<String>>, JobError> {
    let app = &ctx.app;
    let me = app.cfg.server_name.as_str();
    let hosted = |e: &StoredEvent| hosted_here(app, e);
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let mut servers: HashMap<&str, Vec<String>> = HashMap::new();
    {
        let mut conn = app.pool.get().await?;
        for e in batch.iter().filter(|e| hosted(e)) {
            let room = e.envelope.room_id.as_str();
            if !servers.contains_key(room) {
                servers.insert(room, rooms::joined_servers(&mut conn, room).await?);
            }
        }
    }
    // Trust lookups may need a connection of their own: none is held while asking.
    let mut standing: HashMap<String, bool> = HashMap::new();
    let mut targets: Vec<Vec<String>> = Vec::with_capacity(batch.len());
    for e in batch {
        let env = &e.envelope;
        let ours = env.origin_server.as_str() == me;
        let candidates: Vec<&str> = if hosted(e) {
            servers
                .get(env.room_id.as_str())
                .map(|v| v.iter().map(String::as_str).collect())
                .unwrap_or_default()
        } else if ours {
            vec![env.room_id.domain()]
        } else {
            Vec::new()
        };
        let mut allowed = Vec::new();
        for d in candidates {
            if d == me || d == env.origin_server.as_str() || e.received_from.as_deref() == Some(d) {
                continue;
            }
            let ok = match standing.get(d) {
                Some(&ok) => ok,
                None => {
                    let ok = match ServerName::parse(d) {
                        Ok(name) => {
                            !matches!(app.trust.standing(&name).await?, Standing::Refused { .. })
                        }
                        Err(_) => false,
                    };
                    standing.insert(d.to_owned(), ok);
                    ok
                }
            };
            if ok {
                allowed.push(d.to_owned());
            }
        }
        targets.push(allowed);
    }
    Ok(targets)
}

/// The fan-out of `batch`: each event (with its ordering keys, `keys`) and the
/// destinations that get a row now, the deferrals to start, and the healthy destinations
/// a deferral covers (`delivery::deferral::fan_out` decides each pair). Events of rooms
/// hosted here stored less than `dependency_wait` ago may be deferred
/// (`outbound::deferrable`); the destinations' states and deferrals are read for them in
/// one statement.
pub(crate) async fn decide<'a>(
    ctx: &Ctx,
    batch: &[&'a StoredEvent],
    keys: &'a [order::OrderKeys],
    targets: Vec<Vec<String>>,
) -> Result<Fanned<'a>, JobError> {
    let now = chrono::Utc::now();
    let deferrable: Vec<bool> = batch
        .iter()
        .map(|e| {
            outbound::deferrable(
                hosted_here(&ctx.app, e),
                e.released,
                e.received_at,
                now,
                ctx.policy.dependency_wait,
            )
        })
        .collect();
    // The states of the destinations of deferrable events, and their deferrals.
    let (reach, open) = {
        let mut names: Vec<&str> = Vec::new();
        let mut rooms: Vec<&str> = Vec::new();
        for ((e, to), &d) in batch.iter().zip(&targets).zip(&deferrable) {
            if d && !to.is_empty() {
                names.extend(to.iter().map(String::as_str));
                rooms.push(e.envelope.room_id.as_str());
            }
        }
        names.sort_unstable();
        names.dedup();
        rooms.sort_unstable();
        rooms.dedup();
        if names.is_empty() {
            Default::default()
        } else {
            let mut conn = ctx.app.pool.get().await?;
            deferrals::fan_out_view(&mut conn, &names, &rooms).await?
        }
    };
    // Looked up per (destination, event) pair: by borrowed keys, nothing allocated.
    let open: HashMap<(&str, &str), Open> = open
        .iter()
        .map(|((d, r), &(from_seq, until_seq))| {
            (
                (d.as_str(), r.as_str()),
                Open {
                    from_seq,
                    until_seq,
                },
            )
        })
        .collect();
    let mut fanned = Fanned::default();
    let mut start: HashMap<(String, String), i64> = HashMap::new();
    let mut covered: HashSet<&str> = HashSet::new();
    // Destinations new to us that got their probe (one row) in this batch.
    let mut probed: HashSet<String> = HashSet::new();
    for (((e, k), to), d) in batch.iter().zip(keys).zip(targets).zip(deferrable) {
        let room = e.envelope.room_id.as_str();
        let mut send = Vec::with_capacity(to.len());
        let mut conditional = Vec::new();
        for dest in to {
            let state = reach.get(&dest).copied();
            let answers = state.is_some_and(|(healthy, unreachable)| healthy && !unreachable);
            let r = state.map(|(_, unreachable)| Reach { unreachable });
            let o = open.get(&(dest.as_str(), room)).copied();
            let new_probed = r.is_none() && probed.contains(&dest);
            match deferral::fan_out(d, e.seq, r, o, new_probed) {
                How::Send => {
                    if r.is_none() {
                        probed.insert(dest.clone());
                    }
                    send.push(dest)
                }
                How::Skip => {
                    fanned.deferred += 1;
                    // A destination that answers: its drain may end the deferral
                    // meanwhile (`deferrals::Then::End`), and the row is then written
                    // after all (`outbound::input_ctes`). One that does not answer
                    // (most of a room's dead servers) cannot have it ended, and costs
                    // the statement nothing.
                    // Its drain writes the row, so it is scheduled like a destination
                    // that got one. One that does not answer is not: its probe is in
                    // flight or it backs off, and it comes back by itself.
                    if answers {
                        if let Some((known, _)) = reach.get_key_value(&dest) {
                            covered.insert(known.as_str());
                        }
                        conditional.push(dest);
                    }
                }
                How::Defer => {
                    fanned.deferred += 1;
                    let from = start.entry((dest, room.to_owned())).or_insert(i64::MAX);
                    *from = (*from).min(e.seq - 1);
                }
            }
        }
        fanned.rows.push((
            NewOutbound {
                event_id: e.envelope.event_id.as_str(),
                event_seq: e.seq,
                room_id: e.envelope.room_id.as_str(),
                provides: &k.provides,
                waits: &k.waits,
            },
            send,
        ));
        fanned.conditional.push(conditional);
    }
    let mut start: Vec<Deferred> = start
        .into_iter()
        .map(|((destination, room_id), from_seq)| Deferred {
            destination,
            room_id,
            from_seq,
        })
        .collect();
    start.sort_by(|a, b| (&a.destination, &a.room_id).cmp(&(&b.destination, &b.room_id)));
    fanned.start = start;
    fanned.covered_healthy = covered.into_iter().map(str::to_owned).collect();
    fanned.new = probed.into_iter().collect();
    Ok(fanned)
}

/// Whether `e` is in a room hosted here (its room id's domain is ours): such events are
/// relayed to the room's servers.
pub(crate) fn hosted_here(app: &parafed::app::App, e: &StoredEvent) -> bool {
    e.envelope
        .room_id
        .domain()
        .eq_ignore_ascii_case(app.cfg.domain())
}
