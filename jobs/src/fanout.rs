//! fanout: who receives accepted events, as one outbound row per (event, destination).
//!
//! In a room hosted here, every joined server except us, the event's origin and the
//! server that handed it to us (relay, hub and spoke); for our own event in a room hosted
//! elsewhere, the host. Blocked peers get nothing. Deliver jobs are pushed only for
//! destinations that are healthy now; the others are drained when their backoff ends.
//!
//! A job carries a batch (what one verify job accepted, or one local event). Its cost is
//! per batch: one read of the events, one of each room's servers, the rows of every
//! event written (and the events marked fanned out) by one statement, one look at which
//! destinations are healthy, one Redis round trip to schedule them.

use std::collections::HashMap;

use parafed::delivery::order;
use parafed::protocol::ServerName;
use parafed::queue::FanoutJob;
use parafed::store::destinations;
use parafed::store::events::{self, StoredEvent};
use parafed::store::outbound::{self, NewOutbound};
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
    let hosted = |e: &StoredEvent| {
        e.envelope
            .room_id
            .domain()
            .eq_ignore_ascii_case(app.cfg.domain())
    };
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
    let mut servers: HashMap<&str, Vec<String>> = HashMap::new();
    for e in batch.iter().filter(|e| hosted(e)) {
        let room = e.envelope.room_id.as_str();
        if !servers.contains_key(room) {
            servers.insert(room, rooms::joined_servers(&mut conn, room).await?);
        }
    }
    // Trust lookups may need a connection of their own: never hold one while asking.
    drop(conn);
    let mut standing: HashMap<String, bool> = HashMap::new();
    let mut targets: Vec<Vec<String>> = Vec::with_capacity(batch.len());
    for e in &batch {
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
    // What each event depends on at its destinations (delivery order).
    let keys: Vec<order::OrderKeys> = batch.iter().map(|e| order::keys_of(&e.envelope)).collect();
    let rows: Vec<(NewOutbound, Vec<String>)> = batch
        .iter()
        .zip(&keys)
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
        .collect();
    let done: Vec<&str> = batch.iter().map(|e| e.envelope.event_id.as_str()).collect();
    let mut conn = app.pool.get().await?;
    let written = outbound::enqueue(&mut conn, &rows, &done).await?;
    let healthy = destinations::healthy_among(&mut conn, &written.destinations).await?;
    drop(conn);
    app.queue.schedule_deliveries(&healthy).await?;
    metrics::counter!("parafed_outbound_rows_total").increment(written.rows as u64);
    Ok(())
}
