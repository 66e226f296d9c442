//! fanout: who receives accepted events, as one outbound row per (event, destination).
//!
//! In a room hosted here, every joined server except us, the event's origin and the
//! server that handed it to us (relay, hub and spoke); for our own event in a room hosted
//! elsewhere, the host. Blocked peers get nothing. Deliver jobs are pushed only for
//! destinations that are healthy now; the others are drained when their backoff ends.
//!
//! A job carries a batch (one local event, or what the reconciler found unfanned). Its
//! cost is per batch: one read of the events, one of the rooms' servers with their states
//! and deferrals (`deferrals::fan_out_view`), the rows of every event written (and the
//! events marked fanned out) by one statement, one Redis round trip to schedule the
//! healthy destinations.
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
    let fanned = decide(ctx, &batch, &keys, &targets);
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

/// The destinations of a batch's events ([`targets`]): each distinct list once — a
/// room's servers we may send to — and per event its list and the servers it leaves
/// out. A batch of a room of a thousand servers is a thousand names, not a thousand per
/// event: fan-out looks each one up once per batch ([`decide`]).
pub(crate) struct Targets<'b> {
    lists: Vec<Vec<String>>,
    /// Per event: its list (`None`: nobody) and the servers left out of it (its origin,
    /// the server that handed it to us).
    events: Vec<(Option<usize>, [Option<&'b str>; 2])>,
    /// The batch's rooms hosted here, as read with their servers: each server's state
    /// and deferral in the room, for [`decide`].
    view: deferrals::FanOutView,
}

impl Targets<'_> {
    /// Event `i`'s destinations, each with its position in the event's list.
    fn of(&self, i: usize) -> impl Iterator<Item = (usize, &str)> {
        let (list, out) = self.events[i];
        list.map(|l| self.lists[l].as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(j, d)| (j, d.as_str()))
            .filter(move |(_, d)| !out.contains(&Some(*d)))
    }
}

/// The destinations of each event of `batch` (in storage order): in a room hosted here,
/// its joined servers (read for all the batch's rooms at once, with their states and
/// deferrals: `deferrals::fan_out_view`), but never us, the event's origin or the
/// server that handed it to us; for our own event in a room hosted elsewhere, the host.
/// Peers the operator refused are left out (their standing looked up once per batch).
pub(crate) async fn targets<'b>(
    ctx: &Ctx,
    batch: &[&'b StoredEvent],
) -> Result<Targets<'b>, JobError> {
    let app = &ctx.app;
    let me = app.cfg.server_name.as_str();
    let hosted = |e: &StoredEvent| hosted_here(app, e);
    // The rooms hosted here, their servers with what fan-out decides from (their
    // states and deferrals), in one statement.
    let view = {
        let mut rooms: Vec<&str> = batch
            .iter()
            .filter(|e| hosted(e))
            .map(|e| e.envelope.room_id.as_str())
            .collect();
        rooms.sort_unstable();
        rooms.dedup();
        if rooms.is_empty() {
            deferrals::FanOutView::default()
        } else {
            let mut conn = app.pool.get().await?;
            deferrals::fan_out_view(&mut conn, &rooms).await?
        }
    };
    let mut t = Targets {
        lists: Vec::new(),
        events: Vec::with_capacity(batch.len()),
        view,
    };
    // Each room's list (a room hosted here: its servers; elsewhere: its host), once.
    // Trust lookups may need a connection of their own: none is held while asking.
    let mut list_of: HashMap<(bool, &str), usize> = HashMap::new();
    for &e in batch {
        let env = &e.envelope;
        let ours = env.origin_server.as_str() == me;
        let key = if hosted(e) {
            Some((true, env.room_id.as_str()))
        } else if ours {
            Some((false, env.room_id.domain()))
        } else {
            None
        };
        let list = match key {
            None => None,
            Some(key) => Some(match list_of.get(&key) {
                Some(&l) => l,
                None => {
                    let candidates: Vec<&str> = match key {
                        (true, room) => t
                            .view
                            .servers
                            .get(room)
                            .map(|v| v.iter().map(String::as_str).collect())
                            .unwrap_or_default(),
                        (false, host) => vec![host],
                    };
                    let mut allowed = Vec::with_capacity(candidates.len());
                    for d in candidates {
                        if d == me {
                            continue;
                        }
                        let ok = match ServerName::parse(d) {
                            Ok(name) => !matches!(
                                app.trust.standing(&name).await?,
                                Standing::Refused { .. }
                            ),
                            Err(_) => false,
                        };
                        if ok {
                            allowed.push(d.to_owned());
                        }
                    }
                    t.lists.push(allowed);
                    list_of.insert(key, t.lists.len() - 1);
                    t.lists.len() - 1
                }
            }),
        };
        t.events.push((
            list,
            [Some(env.origin_server.as_str()), e.received_from.as_deref()],
        ));
    }
    Ok(t)
}

