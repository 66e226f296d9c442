//! The operator's job-queue admin: one set of operations, served by the admin API
//! (`/_parafed/admin/v1`, `ingress::admin`) and driven by `parafed admin …` ([`cli`],
//! which calls the API of a running ingress). The operations are here, as functions over
//! the application state; the HTTP handlers only parse requests and render answers, and
//! the command line only builds requests and prints answers.
//!
//! * [`status`] — the fleet overview;
//! * [`queues`] — queues and their jobs (pause, resume, list, show, retry, cancel,
//!   redrive and purge the dead streams);
//! * [`deliveries`] — outbound rows by filter, their attempts, retry / cancel / purge;
//! * [`destinations`] — per-destination state and backlog, retry-now / pause / resume;
//! * [`events`] — an event and what happened to it at every destination;
//! * [`peers`] — trust and safety: allow, block, quarantine, release, purge, limits, mode.
//!
//! Every state-changing operation writes an audit row (`store::audit`) naming the admin
//! token's holder (`[admin] token_name`). Bulk operations take a `dry_run` flag and
//! report the count they would change, computed by the same selection as the real run.
//! Lists are keyset-paged: an answer carries `next_cursor`, passed back as `cursor`.

pub mod cli;
pub mod deliveries;
pub mod destinations;
pub mod events;
pub mod peers;
pub mod queues;
pub mod status;

use serde::Serialize;

use crate::app::App;
use crate::queue::QueueError;
use crate::store::{self, StoreError};

/// Items per page when the caller does not say.
pub const DEFAULT_LIMIT: i64 = 50;
/// Most items one page holds.
pub const MAX_LIMIT: i64 = 1000;

/// Why an admin operation failed; mapped to an HTTP status once, in `ingress::error`.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request is malformed (400): the message says which parameter and why.
    #[error("{0}")]
    BadRequest(String),
    /// The named job, delivery, destination or event does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The operation does not apply to the item's current state (409).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// One page of a list.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page of at most `limit` items, the next cursor taken from the last one when the
    /// page is full.
    pub fn of(items: Vec<T>, limit: i64, cursor: impl Fn(&T) -> String) -> Page<T> {
        let next_cursor = if items.len() as i64 >= limit {
            items.last().map(cursor)
        } else {
            None
        };
        Page { items, next_cursor }
    }
}

/// A page size from a request: [`DEFAULT_LIMIT`] when absent, 1..=[`MAX_LIMIT`].
pub fn limit(requested: Option<i64>) -> Result<i64, AdminError> {
    match requested {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(AdminError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}, not {n}"
        ))),
    }
}

/// What a bulk operation did (or, with `dry_run`, would do).
#[derive(Debug, Serialize)]
pub struct BulkResult {
    /// `retry`, `cancel`, `purge`, `redrive`.
    pub action: &'static str,
    pub dry_run: bool,
    /// Items changed (or that would be changed).
    pub count: i64,
    /// More items matched than one operation changes; run it again.
    pub truncated: bool,
}

/// Who is acting, for the audit trail.
pub fn actor(app: &App) -> &str {
    &app.cfg.admin.token_name
}

/// Writes the audit row of a state-changing call.
pub async fn audit(
    app: &App,
    action: &str,
    target: Option<&str>,
    filter: Option<&serde_json::Value>,
    count: i64,
) -> Result<(), AdminError> {
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let filter = filter.map(|f| f.to_string());
    store::audit::record(
        &mut conn,
        &store::audit::Entry {
            actor: actor(app),
            action,
            target,
            filter: filter.as_deref(),
            count,
        },
    )
    .await?;
    Ok(())
}

/// The audit trail, newest first.
pub async fn audit_list(
    app: &App,
    action: Option<&str>,
    cursor: Option<&str>,
    limit: i64,
) -> Result<Page<store::audit::AuditRow>, AdminError> {
    let before = cursor.map(parse_cursor).transpose()?;
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let rows = store::audit::list(&mut conn, before, action, limit).await?;
    Ok(Page::of(rows, limit, |r| r.id.to_string()))
}

/// A numeric cursor (an id or seq from the previous page).
pub fn parse_cursor(c: &str) -> Result<i64, AdminError> {
    c.parse()
        .map_err(|_| AdminError::BadRequest(format!("cursor {c:?} is not one this list gave")))
}

/// Our signing keys (`keys list`).
pub async fn keys_list(app: &App) -> Result<Vec<store::keys::KeyInfo>, AdminError> {
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    Ok(store::keys::list(&mut conn).await?)
}

/// Retires the active signing key and creates a new one (`keys rotate`); the retired
/// key keeps verifying for `[keys] retired_key_retention_secs`.
pub async fn keys_rotate(app: &App) -> Result<Vec<store::keys::KeyInfo>, AdminError> {
    let retention = chrono::Duration::seconds(
        i64::try_from(app.cfg.keys.retired_key_retention_secs).unwrap_or(i64::MAX / 1000),
    );
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let (old, new) = store::keys::rotate(&mut conn, None, retention).await?;
    drop(conn);
    audit(app, "keys.rotate", Some(&new.key_id), None, 1).await?;
    Ok(old.into_iter().chain(std::iter::once(new)).collect())
}
