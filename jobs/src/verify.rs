//! verify: decide whether stored inbound events are accepted, and apply them.
//!
//! A job carries a batch (the events of one group commit at the ingress), judged in
//! storage order. Each envelope signature not checked at the door (`signature_checked`)
//! is checked against its origin's keys (fetched when missing); the sender must be a
//! user of the origin; in a room hosted here, a
//! member event changes membership and every other event needs its sender to be a
//! joined member. Accepted events join the inbound feed, and in a room hosted here are
//! relayed: their outbound rows are written in the transaction that accepts them.
//!
//! The statements are per batch, not per event: one read of the events, one of the
//! rooms and memberships they need (`rooms::rules_view`), one of the relayed rooms'
//! servers with their states and deferrals (`fanout::targets`), one transaction that
//! accepts the events, appends them to the feed and writes their outbound rows, one
//! statement that rejects the rest. Only member events write on their own (they change
//! what the events after them are judged against).
//!
//! Fan-out here rather than in a job of its own: that job read the batch again and
//! wrote each event a second time (to mark it fanned out), a third of the Postgres work
//! of a relayed event.

use std::collections::HashMap;

use futures::StreamExt;

use parafed::delivery::order::{self, OrderKeys};
use parafed::protocol::envelope::SignatureError;
use parafed::protocol::Envelope;
use parafed::queue::{FanoutJob, QueueName, VerifyJob};
use parafed::remote::KeyLookupError;
use parafed::store::events::{self, Judged, StoredEvent};
use parafed::store::rooms::{self, Membership};

use crate::context::{Ctx, JobError};
use crate::fanout;

/// How long an event whose origin cannot be reached (its keys, its `/.well-known`) waits
/// to be judged. A relayed event is stored before its origin's keys are known (a dead
/// origin must not stall the room) and its relayer was told it arrived, so nobody sends
/// it again: rejecting it because the origin was briefly down would lose it. Within this
/// the job fails and is retried; after it, it is judged with what is known.
pub const UNREACHABLE_WAIT: chrono::Duration = chrono::Duration::hours(1);

/// How long a read of the verify queue that found less than a batch waits for the next
/// job before the run starts (`StreamConsumer::linger`; the wait ends when one comes).
/// At a steady 1 000 events/s the ingress's group commits come about 3 ms apart with
/// about three events each, and a run costs Postgres the same handful of statements
/// whatever its size; waiting up to 2 ms joins about two commits into one run
/// (docs/performance.md, twelfth round). An event on its own waits the whole 2 ms.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// A failure to judge that goes away by itself.
#[derive(Debug, thiserror::Error)]
#[error("{0}; the event is judged again later")]
struct NotYet(String);

/// What the origin says of an event: its envelope signature and its sender. `Ok(Err(reason))`
/// rejects it (the reason is kept in `reject_reason`); a `NotYet` error leaves it
/// pending for a later run.
///
/// The signature is judged when the event is received: one the ingress verified before
/// storing it (`StoredEvent::signature_checked`; the rule: PROTOCOL.md "Event
/// envelope") is not checked again here — that was a second ed25519 verification per
/// event, a quarter of the worker's CPU, and a worker without the origin's keys had to
/// fetch them first. Except for a held event that was released (`released`): it may
/// have been held for days, and is judged against the keys its origin lists now, like
/// any event that arrives now.
async fn judge_origin(ctx: &Ctx, e: &StoredEvent) -> Result<Result<(), String>, JobError> {
    let app = &ctx.app;
    let env = &e.envelope;
    let may_wait = chrono::Utc::now() - e.received_at < UNREACHABLE_WAIT;
    // An authenticated peer handed us this event: finding its origin is not subject to
    // the lookup budget that made-up names in unauthenticated requests draw on.
    let endpoint = app.directory.resolve_trusted(&env.origin_server).await;
    if !judged_at_the_door(e) {
        if let Err(reason) = judge_signature(ctx, env, may_wait).await? {
            return Ok(Err(reason));
        }
    }
    let domain = match endpoint {
        Ok(p) => Some(p.domain),
        Err(e @ parafed::remote::directory::DirectoryError::Discovery(..)) if may_wait => {
            return Err(NotYet(e.to_string()).into())
        }
        Err(_) => None,
    };
    if !env.sender_belongs_to_origin(domain.as_deref()) {
        return Ok(Err(format!(
            "sender {} is not a user of {}",
            env.sender, env.origin_server
        )));
    }
    Ok(Ok(()))
}

