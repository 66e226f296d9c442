//! Backfill: writing the outbound rows a destination's deferrals owe.
//!
//! Fan-out leaves an unreachable destination a deferral per room instead of a row per
//! event (docs/architecture.md, "Deferred fan-out"); the rows are written here, in the
//! room's storage order, and the deferral's cursor moves past them. What is written is
//! decided by `delivery::deferral::plan` (pure, table-tested); this module only reads and
//! writes around it.
//!
//! Two callers: the deliver job backfills a few windows ahead of what it sends
//! ([`catch_up`], bounded per call), and the admin backfills a destination completely
//! ([`all`]) before a `deliveries` command that names it, so listing, cancelling and
//! purging act on every delivery it is owed, not only on the rows written so far.

use std::time::Duration;

use chrono::Utc;

use crate::delivery::deferral::{self, Deferral, Owed, Standing};
use crate::delivery::order::{self, OrderKeys};
use crate::store::deferrals::{self, Caught, Stored, Then};
use crate::store::{events, StoreError};
use diesel_async::AsyncPgConnection;

/// What one backfill call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backfilled {
    /// Rows handed to the insert (one that existed already is left alone, and counted).
    pub rows: usize,
    /// Whether any deferral's cursor moved (or a finished one went).
    pub moved: bool,
}

/// Writes the rows of `deferred` (the destination's deferrals, `deferrals::of`), at most
/// `budget` events of each room, and moves their cursors: one read of the room's events
/// and one statement per room that moved. `dependency_wait` is the policy's
/// (`Policy::dependency_wait`: unsettled events older than twice it are passed over).
/// With `may_end` (the destination answers), a deferral caught up ends
/// (`deferrals::Then::End`): the destination's later events get rows from fan-out.
pub async fn catch_up(
    conn: &mut AsyncPgConnection,
    dest: &str,
    deferred: &[Stored],
    budget: usize,
    dependency_wait: Duration,
    may_end: bool,
) -> Result<Backfilled, StoreError> {
    let now = Utc::now();
    let mut done = Backfilled::default();
    for d in deferred {
        let events =
            events::room_after(conn, &d.room_id, d.from_seq, d.until_seq, budget as i64).await?;
        let owed: Vec<Owed> = events
            .iter()
            .map(|e| Owed {
                seq: e.seq,
                standing: match e.status.as_str() {
                    "accepted" if e.fanned_out => Standing::Relayed,
                    "rejected" => Standing::Rejected,
                    "held" => Standing::Held,
                    _ => Standing::Unsettled,
                },
                received_at: e.received_at,
                origin: e.envelope.origin_server.as_str(),
                received_from: e.received_from.as_deref(),
            })
            .collect();
        let state = Deferral {
            cursor: d.from_seq,
            until: d.until_seq,
            joined: d.joined,
        };
        let plan = deferral::plan(
            dest,
            state,
            &owed,
            events.len() < budget,
            now,
            dependency_wait,
        );
        // A destination that answers is back to rows once its deferral is caught up.
        let then = if plan.done {
            Then::Finish
        } else if may_end && plan.caught_up && d.joined && d.until_seq.is_none() {
            Then::End { touched: d.touched }
        } else {
            Then::Move
        };
        if plan.cursor == d.from_seq && then == Then::Move {
            continue;
        }
        let keys: Vec<OrderKeys> = plan
            .rows
            .iter()
            .map(|&i| order::keys_of(&events[i].envelope))
            .collect();
        let rows: Vec<Caught> = plan
            .rows
            .iter()
            .zip(&keys)
            .map(|(&i, k)| Caught {
                event_id: events[i].envelope.event_id.as_str(),
                event_seq: events[i].seq,
                provides: &k.provides,
                waits: &k.waits,
                received_at: events[i].received_at,
            })
            .collect();
        let moved =
            deferrals::advance(conn, dest, &d.room_id, d.from_seq, plan.cursor, then, &rows)
                .await?;
        done.rows += rows.len();
        done.moved |= moved;
    }
    if done.rows > 0 {
        metrics::counter!("parafed_outbound_rows_total").increment(done.rows as u64);
    }
    Ok(done)
}

/// Events read per room and round by [`all`].
const ALL_BUDGET: usize = 1_000;
/// Rounds [`all`] runs at most: a million events per room, a bound on one admin command.
const ALL_ROUNDS: usize = 1_000;

/// Backfills everything the destination's deferrals owe that can be written now (up to
/// the first event still being verified in each room; see `delivery::deferral`).
/// Returns the rows written.
pub async fn all(
    conn: &mut AsyncPgConnection,
    dest: &str,
    dependency_wait: Duration,
) -> Result<usize, StoreError> {
    let mut rows = 0;
    for _ in 0..ALL_ROUNDS {
        let deferred = deferrals::of(conn, dest).await?;
        if deferred.is_empty() {
            break;
        }
        let round = catch_up(conn, dest, &deferred, ALL_BUDGET, dependency_wait, false).await?;
        rows += round.rows;
        if !round.moved {
            break;
        }
    }
    Ok(rows)
}
