//! Queues and their jobs: depth and pause per queue; jobs by queue and state, one job,
//! retry (a dead job back into its queue), cancel, and the dead streams redriven or
//! purged in bulk. The Redis side is `queue::admin`.

use serde::Serialize;

use super::{audit, AdminError, BulkResult, Page};
use crate::app::App;
use crate::queue::admin::{JobState, JobView, Pause};
use crate::queue::consume::MAX_DEAD_ENTRIES;
use crate::queue::QueueName;

/// One queue (`queues list`, `queues stats`).
#[derive(Debug, Serialize)]
pub struct QueueInfo {
    pub name: QueueName,
    /// Jobs waiting for a worker.
    pub ready: u64,
    /// Jobs a worker has read and not finished.
    pub in_flight: u64,
    /// Jobs moved aside after failing too often.
    pub dead: u64,
    /// Age of the oldest job still queued or in flight (ms); `null` when empty.
    pub oldest_age_ms: Option<i64>,
    /// Set when an operator paused the queue: no worker of the fleet takes its jobs.
    pub paused: Option<Pause>,
}

/// Parses a queue name.
pub fn queue_name(s: &str) -> Result<QueueName, AdminError> {
    QueueName::parse(s).ok_or_else(|| {
        AdminError::BadRequest(format!(
            "unknown queue {s:?}: the queues are verify, fanout and deliver"
        ))
    })
}

/// Parses a job state.
pub fn job_state(s: &str) -> Result<JobState, AdminError> {
    JobState::parse(s).ok_or_else(|| {
        AdminError::BadRequest(format!("unknown job state {s:?}: ready, in_flight or dead"))
    })
}

/// Checks a job id is a stream entry id (`<ms>-<n>`), so a typo is a clear 400 rather
/// than a Redis error.
pub fn entry_id(s: &str) -> Result<&str, AdminError> {
    let ok = s.split_once('-').is_some_and(|(a, b)| {
        !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
    });
    if ok && s.len() <= 41 {
        Ok(s)
    } else {
        Err(AdminError::BadRequest(format!(
            "{s:?} is not a job id: job ids look like 1764494400000-0 (see `jobs list`)"
        )))
    }
}

/// Every queue.
pub async fn list(app: &App) -> Result<Vec<QueueInfo>, AdminError> {
    let paused = app.queue.paused().await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut out = Vec::new();
    for q in QueueName::ALL {
        let s = app.queue.stats(q).await?;
        out.push(QueueInfo {
            name: q,
            ready: s.ready,
            in_flight: s.in_flight,
            dead: s.dead,
            oldest_age_ms: s.oldest_ms.map(|ms| (now - ms).max(0)),
            paused: paused.get(&q).cloned(),
        });
    }
    Ok(out)
}

/// One queue.
pub async fn stats(app: &App, q: QueueName) -> Result<QueueInfo, AdminError> {
    list(app)
        .await?
        .into_iter()
        .find(|i| i.name == q)
        .ok_or_else(|| AdminError::NotFound(format!("no queue {}", q.as_str())))
}

/// Pauses (`pause = true`) or resumes a queue for the whole fleet.
pub async fn set_paused(app: &App, q: QueueName, pause: bool) -> Result<QueueInfo, AdminError> {
    if pause {
        app.queue.pause(q, super::actor(app)).await?;
    } else {
        app.queue.resume(q).await?;
    }
    let action = if pause {
        "queues.pause"
    } else {
        "queues.resume"
    };
    audit(app, action, Some(q.as_str()), None, 1).await?;
    stats(app, q).await
}

/// Which jobs `jobs list` shows.
#[derive(Debug, Default, Serialize)]
pub struct JobFilter {
    pub queue: Option<QueueName>,
    pub state: Option<JobState>,
    /// Only jobs pushed longer ago than this (seconds).
    pub older_than_secs: Option<u64>,
}