/// The fan-out of `batch`: each event (with its ordering keys, `keys`) and the
/// destinations that get a row now, the deferrals to start, and the healthy destinations
/// a deferral covers (`delivery::deferral::fan_out` decides each pair). Events of rooms
/// hosted here stored less than `dependency_wait` ago may be deferred
/// (`outbound::deferrable`); the destinations' states and deferrals were read with the
/// rooms' servers ([`targets`]), and are looked up once per list and room, not per pair.
pub(crate) fn decide<'a>(
    ctx: &Ctx,
    batch: &[&'a StoredEvent],
    keys: &'a [order::OrderKeys],
    targets: &Targets<'_>,
) -> Fanned<'a> {
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
    // The states of the destinations, and their deferrals: read with the rooms'
    // servers (`targets`), looked up for the deferrable events' pairs.
    let reach = &targets.view.reach;
    // By borrowed keys, nothing allocated.
    let open: HashMap<(&str, &str), Open> = targets
        .view
        .open
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
    /// What a pair's decision needs of its destination: its state (healthy,
    /// unreachable; `None`: new to us) and its deferral in the event's room.
    type Inputs = Vec<(Option<(bool, bool)>, Option<Open>)>;
    let mut inputs: HashMap<(usize, &str), Inputs> = HashMap::new();
    let mut fanned = Fanned::default();
    let mut start: HashMap<(&str, &str), i64> = HashMap::new();
    let mut covered: HashSet<&str> = HashSet::new();
    // Destinations new to us that got their probe (one row) in this batch.
    let mut probed: HashSet<&str> = HashSet::new();
    for (i, ((e, k), &d)) in batch.iter().zip(keys).zip(&deferrable).enumerate() {
        let room = e.envelope.room_id.as_str();
        let mut send = Vec::new();
        let mut conditional = Vec::new();
        if let Some(l) = targets.events[i].0 {
            let inputs = inputs.entry((l, room)).or_insert_with(|| {
                targets.lists[l]
                    .iter()
                    .map(|dest| {
                        (
                            reach.get(dest.as_str()).copied(),
                            open.get(&(dest.as_str(), room)).copied(),
                        )
                    })
                    .collect()
            });
            for (j, dest) in targets.of(i) {
                let (state, o) = inputs[j];
                let answers = state.is_some_and(|(healthy, unreachable)| healthy && !unreachable);
                let r = state.map(|(_, unreachable)| Reach { unreachable });
                let new_probed = r.is_none() && probed.contains(dest);
                match deferral::fan_out(d, e.seq, r, o, new_probed) {
                    How::Send => {
                        // New to us (no state row) and the event deferrable (so the
                        // rule looked at its state): this row is its probe.
                        if d && r.is_none() {
                            probed.insert(dest);
                        }
                        send.push(dest.to_owned())
                    }
                    How::Skip => {
                        fanned.deferred += 1;
                        // A destination that answers: its drain may end the deferral
                        // meanwhile (`deferrals::Then::End`), and the row is then
                        // written after all (`outbound::input_ctes`); its drain writes
                        // the row, so it is scheduled like a destination that got one.
                        // One that does not answer (most of a room's dead servers) cannot
                        // have it ended, costs the statement nothing, and is not
                        // scheduled: its probe is in flight or it backs off, and it comes
                        // back by itself.
                        if answers {
                            covered.insert(dest);
                            conditional.push(dest.to_owned());
                        }
                    }
                    How::Defer => {
                        fanned.deferred += 1;
                        let from = start.entry((dest, room)).or_insert(i64::MAX);
                        *from = (*from).min(e.seq - 1);
                    }
                }
            }
        }
        fanned.rows.push((
            NewOutbound {
                event_id: e.envelope.event_id.as_str(),
                event_seq: e.seq,
                room_id: room,
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
            destination: destination.to_owned(),
            room_id: room_id.to_owned(),
            from_seq,
        })
        .collect();
    start.sort_by(|a, b| (&a.destination, &a.room_id).cmp(&(&b.destination, &b.room_id)));
    fanned.start = start;
    fanned.covered_healthy = covered.into_iter().map(str::to_owned).collect();
    fanned.new = probed.into_iter().map(str::to_owned).collect();
    fanned
}

/// Whether `e` is in a room hosted here (its room id's domain is ours): such events are
/// relayed to the room's servers.
pub(crate) fn hosted_here(app: &parafed::app::App, e: &StoredEvent) -> bool {
    e.envelope
        .room_id
        .domain()
        .eq_ignore_ascii_case(app.cfg.domain())
}
