//! Destinations: each peer we deliver to, with its state, backlog, oldest pending
//! delivery, last error and next attempt; one with its recent attempts; and the
//! operator's transitions — retry-now (probe at once instead of at the end of the
//! backoff), pause and resume — applied through the destination's one save path
//! (`store::destinations::update`, the rules in `delivery::destination`).

use serde::Serialize;

use super::{audit, AdminError, Page};
use crate::app::App;
use crate::delivery::{Destination, DestinationEvent, Policy};
use crate::store::inspect::{self, Attempt, DestinationView};
use crate::store::{destinations, StoreError};

/// How many recent attempts `show` includes.
pub const RECENT_ATTEMPTS: i64 = 20;

/// A destination with its recent attempts, newest first.
#[derive(Debug, Serialize)]
pub struct DestinationDetail {
    pub destination: DestinationView,
    pub recent_attempts: Vec<Attempt>,
}

/// Parses a destination state filter.
pub fn state(s: &str) -> Result<&str, AdminError> {
    match s {
        "healthy" | "backing_off" | "held" | "paused" => Ok(s),
        _ => Err(AdminError::BadRequest(format!(
            "unknown destination state {s:?}: healthy, backing_off, held or paused"
        ))),
    }
}

pub async fn list(
    app: &App,
    state: Option<&str>,
    cursor: Option<&str>,
    limit: i64,
) -> Result<Page<DestinationView>, AdminError> {
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let rows = inspect::destinations(&mut conn, state, cursor, limit).await?;
    Ok(Page::of(rows, limit, |d| d.destination.clone()))
}

pub async fn show(app: &App, name: &str) -> Result<DestinationDetail, AdminError> {
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let destination = inspect::destination(&mut conn, name)
        .await?
        .ok_or_else(|| {
            AdminError::NotFound(format!(
                "no destination {name}: nothing was ever sent to it"
            ))
        })?;
    let recent_attempts = inspect::recent_attempts(&mut conn, name, RECENT_ATTEMPTS).await?;
    Ok(DestinationDetail {
        destination,
        recent_attempts,
    })
}

/// What an operator does to a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    RetryNow,
    Pause,
    Resume,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::RetryNow => "retry-now",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }
}

/// Applies an operator's action; `reason` goes with a pause.
pub async fn act(
    app: &App,
    name: &str,
    action: Action,
    reason: Option<&str>,
) -> Result<DestinationDetail, AdminError> {
    let policy = Policy::from_config(&app.cfg);
    let event = match action {
        Action::RetryNow => DestinationEvent::RetryNow {
            at: chrono::Utc::now(),
        },
        Action::Pause => DestinationEvent::Pause {
            by: super::actor(app).to_owned(),
            reason: reason.unwrap_or("paused by an operator").to_owned(),
        },
        Action::Resume => DestinationEvent::Resume,
    };
    {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        if action == Action::Pause {
            // A destination may be paused before anything was sent to it.
            destinations::ensure(&mut conn, &[name]).await?;
        }
        let saved = destinations::update(&mut conn, name, |h| {
            let d = Destination::from_row(h).map_err(StoreError::Corrupt)?;
            Ok(d.apply(event.clone(), &policy).to_row())
        })
        .await?;
        if saved.is_none() {
            return Err(AdminError::NotFound(format!(
                "no destination {name}: nothing was ever sent to it"
            )));
        }
    }
    if action != Action::Pause {
        app.queue.schedule_deliveries(&[name.to_owned()]).await?;
    }
    audit(
        app,
        &format!("destinations.{}", action.name()),
        Some(name),
        reason.map(|r| serde_json::json!({ "reason": r })).as_ref(),
        1,
    )
    .await?;
    show(app, name).await
}