/// Whether the ingress's check of the event's signature stands: it checked it, and the
/// event was not held and released since (see [`judge_origin`]).
fn judged_at_the_door(e: &StoredEvent) -> bool {
    e.signature_checked && !e.released
}

/// The envelope signature against the origin's keys (fetched when missing): `Ok(Err)`
/// rejects the event, `NotYet` leaves it pending while the origin may still answer.
async fn judge_signature(
    ctx: &Ctx,
    env: &Envelope,
    may_wait: bool,
) -> Result<Result<(), String>, JobError> {
    let app = &ctx.app;
    // Keys first: a peer that is unreachable now is a reason to retry, not to reject.
    for kid in env.signing_key_ids().iter().take(4) {
        match app.keyring.key(&env.origin_server, kid).await {
            Ok(_) | Err(KeyLookupError::UnknownKey { .. }) => {}
            Err(e @ KeyLookupError::Unreachable { .. }) => {
                if may_wait && app.keyring.key_if_cached(&env.origin_server, kid).is_none() {
                    return Err(NotYet(e.to_string()).into());
                }
            }
            Err(e @ KeyLookupError::Unavailable(_)) => return Err(e.into()),
        }
    }
    let verdict = env.verify(|k| app.keyring.key_if_cached(&env.origin_server, k));
    parafed::telemetry::signature_checked("envelope", verdict.is_ok());
    match verdict {
        Ok(_) => {}
        Err(SignatureError::UnknownKey) => {
            return Ok(Err(format!(
                "signed only with keys {} does not publish",
                env.origin_server
            )))
        }
        Err(e) => return Ok(Err(e.to_string())),
    }
    Ok(Ok(()))
}

