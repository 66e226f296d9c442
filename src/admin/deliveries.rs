//! Deliveries (outbound rows): list by destination, state, event and age; show one with
//! its attempts; retry a dead or cancelled one, cancel a pending one; and the same in
//! bulk by filter, with a dry run that counts exactly what the real run changes.
//!
//! A command that names a destination first writes the rows its deferrals owe (an
//! unreachable destination gets a deferral per room instead of a row per event:
//! `backfill`), so it acts on every delivery the destination is owed.
//!
//! A retried delivery goes back to `pending` with its event's storage order unchanged,
//! so it is sent in order for its room: dependants still waiting behind it wait for it
//! (`delivery::order`), and its destination's drain is scheduled at once.

use serde::Serialize;

use super::{audit, parse_cursor, AdminError, BulkResult, Page};
use crate::app::App;
use crate::store::inspect::{self, Attempt, Change, Delivery, DeliveryFilter, DeliveryState};
use crate::store::StoreError;

/// Parses a delivery state.
pub fn state(s: &str) -> Result<DeliveryState, AdminError> {
    DeliveryState::parse(s).ok_or_else(|| {
        AdminError::BadRequest(format!(
            "unknown delivery state {s:?}: pending, in_flight, delivered, dead or cancelled"
        ))
    })
}

/// A delivery with every request sent for it.
#[derive(Debug, Serialize)]
pub struct DeliveryDetail {
    pub delivery: Delivery,
    pub attempts: Vec<Attempt>,
}

/// Before a command that names a destination: the rows its deferrals owe are written
/// (`backfill::all`), so the command sees every delivery the destination is owed, not
/// only the rows written so far (docs/architecture.md, "Deferred fan-out").
async fn backfill(
    app: &App,
    conn: &mut crate::store::PgConn,
    f: &DeliveryFilter,
) -> Result<(), AdminError> {
    if let Some(dest) = &f.destination {
        let wait = crate::delivery::Policy::from_config(&app.cfg).dependency_wait;
        crate::backfill::all(conn, dest, wait).await?;
    }
    Ok(())
}

pub async fn list(
    app: &App,
    f: &DeliveryFilter,
    cursor: Option<&str>,
    limit: i64,
) -> Result<Page<Delivery>, AdminError> {
    let below = cursor.map(parse_cursor).transpose()?;
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    if below.is_none() {
        backfill(app, &mut conn, f).await?;
    }
    let rows = inspect::deliveries(&mut conn, f, below, limit).await?;
    Ok(Page::of(rows, limit, |d| d.id.to_string()))
}

pub async fn show(app: &App, id: i64) -> Result<DeliveryDetail, AdminError> {
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let delivery = inspect::delivery(&mut conn, id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no delivery {id}")))?;
    let attempts = inspect::attempts_of_delivery(&mut conn, id).await?;
    Ok(DeliveryDetail { delivery, attempts })
}

fn name(change: Change) -> &'static str {
    match change {
        Change::Retry => "retry",
        Change::Cancel => "cancel",
        Change::Purge => "purge",
    }
}

/// Applies `change` to the rows in `ids` it applies to. Returns how many rows changed,
/// and the destinations whose drains a retry needs (the caller schedules them once it
/// has read what it answers with, so the answer shows the change, not a later send).
async fn apply(app: &App, change: Change, ids: &[i64]) -> Result<(i64, Vec<String>), AdminError> {
    let destinations = {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        let reason = format!("cancelled by {}", super::actor(app));
        inspect::apply(&mut conn, change, ids, &reason).await?
    };
    let count = destinations.len() as i64;
    let mut drains = if change == Change::Retry {
        destinations
    } else {
        Vec::new()
    };
    drains.sort();
    drains.dedup();
    Ok((count, drains))
}

/// Retries, cancels or purges one delivery; `Conflict` when its state does not allow it.
pub async fn change_one(app: &App, change: Change, id: i64) -> Result<DeliveryDetail, AdminError> {
    let before = show(app, id).await?;
    let status = match before.delivery.state.as_str() {
        "in_flight" => "pending",
        s => s,
    };
    if !change.applies_to().contains(&status) {
        return Err(AdminError::Conflict(format!(
            "delivery {id} is {}: {} applies to {} deliveries only",
            before.delivery.state,
            name(change),
            change.applies_to().join(", ")
        )));
    }
    let (n, drains) = apply(app, change, &[id]).await?;
    audit(
        app,
        &format!("deliveries.{}", name(change)),
        Some(&id.to_string()),
        None,
        n,
    )
    .await?;
    let after = if change == Change::Purge {
        before
    } else {
        show(app, id).await?
    };
    app.queue.schedule_deliveries(&drains).await?;
    Ok(after)
}

/// Applies `change` to every delivery matching `f` that it applies to (at most
/// `store::inspect::MAX_BULK`); with `dry_run`, only counts them.
pub async fn change_bulk(
    app: &App,
    change: Change,
    f: &DeliveryFilter,
    dry_run: bool,
) -> Result<BulkResult, AdminError> {
    let (ids, truncated) = {
        let mut conn = app.pool.get().await.map_err(StoreError::from)?;
        backfill(app, &mut conn, f).await?;
        let mut ids = inspect::matching_ids(&mut conn, f, change).await?;
        let truncated = ids.len() as i64 > inspect::MAX_BULK;
        ids.truncate(inspect::MAX_BULK as usize);
        (ids, truncated)
    };
    let count = if dry_run {
        ids.len() as i64
    } else {
        let (n, drains) = apply(app, change, &ids).await?;
        app.queue.schedule_deliveries(&drains).await?;
        let filter = serde_json::to_value(f).unwrap_or_default();
        audit(
            app,
            &format!("deliveries.{}", name(change)),
            None,
            Some(&filter),
            n,
        )
        .await?;
        n
    };
    Ok(BulkResult {
        action: name(change),
        dry_run,
        count,
        truncated,
    })
}
