//! Hand-written SQL as named prepared statements, parsed once per connection.
//!
//! Diesel prepares and caches the statements its query builder writes, but marks every
//! `sql_query` as unsafe to cache (its text could be built from anything), so each run
//! of one is parsed, analysed and planned from scratch. The pipeline's hot statements
//! are `sql_query`s — multi-row `UNNEST`s and chains of CTEs the builder cannot write —
//! and at a steady rate, when batches are a few events, that parse and plan was a large
//! share of Postgres' CPU per event (see docs/performance.md).
//!
//! [`prepared`] wraps such a query so Diesel caches it by its text: the connection sends
//! `Parse` once and then only `Bind`/`Execute`. Wrap only statements whose text is
//! fixed (or takes a handful of forms, like a limit written into it): every distinct
//! text is a statement kept on each connection. Values still travel as bind
//! parameters; Postgres plans custom or generic as it does for any prepared statement
//! (`plan_cache_mode`). A generic plan does not know the parameters' values, so
//! statements whose best plan depends on them — a time bound of "minutes ago", a
//! limit — are not wrapped (`outbound::waiting`, `events::unsettled_before`,
//! `events::claim_stale`); the wrapped ones look rows up by key or unnest arrays.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::Untyped;
use diesel::QueryResult;

/// A `sql_query` (with its binds) that Diesel may cache as a prepared statement, keyed
/// by its SQL text. Built by [`prepared`]; run with `diesel_async::RunQueryDsl` as the
/// query it wraps.
#[derive(Debug, Clone)]
pub struct Prepared<Q>(Q);

/// Marks `query` — a `diesel::sql_query(…)` with its `.bind`s — as safe to keep
/// prepared (see the module doc for which statements qualify).
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

impl<Q> Query for Prepared<Q> {
    type SqlType = Untyped;
}
