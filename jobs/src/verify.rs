//! verify: decide whether a stored inbound event is accepted, and apply it.
//!
//! The envelope signature is checked against the origin's keys (fetched when missing);
//! the sender must be a user of the origin; in a room hosted here, a member event changes
//! membership and every other event needs its sender to be a joined member. Accepted
//! events join the inbound feed, and in a room hosted here are relayed (fanout).

use diesel_async::AsyncConnection;
use parafed::protocol::envelope::SignatureError;
use parafed::protocol::Envelope;
use parafed::queue::{FanoutJob, QueueName, VerifyJob};
use parafed::remote::KeyLookupError;
use parafed::store::rooms::{self, Membership};
use parafed::store::{events, feed};

use crate::context::{Ctx, JobError};

/// How long an event whose origin cannot be reached (its keys, its `/.well-known`) waits
/// to be judged. A relayed event is stored before its origin's keys are known (a dead
/// origin must not stall the room) and its relayer was told it arrived, so nobody sends
/// it again: rejecting it because the origin was briefly down would lose it. Within this
/// the job fails and is retried; after it, it is judged with what is known.
pub const UNREACHABLE_WAIT: chrono::Duration = chrono::Duration::hours(1);

/// A failure to judge that goes away by itself.
#[derive(Debug, thiserror::Error)]
#[error("{0}; the event is judged again later")]
struct NotYet(String);

/// Why an event is rejected (kept in `reject_reason`).
async fn judge(
    ctx: &Ctx,
    env: &Envelope,
    received_at: chrono::DateTime<chrono::Utc>,
) -> Result<Result<(), String>, JobError> {
    let app = &ctx.app;
    let may_wait = chrono::Utc::now() - received_at < UNREACHABLE_WAIT;
    // An authenticated peer handed us this event: finding its origin is not subject to
    // the lookup budget that made-up names in unauthenticated requests draw on.
    let endpoint = app.directory.resolve_trusted(&env.origin_server).await;
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
    if !env.room_id.domain().eq_ignore_ascii_case(app.cfg.domain()) {
        // A room hosted elsewhere: its host authorizes; we relay nothing.
        return Ok(Ok(()));
    }
    let mut conn = app.pool.get().await?;
    if rooms::hosted(&mut conn, env.room_id.as_str())
        .await?
        .is_none()
    {
        return Ok(Err(format!("room {} does not federate here", env.room_id)));
    }
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
            rooms::refresh_room_server(&mut conn, env.room_id.as_str(), env.origin_server.as_str())
                .await?;
        }
        None => {
            let m = rooms::membership(&mut conn, env.room_id.as_str(), env.sender.as_str()).await?;
            if m.as_deref() != Some("joined") {
                return Ok(Err(format!(
                    "{} is not a member of {}",
                    env.sender, env.room_id
                )));
            }
        }
    }
    Ok(Ok(()))
}

pub async fn run(ctx: &Ctx, job: &VerifyJob) -> Result<(), JobError> {
    let app = &ctx.app;
    let stored = {
        let mut conn = app.pool.get().await?;
        events::get(&mut conn, &job.event_id).await?
    };
    let Some(stored) = stored else {
        return Ok(()); // purged meanwhile
    };
    if stored.status != "pending" {
        return Ok(()); // already settled (a duplicate job)
    }
    let seq = stored.seq;
    let env = stored.envelope;
    let verdict = judge(ctx, &env, stored.received_at).await?;
    let mut conn = app.pool.get().await?;
    match verdict {
        Ok(()) => {
            // Accepted and in the feed together, or neither (a crash in between would
            // leave an accepted event the local app never sees).
            let (id, room) = (env.event_id.as_str(), env.room_id.as_str());
            let settled = conn
                .transaction::<_, parafed::store::StoreError, _>(async |c| {
                    if !events::settle(c, id, seq, true, None).await? {
                        return Ok(false);
                    }
                    feed::append(c, &[(id, room)]).await?;
                    Ok(true)
                })
                .await?;
            if !settled {
                return Ok(());
            }
            metrics::counter!("parafed_events_verified_total", "verdict" => "accepted")
                .increment(1);
            if env.room_id.domain().eq_ignore_ascii_case(app.cfg.domain()) {
                app.queue
                    .push(
                        QueueName::Fanout,
                        &FanoutJob {
                            event_id: env.event_id.to_string(),
                        },
                    )
                    .await?;
            } else {
                events::mark_fanned_out(&mut conn, env.event_id.as_str()).await?;
            }
        }
        Err(reason) => {
            events::settle(&mut conn, env.event_id.as_str(), seq, false, Some(&reason)).await?;
            // Counts towards the automatic quarantine of the peer that sent it.
            if let Some(from) = events::received_from(&mut conn, env.event_id.as_str()).await? {
                if let Ok(peer) = parafed::protocol::ServerName::parse(&from) {
                    parafed::trust::offenses::record(
                        &app.trust,
                        &peer,
                        parafed::trust::offenses::Offense::RejectedEvent,
                    )
                    .await;
                }
            }
            metrics::counter!("parafed_events_verified_total", "verdict" => "rejected")
                .increment(1);
            tracing::info!(event_id = %env.event_id, %reason, "event rejected");
        }
    }
    Ok(())
}
