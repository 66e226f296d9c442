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

use std::collections::HashMap;

use parafed::delivery::order;
use parafed::protocol::ServerName;
use parafed::queue::FanoutJob;
use parafed::store::events::{self, StoredEvent};
use parafed::store::outbound::{self, Enqueued, NewOutbound};
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
    let rows = rows_of(&batch, &keys, targets);
    let done: Vec<&str> = batch.iter().map(|e| e.envelope.event_id.as_str()).collect();
    let written = {
        let mut conn = app.pool.get().await?;
        outbound::enqueue(&mut conn, &rows, &done).await?
    };
    schedule(ctx, &written).await
}

/// After rows were written: a drain queued for each destination that got some and is
/// healthy now (the others are drained when their backoff ends), one Redis round trip,
/// no database read (the statement that wrote them said which are healthy).
pub(crate) async fn schedule(ctx: &Ctx, written: &Enqueued) -> Result<(), JobError> {
    metrics::counter!("parafed_outbound_rows_total").increment(written.rows as u64);
    if !written.healthy.is_empty() {
        ctx.app.queue.schedule_deliveries(&written.healthy).await?;
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

/// The outbound rows of `batch`: each event (with its ordering keys, `keys`) and its
/// destinations.
pub(crate) fn rows_of<'a>(
    batch: &[&'a StoredEvent],
    keys: &'a [order::OrderKeys],
    targets: Vec<Vec<String>>,
) -> Vec<(NewOutbound<'a>, Vec<String>)> {
    batch
        .iter()
        .zip(keys)
        .zip(targets)
        .map(|((e, k), to)| {
            (
                NewOutbound {
                    event_id: e.envelope.event_id.as_str(),
                    event_seq: e.seq,
                    provides: &k.provides,
                    waits: &k.waits,
                },
                to,
            )
        })
        .collect()
}

/// Whether `e` is in a room hosted here (its room id's domain is ours): such events are
/// relayed to the room's servers.
pub(crate) fn hosted_here(app: &parafed::app::App, e: &StoredEvent) -> bool {
    e.envelope
        .room_id
        .domain()
        .eq_ignore_ascii_case(app.cfg.domain())
}
