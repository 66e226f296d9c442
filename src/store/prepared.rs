//! Statements kept prepared on the connection: parsed once, planned as Postgres' plan
//! cache decides, instead of parsed and planned on every run.
//!
//! Diesel prepares and caches most statements its query builder writes, but not all:
//! every `sql_query` is marked unsafe to cache (its text could be built from anything),
//! and so is every query-builder `UPDATE` (a changeset's text can vary with its
//! values). Each run of one is parsed, analysed and planned from scratch. At a steady
//! rate, when batches are a few events, that is a large share of Postgres' CPU per
//! event: with `pg_stat_statements.track_planning`, the drain's read of waiting rows
//! and its lease renewal spent 0.8 s planning per 10 000 events at 1 000 events/s,
//! four times what they spent running (docs/performance.md, twelfth round).
//!
//! [`prepared`] wraps such a query — a `sql_query` with its binds, or a query-builder
//! statement — so Diesel caches it by its text: the connection sends `Parse` once and
//! then only `Bind`/`Execute`. Wrap only statements whose text is fixed (or takes a
//! handful of forms, like a limit written into it): every distinct text is a statement
//! kept on each connection. Values still travel as bind parameters; Postgres plans
//! custom or generic as it does for any prepared statement (`plan_cache_mode`). A
//! generic plan does not know the parameters' values, so a statement whose best plan
//! depends on them — a limit, a time bound the planner cannot see through — is wrapped
//! only with the value written into its text or with a test that its generic plan is
//! the right one (`tests/it/store.rs`); `events::unsettled_before` and
//! `events::claim_stale` are not wrapped.
//!
//! ## Values the planner must not see
//!
//! Kept prepared is not yet planned once. Under `plan_cache_mode = auto` Postgres plans
//! a prepared statement with its values five times, then keeps the generic plan only if
//! it is estimated no dearer than those were. When the values move the estimate — the
//! length of an `= ANY($1)` list (a generic plan assumes ten), a time bound — it may
//! stay on custom plans and plan every run: verify's read of its events planned 2 092
//! times in 2 755 runs, the hosted-rooms lookup every time. Where the right plan is the
//! same whatever the values, they are handed over as `(SELECT $n)` (for a list
//! `= ANY((SELECT $n)::text[])`: without the cast Postgres reads a subquery): an InitPlan,
//! computed once as the statement starts, which no estimate looks into, so the custom
//! and generic plans cost the same and the generic one is kept after the fifth run.
//! An index still takes the value as its condition. The same holds for the arrays a
//! batch statement takes its rows from: `UNNEST($1::bigint[], …)` lets a custom plan see
//! how many rows there are, and a round of three rows is estimated cheaper than the
//! generic plan's default, so a drain round's settle and its attempts' begin were planned
//! anew on most runs at a steady rate (at 500 events/s, per 10 000 events: the settle
//! on 488–1 090 of its 1 043–1 372 runs, the begin on 256–1 221: docs/performance.md,
//! thirteenth round); each array is handed over as `UNNEST((SELECT $1::bigint[]), …)`.
//! Postgres had weighed, per statement and connection, the generic plan against the
//! average of the custom ones; now the two cost the same and the generic plan is kept
//! from the sixth run. No plan test of `tests/it/store.rs` changed its verdict; what is
//! given up is a custom plan's knowledge of a large batch (fan-out's inputs for a room
//! of a thousand destinations are estimated at ten rows; not measured to matter).
//! Fan-out's view (`deferrals::FAN_OUT_VIEW_STATEMENT`) is handed only the batch's rooms,
//! out of sight too; the room's servers, a thousand at times, are read by the statement
//! itself and joined, never searched as an array (eleventh and eighteenth rounds).
//! `tests/it/store.rs` checks that the statements every run makes are prepared and settle
//! on the generic plan.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::QueryResult;

/// A query that Diesel may cache as a prepared statement, keyed by its SQL text. Built
/// by [`prepared`]; run with `diesel_async::RunQueryDsl` as the query it wraps, with
/// the same result type.
#[derive(Debug, Clone)]
pub struct Prepared<Q>(Q);

/// Marks `query` — a `diesel::sql_query(…)` with its `.bind`s, or a query-builder
/// statement — as safe to keep prepared (see the module doc for which statements
/// qualify).
pub fn prepared<Q>(query: Q) -> Prepared<Q> {
    Prepared(query)
}

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

/// No static id: the statement cache keys it by its SQL text and bind types.
impl<Q> QueryId for Prepared<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}
