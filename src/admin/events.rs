//! Events: list by room, origin and status; and `show`, the answer to "why was event X
//! not delivered to Y" — the event's verification result, its room, every destination
//! with its delivery's state, the destination's state and every attempt, and what
//! happens next and when (`delivery::explain`).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{parse_cursor, AdminError, Page};
use crate::app::App;
use crate::delivery::explain::{self, Next};
use crate::delivery::Destination;
use crate::queue::QueueName;
use crate::store::inspect::{self, Attempt, Delivery, DeliveryFilter, EventView};
use crate::store::{destinations, StoreError};

/// Most destinations `show` lists for one event.
pub const MAX_DESTINATIONS: i64 = 1000;

/// What happened to an event.
#[derive(Debug, Serialize)]
pub struct EventDetail {
    pub event: EventView,
    /// The event's next step while its deliveries do not decide yet (not verified, held,
    /// rejected, not fanned out); `null` once they do.
    pub next: Option<Next>,
    /// One entry per destination it is (or was) to be delivered to.
    pub destinations: Vec<DestinationReport>,
}

/// One destination's side of an event.
#[derive(Debug, Serialize)]
pub struct DestinationReport {
    pub destination: String,
    pub delivery: Delivery,
    /// The destination's state (`healthy`, `backing_off`, `held`, `paused`).
    pub destination_state: String,
    /// Every request sent for this delivery, oldest first.
    pub attempts: Vec<Attempt>,
    pub next: Next,
}

/// Parses an event status filter.
pub fn status(s: &str) -> Result<&str, AdminError> {
    match s {
        "pending" | "accepted" | "rejected" | "held" => Ok(s),
        _ => Err(AdminError::BadRequest(format!(
            "unknown event status {s:?}: pending, accepted, rejected or held"
        ))),
    }
}

/// Which events `events list` shows.
#[derive(Debug, Default)]
pub struct EventFilter {
    pub room: Option<String>,
    pub origin: Option<String>,
    pub status: Option<String>,
}

pub async fn list(
    app: &App,
    f: &EventFilter,
    cursor: Option<&str>,
    limit: i64,
) -> Result<Page<EventView>, AdminError> {
    let below = cursor.map(parse_cursor).transpose()?;
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let rows = inspect::events(
        &mut conn,
        f.room.as_deref(),
        f.origin.as_deref(),
        f.status.as_deref(),
        below,
        limit,
    )
    .await?;
    Ok(Page::of(rows, limit, |e| e.seq.to_string()))
}

pub async fn show(app: &App, event_id: &str) -> Result<EventDetail, AdminError> {
    let now = chrono::Utc::now();
    let deliver_paused = app.queue.paused().await?.contains_key(&QueueName::Deliver);
    let mut conn = app.pool.get().await.map_err(StoreError::from)?;
    let event = inspect::event(&mut conn, event_id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no event {event_id} is stored here")))?;
    let filter = DeliveryFilter {
        event_id: Some(event_id.to_owned()),
        ..DeliveryFilter::default()
    };
    let deliveries = inspect::deliveries(&mut conn, &filter, None, MAX_DESTINATIONS).await?;
    let mut attempts: BTreeMap<i64, Vec<Attempt>> = BTreeMap::new();
    for a in inspect::attempts_of_event(&mut conn, event_id).await? {
        if let Some(d) = a.delivery_id {
            attempts.entry(d).or_default().push(a);
        }
    }
    let mut reports = Vec::with_capacity(deliveries.len());
    for d in deliveries.into_iter().rev() {
        let state = destinations::get(&mut conn, &d.destination)
            .await?
            .map(Destination::from_row)
            .transpose()
            .map_err(StoreError::Corrupt)?
            .map(|dest| dest.state);
        let next = explain::for_delivery(
            d.id,
            &d.state,
            d.dead_reason.as_deref(),
            state.as_ref(),
            deliver_paused,
            now,
        );
        reports.push(DestinationReport {
            destination: d.destination.clone(),
            destination_state: state.as_ref().map_or("healthy", |s| s.name()).to_owned(),
            attempts: attempts.remove(&d.id).unwrap_or_default(),
            delivery: d,
            next,
        });
    }
    let next = explain::for_event(
        &event.status,
        event.fanned_out_at.is_some(),
        event.reject_reason.as_deref(),
    );
    Ok(EventDetail {
        event,
        next,
        destinations: reports,
    })
}
