//! deliver: drain one destination's backlog.
//!
//! One job per destination, not per row. The job takes the destination's lease (so one
//! worker in the fleet drains it at a time, and at most `window` requests are in flight
//! to it), then sends its oldest pending rows, a window at a time, until the backlog is
//! empty, the destination fails, or the job's time budget is spent (it then re-queues
//! itself, so one busy peer cannot hold a worker from the others).
//!
//! A destination coming out of backoff is probed with its oldest row alone; success
//! drains the rest. Every HTTP attempt is a row in `delivery_attempts`. Nothing goes to a
//! peer the operator quarantined (its rows wait, looked at again every minute) or
//! blocked (its waiting rows are cancelled).
//!
//! How answers are treated (PROTOCOL.md "What a sender must treat as what"):
//! 2xx delivered (`inserted:false` too); 409 re-signed and sent once more; 401, 408, 429,
//! 5xx and network errors are transient (the destination backs off, `Retry-After`
//! honoured); other 4xx are permanent for that event (dead, reason kept) — except a run
//! of 403s, which says our key or registration is wrong there: the destination then backs
//! off with the 403 on its state instead of dead-lettering everything.

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use http::{Method, StatusCode};
use parafed::protocol::ServerName;
use parafed::queue::DeliverJob;
use parafed::remote::send::send_signed;
use parafed::store::attempts::{self, Attempt};
use parafed::store::outbound::{self, Pending, RowOutcome};
use parafed::store::{events, StoreError};
use parafed::trust::Standing;

use crate::backoff;
use crate::context::{Ctx, JobError};

/// How long one job drains before yielding to other destinations.
const BUDGET: Duration = Duration::from_secs(10);
/// How often a quarantined destination is looked at again (it may have been released),
/// at most; never less often than the longest backoff.
const HOLD_RECHECK: Duration = Duration::from_secs(60);
/// 403s in a row after which 403 is the destination's problem, not the event's.
const FORBIDDEN_RUN: i32 = 3;

enum Drain {
    Empty,
    Stopped,
    Budget,
}