/// Jobs by queue and state, oldest first within each (queue, state); the cursor is
/// `<queue>:<state>:<entry id>`.
pub async fn jobs(
    app: &App,
    f: &JobFilter,
    cursor: Option<&str>,
    limit: i64,
) -> Result<Page<JobView>, AdminError> {
    let queues: Vec<QueueName> = f.queue.map_or(QueueName::ALL.to_vec(), |q| vec![q]);
    let states: Vec<JobState> = f.state.map_or(JobState::ALL.to_vec(), |s| vec![s]);
    let pairs: Vec<(QueueName, JobState)> = queues
        .iter()
        .flat_map(|&q| states.iter().map(move |&s| (q, s)))
        .collect();
    let (mut start, mut after) = (0, None);
    if let Some(c) = cursor {
        let mut parts = c.splitn(3, ':');
        let (q, s, id) = (parts.next(), parts.next(), parts.next());
        let bad = || AdminError::BadRequest(format!("cursor {c:?} is not one this list gave"));
        let q = QueueName::parse(q.unwrap_or("")).ok_or_else(bad)?;
        let s = JobState::parse(s.unwrap_or("")).ok_or_else(bad)?;
        start = pairs.iter().position(|p| *p == (q, s)).ok_or_else(bad)?;
        let id = entry_id(id.ok_or_else(bad)?).map_err(|_| bad())?;
        after = Some(id.to_owned());
    }
    let cutoff = f
        .older_than_secs
        .map(|s| chrono::Utc::now().timestamp_millis() - (s as i64).saturating_mul(1000));
    let want = limit as usize;
    let mut items: Vec<JobView> = Vec::new();
    for (i, &(q, s)) in pairs.iter().enumerate().skip(start) {
        let mut after_here = if i == start { after.take() } else { None };
        'pair: while items.len() < want {
            let batch = app
                .queue
                .jobs(q, s, after_here.as_deref(), want - items.len())
                .await?;
            let done = batch.len() < want - items.len();
            for j in batch {
                after_here = Some(j.id.clone());
                // Oldest first: once one is young enough, the rest are too.
                if cutoff.is_some_and(|c| j.pushed_at_ms.is_some_and(|p| p > c)) {
                    break 'pair;
                }
                items.push(j);
            }
            if done {
                break;
            }
        }
        if items.len() >= want {
            break;
        }
    }
    Ok(Page::of(items, limit, |j| {
        format!("{}:{}:{}", j.queue.as_str(), j.state.as_str(), j.id)
    }))
}

/// One job.
pub async fn job(app: &App, q: QueueName, id: &str) -> Result<JobView, AdminError> {
    let id = entry_id(id)?;
    app.queue
        .job(q, id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no job {id} in queue {}", q.as_str())))
}

/// Puts a dead job back into its queue; returns it as pushed, with its new id.
pub async fn retry(app: &App, q: QueueName, id: &str) -> Result<JobView, AdminError> {
    let j = job(app, q, id).await?;
    if j.state != JobState::Dead {
        return Err(AdminError::Conflict(format!(
            "job {id} is {}, not dead: ready and in-flight jobs run by themselves",
            j.state.as_str()
        )));
    }
    let new_ids = app.queue.redrive(q, std::slice::from_ref(&j)).await?;
    audit(
        app,
        "jobs.retry",
        Some(&format!("{}:{id}", q.as_str())),
        None,
        1,
    )
    .await?;
    // The job as pushed (a worker may take it before anyone could read it back).
    Ok(JobView {
        id: new_ids.into_iter().next().unwrap_or_default(),
        state: JobState::Ready,
        pushed_at_ms: Some(chrono::Utc::now().timestamp_millis()),
        last_error: None,
        dead_from: None,
        ..j
    })
}

/// Removes a job (acknowledged, so no worker runs it). The work it names is still in
/// Postgres: the reconciler pushes a job again for unfinished work after `stale_after`.
pub async fn cancel(app: &App, q: QueueName, id: &str) -> Result<JobView, AdminError> {
    let j = job(app, q, id).await?;
    let n = app.queue.remove(q, std::slice::from_ref(&j)).await?;
    audit(
        app,
        "jobs.cancel",
        Some(&format!("{}:{id}", q.as_str())),
        None,
        n as i64,
    )
    .await?;
    Ok(j)
}

/// Redrives (`purge = false`) or purges the dead stream of each queue in `queues`.
pub async fn dead_bulk(
    app: &App,
    queues: &[QueueName],
    purge: bool,
    dry_run: bool,
) -> Result<BulkResult, AdminError> {
    let mut count = 0i64;
    for &q in queues {
        let dead = app
            .queue
            .jobs(q, JobState::Dead, None, MAX_DEAD_ENTRIES + 1000)
            .await?;
        if dry_run {
            count += dead.len() as i64;
            continue;
        }
        let n = if purge {
            app.queue.remove(q, &dead).await?
        } else {
            app.queue.redrive(q, &dead).await?.len()
        };
        count += n as i64;
    }
    let action = if purge { "purge" } else { "redrive" };
    if !dry_run {
        let filter = serde_json::json!({
            "queues": queues.iter().map(|q| q.as_str()).collect::<Vec<_>>(),
            "state": "dead",
        });
        audit(app, &format!("jobs.{action}"), None, Some(&filter), count).await?;
    }
    Ok(BulkResult {
        action,
        dry_run,
        count,
        truncated: false,
    })
}