/// Judges a batch and settles it; the events not judged yet (their origin unreachable)
/// stay pending and fail the job, which is then retried — the settled ones are skipped
/// next time, as any event no longer pending is.
pub async fn run(ctx: &Ctx, job: &VerifyJob) -> Result<(), JobError> {
    let app = &ctx.app;
    let ids: Vec<&str> = job.event_ids.iter().map(String::as_str).collect();
    let stored = {
        let mut conn = app.pool.get().await?;
        events::get_many(&mut conn, &ids).await?
    };
    // Pending ones only (the rest were settled by a duplicate job, or purged), oldest
    // first: a join must be applied before the messages after it are judged.
    let mut pending: Vec<StoredEvent> = stored
        .into_values()
        .filter(|e| e.status == "pending")
        .collect();
    pending.sort_by_key(|e| e.seq);
    if pending.is_empty() {
        return Ok(());
    }
    look_up_origins(ctx, &pending).await;
    let mut judged: Vec<(StoredEvent, Result<(), String>)> = Vec::with_capacity(pending.len());
    let mut not_yet: Option<JobError> = None;
    for e in pending {
        match judge_origin(ctx, &e).await {
            Ok(v) => judged.push((e, v)),
            Err(err) if err.is::<NotYet>() => {
                not_yet.get_or_insert(err);
            }
            Err(err) => return Err(err),
        }
    }
    room_rules(ctx, &mut judged).await?;
    settle(ctx, &judged).await?;
    match not_yet {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Most origins looked up at once by [`look_up_origins`].
const ORIGIN_LOOKUPS: usize = 16;

/// Looks up, all at once (at most [`ORIGIN_LOOKUPS`] at a time), the origins whose keys
/// this process does not hold: their endpoints, and the keys that a run's events whose
/// signature is still to be checked need (an event checked at the door needs only its
/// origin's endpoint, for its sender).
/// A run holds the events of many origins (jobs read together are joined), and
/// [`judge_origin`] goes through them one after the other: one origin slow to answer
/// (a connect timeout, a hanging `/keys`) would hold every lookup behind it. What is
/// found — or found unreachable — is remembered by the directory and the keyring, so
/// the judging that follows reads memory; errors are judged there, not here.
async fn look_up_origins(ctx: &Ctx, events: &[StoredEvent]) {
    let app = &ctx.app;
    let mut missing: HashMap<&parafed::protocol::ServerName, Vec<parafed::protocol::KeyId>> =
        HashMap::new();
    for e in events {
        let env = &e.envelope;
        let keys_needed = !judged_at_the_door(e);
        for kid in env.signing_key_ids().into_iter().take(4) {
            if app
                .keyring
                .key_if_cached(&env.origin_server, &kid)
                .is_none()
            {
                let kids = missing.entry(&env.origin_server).or_default();
                if keys_needed && !kids.contains(&kid) {
                    kids.push(kid);
                }
            }
        }
    }
    // One origin: the judging does the same lookups in the same order.
    if missing.len() < 2 {
        return;
    }
    futures::stream::iter(missing)
        .for_each_concurrent(ORIGIN_LOOKUPS, |(origin, kids)| async move {
            let _ = app.directory.resolve_trusted(origin).await;
            for kid in &kids {
                let _ = app.keyring.key(origin, kid).await;
            }
        })
        .await;
}

/// The rules of rooms hosted here, applied in storage order to the events their origin
/// vouched for: the room must federate here; a member event changes membership (written
/// now: the events after it are judged against it); any other event needs its sender
/// joined.
async fn room_rules(
    ctx: &Ctx,
    judged: &mut [(StoredEvent, Result<(), String>)],
) -> Result<(), JobError> {
    let app = &ctx.app;
    let ours = |env: &Envelope| env.room_id.domain().eq_ignore_ascii_case(app.cfg.domain());
    let here: Vec<usize> = (0..judged.len())
        .filter(|&i| judged[i].1.is_ok() && ours(&judged[i].0.envelope))
        .collect();
    if here.is_empty() {
        return Ok(());
    }
    let mut conn = app.pool.get().await?;
    let mut rooms_here: Vec<&str> = here
        .iter()
        .map(|&i| judged[i].0.envelope.room_id.as_str())
        .collect();
    rooms_here.sort_unstable();
    rooms_here.dedup();
    let pairs: Vec<(&str, &str)> = here
        .iter()
        .map(|&i| {
            let env = &judged[i].0.envelope;
            (env.room_id.as_str(), env.sender.as_str())
        })
        .collect();
    let (hosted, mut members): (_, HashMap<(String, String), String>) =
        rooms::rules_view(&mut conn, &rooms_here, &pairs).await?;
    for i in here {
        let (e, verdict) = &mut judged[i];
        let env = &e.envelope;
        if !hosted.contains(env.room_id.as_str()) {
            *verdict = Err(format!("room {} does not federate here", env.room_id));
            continue;
        }
        let key = (env.room_id.to_string(), env.sender.to_string());
        let membership = match env.event_type.as_str() {
            "m.member.join" => Some(Membership::Joined),
            "m.member.leave" => Some(Membership::Left),
            _ => None,
        };
        match membership {
            Some(m) => {
                rooms::set_member(
                    &mut conn,
                    env.room_id.as_str(),
                    env.sender.as_str(),
                    env.origin_server.as_str(),
                    m,
                    Some(env.event_id.as_str()),
                )
                .await?;
                rooms::refresh_room_server(
                    &mut conn,
                    env.room_id.as_str(),
                    env.origin_server.as_str(),
                )
                .await?;
                members.insert(key, m.as_str().to_owned());
            }
            None => {
                if members.get(&key).map(String::as_str) != Some("joined") {
                    *verdict = Err(format!("{} is not a member of {}", env.sender, env.room_id));
                }
            }
        }
    }
    Ok(())
}

/// Writes the verdicts: the accepted in one transaction with their feed entries and,
/// for the events relayed from here, their outbound rows (`fanout::targets`); the
/// rejected in one statement. Our own events relayed back to us in a room hosted here
/// (rare) go to a fanout job, which also applies our own member events.
async fn settle(ctx: &Ctx, judged: &[(StoredEvent, Result<(), String>)]) -> Result<(), JobError> {
    let app = &ctx.app;
    let me = app.cfg.server_name.as_str();
    let hosted = |e: &StoredEvent| fanout::hosted_here(app, e);
    let ok: Vec<&StoredEvent> = judged
        .iter()
        .filter(|(_, v)| v.is_ok())
        .map(|(e, _)| e)
        .collect();
    let later = |e: &StoredEvent| hosted(e) && e.envelope.origin_server.as_str() == me;
    let accepted: Vec<Judged> = ok
        .iter()
        .map(|e| Judged {
            event_id: e.envelope.event_id.as_str(),
            seq: e.seq,
            fan_out_later: later(e),
        })
        .collect();
    // Relayed from here now: the accepted events of rooms hosted here, in storage order.
    let relayed: Vec<&StoredEvent> = ok
        .iter()
        .copied()
        .filter(|e| hosted(e) && !later(e))
        .collect();
    let targets = fanout::targets(ctx, &relayed).await?;
    let keys: Vec<OrderKeys> = relayed
        .iter()
        .map(|e| order::keys_of(&e.envelope))
        .collect();
    let fanned = fanout::decide(ctx, &relayed, &keys, &targets);
    let rejected: Vec<(&str, i64, &str)> = judged
        .iter()
        .filter_map(|(e, v)| {
            v.as_ref()
                .err()
                .map(|r| (e.envelope.event_id.as_str(), e.seq, r.as_str()))
        })
        .collect();
    let ((now_accepted, written), now_rejected) = {
        let mut conn = app.pool.get().await?;
        let a = events::accept(&mut conn, &accepted, &fanned).await?;
        let r = events::reject(&mut conn, &rejected).await?;
        (a, r)
    };
    metrics::counter!("parafed_events_verified_total", "verdict" => "accepted")
        .increment(now_accepted.len() as u64);
    metrics::counter!("parafed_events_verified_total", "verdict" => "rejected")
        .increment(now_rejected.len() as u64);
    let reasons: HashMap<&str, &str> = rejected.iter().map(|r| (r.0, r.2)).collect();
    for (id, from) in &now_rejected {
        let reason = reasons.get(id.as_str()).copied().unwrap_or("");
        tracing::info!(event_id = %id, %reason, "event rejected");
        // Counts towards the automatic quarantine of the peer that sent it.
        if let Some(peer) = from
            .as_deref()
            .and_then(|f| parafed::protocol::ServerName::parse(f).ok())
        {
            parafed::trust::offenses::record(
                &app.trust,
                &peer,
                parafed::trust::offenses::Offense::RejectedEvent,
            )
            .await;
        }
    }
    fanout::schedule(ctx, &written).await?;
    let fan_out_later: std::collections::HashSet<&str> = accepted
        .iter()
        .filter(|a| a.fan_out_later)
        .map(|a| a.event_id)
        .collect();
    let later: Vec<String> = now_accepted
        .into_iter()
        .filter(|id| fan_out_later.contains(id.as_str()))
        .collect();
    app.queue
        .push_many(QueueName::Fanout, &FanoutJob::batches(later))
        .await?;
    Ok(())
}