#[derive(Debug)]
enum Class {
    Delivered,
    Permanent(String),
    Transient {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// One HTTP attempt: number, status, error class, latency (ms), response excerpt.
type SentAttempt = (i32, Option<i32>, Option<&'static str>, i32, Option<String>);

struct RowResult {
    row: Pending,
    class: Class,
    status: Option<u16>,
    forbidden: bool,
    attempts: Vec<SentAttempt>,
}

pub async fn run(ctx: &Ctx, job: &DeliverJob) -> Result<(), JobError> {
    let app = &ctx.app;
    // From here on, new rows for this destination queue a new job.
    if let Err(e) = app.queue.clear_scheduled(&job.destination).await {
        tracing::debug!(error = %e, "could not clear the scheduled mark");
    }
    let Ok(dest) = ServerName::parse(&job.destination) else {
        return Ok(());
    };
    if !may_send(ctx, &dest).await? {
        return Ok(());
    }
    let started = Instant::now();
    // The lease names this job run, not just the process: two deliver jobs of one worker
    // process must not both hold a destination.
    let owner = format!("{}-{:016x}", ctx.worker_id, rand::random::<u64>());
    // The lease outlives one batch (renewed before each), so a worker that dies frees
    // the destination within about `job_timeout_ms`.
    let lease_ttl = chrono::Duration::milliseconds(
        app.cfg
            .worker
            .job_timeout_ms
            .max(2 * app.cfg.delivery.request_timeout_ms + 1000) as i64,
    );
    loop {
        {
            let mut conn = app.pool.get().await.map_err(StoreError::from)?;
            if !outbound::acquire_lease(&mut conn, dest.as_str(), &owner, lease_ttl).await? {
                return Ok(()); // another worker is draining it
            }
        }
        let outcome = drain(ctx, &dest, &owner, lease_ttl, started).await;
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        outbound::release_lease(&mut conn, dest.as_str(), &owner).await?;
        match outcome? {
            Drain::Stopped => return Ok(()),
            Drain::Budget => {
                app.queue.schedule_deliveries(&[dest.to_string()]).await?;
                return Ok(());
            }
            Drain::Empty => {
                // Rows that arrived while we held the lease, after our last look.
                if !outbound::has_pending(&mut conn, dest.as_str()).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// The trust decision about the destination: a blocked peer's waiting rows are
/// cancelled, a quarantined peer's wait (looked at again every `HOLD_RECHECK`) — our
/// events go to neither.
async fn may_send(ctx: &Ctx, dest: &ServerName) -> Result<bool, JobError> {
    let app = &ctx.app;
    match app.trust.standing(dest).await? {
        Standing::Allowed { .. } => Ok(true),
        Standing::Quarantined { .. } => {
            let recheck = HOLD_RECHECK.min(Duration::from_millis(
                app.cfg.delivery.backoff_cap_ms.max(1),
            ));
            let until = Utc::now()
                + chrono::Duration::from_std(recheck).unwrap_or(chrono::Duration::minutes(1));
            let reason = format!("outbound paused: {dest} is quarantined");
            let mut conn = app.pool.get().await.map_err(StoreError::from)?;
            outbound::destination_held(&mut conn, dest.as_str(), until, &reason).await?;
            Ok(false)
        }
        Standing::Refused { reason } => {
            let mut conn = app.pool.get().await.map_err(StoreError::from)?;
            let n = outbound::cancel_waiting(&mut conn, dest.as_str(), &reason).await?;
            if n > 0 {
                tracing::info!(destination = %dest, rows = n, %reason, "waiting rows cancelled");
            }
            Ok(false)
        }
    }
}

async fn drain(
    ctx: &Ctx,
    dest: &ServerName,
    owner: &str,
    lease_ttl: chrono::Duration,
    started: Instant,
) -> Result<Drain, JobError> {
    let app = &ctx.app;
    let window = i64::from(app.cfg.delivery.window);
    loop {
        if started.elapsed() > BUDGET {
            return Ok(Drain::Budget);
        }
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        if !outbound::acquire_lease(&mut conn, dest.as_str(), owner, lease_ttl).await? {
            return Ok(Drain::Stopped); // our lease lapsed and another worker took over
        }
        let Some(health) = outbound::health(&mut conn, dest.as_str()).await? else {
            return Ok(Drain::Empty);
        };
        if health.state == "paused" {
            return Ok(Drain::Stopped);
        }
        if health.backoff_until.is_some_and(|t| t > Utc::now()) {
            return Ok(Drain::Stopped);
        }
        let probing = health.state == "backoff";
        let rows = outbound::next_batch(&mut conn, dest.as_str(), if probing { 1 } else { window })
            .await?;
        if rows.is_empty() {
            return Ok(Drain::Empty);
        }
        // Rows past their maximum age are not sent any more.
        let cutoff = Utc::now() - chrono::Duration::seconds(app.cfg.delivery.max_age_secs as i64);
        let (expired, rows): (Vec<Pending>, Vec<Pending>) =
            rows.into_iter().partition(|r| r.created_at < cutoff);
        for r in &expired {
            outbound::settle(
                &mut conn,
                r.id,
                RowOutcome::Dead("expired: not delivered within max_age"),
            )
            .await?;
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
        let mut bodies = events::envelopes(&mut conn, &ids).await?;
        drop(conn);
        if rows.is_empty() {
            continue;
        }
        let forbidden_is_transient = health.consecutive_forbidden + 1 >= FORBIDDEN_RUN;
        let results = futures::future::join_all(rows.into_iter().map(|r| {
            let body = bodies.remove(&r.event_id).map(|e| Bytes::from(e.to_wire()));
            send_row(ctx, dest, r, body, forbidden_is_transient)
        }))
        .await;
        let results: Vec<RowResult> = results.into_iter().collect::<Result<_, _>>()?;
        if settle(ctx, dest, &health, results).await? {
            return Ok(Drain::Stopped);
        }
    }
}

/// Records attempts and row outcomes; updates the destination. True when it backed off.
async fn settle(
    ctx: &Ctx,
    dest: &ServerName,
    health: &outbound::Health,
    results: Vec<RowResult>,
) -> Result<bool, JobError> {
    let app = &ctx.app;
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let attempt_rows: Vec<Attempt> = results
        .iter()
        .flat_map(|r| {
            r.attempts
                .iter()
                .map(|(n, status, class, latency, excerpt)| Attempt {
                    outbound_id: Some(r.row.id),
                    destination: dest.as_str(),
                    event_id: Some(r.row.event_id.as_str()),
                    request_kind: "event",
                    attempt: *n,
                    status_code: *status,
                    error_class: *class,
                    latency_ms: *latency,
                    response_excerpt: excerpt.clone(),
                })
        })
        .collect();
    attempts::record(&mut conn, &attempt_rows).await?;

    let mut delivered = Vec::new();
    let mut transient: Option<(String, Option<u16>, Option<Duration>, bool)> = None;
    let mut permanent: Option<(String, Option<u16>, bool)> = None;
    for r in &results {
        match &r.class {
            Class::Delivered => delivered.push(r.row.id),
            Class::Permanent(reason) => {
                outbound::settle(&mut conn, r.row.id, RowOutcome::Dead(reason)).await?;
                permanent = Some((reason.clone(), r.status, r.forbidden));
            }
            Class::Transient { error, retry_after } => {
                outbound::settle(&mut conn, r.row.id, RowOutcome::Retry(error)).await?;
                if transient.is_none() {
                    transient = Some((error.clone(), r.status, *retry_after, r.forbidden));
                }
            }
        }
    }
    outbound::delivered(&mut conn, &delivered).await?;
    metrics::counter!("parafed_deliveries_total", "outcome" => "delivered")
        .increment(delivered.len() as u64);
    if !delivered.is_empty() {
        outbound::destination_ok(&mut conn, dest.as_str()).await?;
    }
    if let Some((error, status, retry_after, forbidden)) = transient {
        let failures = u32::try_from(health.consecutive_failures).unwrap_or(0) + 1;
        let delay = backoff::delay(
            failures,
            Duration::from_millis(app.cfg.delivery.backoff_base_ms),
            Duration::from_millis(app.cfg.delivery.backoff_cap_ms),
            retry_after,
        );
        let until =
            Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1));
        let failure = outbound::DestinationFailure {
            error: &error,
            status: status.map(i32::from),
            forbidden,
        };
        outbound::destination_failed(&mut conn, dest.as_str(), &failure, Some(until)).await?;
        metrics::counter!("parafed_destination_backoffs_total").increment(1);
        tracing::info!(destination = %dest, %error, ?delay, "destination backing off");
        return Ok(true);
    }
    if let Some((error, status, forbidden)) = permanent {
        let failure = outbound::DestinationFailure {
            error: &error,
            status: status.map(i32::from),
            forbidden,
        };
        outbound::destination_failed(&mut conn, dest.as_str(), &failure, None).await?;
        metrics::counter!("parafed_deliveries_total", "outcome" => "dead").increment(1);
    }
    Ok(false)
}

fn retry_after(resp: &parafed::remote::Response) -> Option<Duration> {
    resp.headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

async fn send_row(
    ctx: &Ctx,
    dest: &ServerName,
    row: Pending,
    body: Option<Bytes>,
    forbidden_is_transient: bool,
) -> Result<RowResult, JobError> {
    let app = &ctx.app;
    let Some(body) = body else {
        return Ok(RowResult {
            row,
            class: Class::Permanent("the event no longer exists".into()),
            status: None,
            forbidden: false,
            attempts: Vec::new(),
        });
    };
    let key = app.signing_key().await?;
    let mut attempts = Vec::new();
    let mut n = row.attempts;
    // At most two sends: a 409 (an identical request seen) is re-signed once.
    for resend in 0..2 {
        n += 1;
        let started = Instant::now();
        let r = send_signed(
            &app.client,
            &app.directory,
            &key,
            &app.cfg.server_name,
            dest,
            Method::POST,
            "/event",
            body.clone(),
        )
        .await;
        let latency = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
        metrics::histogram!("parafed_delivery_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let (class, status, forbidden) = match &r {
            Err(e) => {
                attempts.push((n, None, Some(e.class()), latency, Some(e.to_string())));
                (
                    Class::Transient {
                        error: e.to_string(),
                        retry_after: None,
                    },
                    None,
                    false,
                )
            }
            Ok(resp) => {
                let s = resp.status;
                let excerpt = attempts::excerpt(&resp.body);
                let class_label: Option<&'static str> = if s.is_success() {
                    None
                } else if s.is_client_error() {
                    Some("http_4xx")
                } else {
                    Some("http_5xx")
                };
                attempts.push((
                    n,
                    Some(i32::from(s.as_u16())),
                    class_label,
                    latency,
                    Some(excerpt.clone()),
                ));
                let error = format!("HTTP {}: {}", s.as_u16(), excerpt);
                let class = if s.is_success() {
                    Class::Delivered
                } else if s == StatusCode::CONFLICT && resend == 0 {
                    continue;
                } else if s == StatusCode::FORBIDDEN {
                    if forbidden_is_transient {
                        Class::Transient {
                            error,
                            retry_after: retry_after(resp),
                        }
                    } else {
                        Class::Permanent(error)
                    }
                } else if s.is_server_error()
                    || matches!(
                        s,
                        StatusCode::UNAUTHORIZED
                            | StatusCode::REQUEST_TIMEOUT
                            | StatusCode::TOO_MANY_REQUESTS
                            | StatusCode::CONFLICT
                    )
                {
                    Class::Transient {
                        error,
                        retry_after: retry_after(resp),
                    }
                } else {
                    Class::Permanent(error)
                };
                (class, Some(s.as_u16()), s == StatusCode::FORBIDDEN)
            }
        };
        return Ok(RowResult {
            row,
            class,
            status,
            forbidden,
            attempts,
        });
    }
    unreachable!("the loop returns on its second pass")
}
