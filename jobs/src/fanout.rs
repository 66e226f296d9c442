//! fanout: who receives an accepted event, as one outbound row per destination.
//!
//! In a room hosted here, every joined server except us, the event's origin and the
//! server that handed it to us (relay, hub and spoke); for our own event in a room hosted
//! elsewhere, the host. Blocked peers get nothing. Deliver jobs are pushed only for
//! destinations that are healthy now; the others are drained when their backoff ends.

use parafed::delivery::order;
use parafed::protocol::ServerName;
use parafed::queue::FanoutJob;
use parafed::store::outbound::{self, NewOutbound};
use parafed::store::rooms::{self, Membership};
use parafed::store::{destinations, events};
use parafed::trust::Standing;

use crate::context::{Ctx, JobError};

pub async fn run(ctx: &Ctx, job: &FanoutJob) -> Result<(), JobError> {
    let app = &ctx.app;
    let mut conn = app.pool.get().await?;
    let Some(stored) = events::get(&mut conn, &job.event_id).await? else {
        return Ok(());
    };
    // Not accepted, or a duplicate job (the reconciler re-pushed it, or a claim after a
    // slow ack): nothing to do, and cheap to find out.
    if stored.status != "accepted" || stored.fanned_out {
        return Ok(());
    }
    let env = stored.envelope;
    let ours = env.origin_server == app.cfg.server_name;
    let hosted = env.room_id.domain().eq_ignore_ascii_case(app.cfg.domain());

    let mut destinations: Vec<String> = if hosted {
        if ours {
            // Our own member events change membership in our rooms here.
            let m = match env.event_type.as_str() {
                "m.member.join" => Some(Membership::Joined),
                "m.member.leave" => Some(Membership::Left),
                _ => None,
            };
            if let Some(m) = m {
                rooms::set_member(
                    &mut conn,
                    env.room_id.as_str(),
                    env.sender.as_str(),
                    app.cfg.server_name.as_str(),
                    m,
                    Some(env.event_id.as_str()),
                )
                .await?;
            }
        }
        let from = events::received_from(&mut conn, env.event_id.as_str()).await?;
        rooms::joined_servers(&mut conn, env.room_id.as_str())
            .await?
            .into_iter()
            .filter(|s| s != app.cfg.server_name.as_str() && s != env.origin_server.as_str())
            .filter(|s| from.as_deref() != Some(s.as_str()))
            .collect()
    } else if ours {
        vec![env.room_id.domain().to_owned()]
    } else {
        Vec::new()
    };
    // Trust lookups may need a connection of their own: never hold one while asking.
    drop(conn);
    let mut allowed = Vec::with_capacity(destinations.len());
    for d in destinations.drain(..) {
        let Ok(name) = ServerName::parse(&d) else {
            continue;
        };
        if !matches!(app.trust.standing(&name).await?, Standing::Refused { .. }) {
            allowed.push(d);
        }
    }
    // What the event depends on at each destination (delivery order).
    let keys = order::keys_for(
        env.room_id.as_str(),
        env.event_type.as_str(),
        env.sender.as_str(),
        &env.content,
    );
    let row = NewOutbound {
        event_id: env.event_id.as_str(),
        event_seq: stored.seq,
        provides: &keys.provides,
        waits: &keys.waits,
    };
    let mut conn = app.pool.get().await?;
    let fresh = outbound::enqueue(&mut conn, &row, &allowed).await?;
    events::mark_fanned_out(&mut conn, env.event_id.as_str()).await?;
    let healthy = destinations::healthy_among(&mut conn, &fresh).await?;
    drop(conn);
    app.queue.schedule_deliveries(&healthy).await?;
    metrics::counter!("parafed_outbound_rows_total").increment(fresh.len() as u64);
    Ok(())
}
