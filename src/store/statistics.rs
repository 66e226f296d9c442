//! Planner statistics that keep up with the tables that grow fastest.
//!
//! Postgres plans a query from the statistics its last `ANALYZE` took, and keeps the
//! plan of a prepared statement (`store::prepared`) until something invalidates it — an
//! `ANALYZE` of a table it reads does. Autovacuum takes them only every
//! `autovacuum_naptime` (a minute by default). The queue tables of a fresh deployment, or
//! of one whose peer just came back, grow from nothing to tens of thousands of rows
//! within that minute, and every plan made while they were nearly empty stays what it
//! was: a sequential scan of `federation_events` to read a few events by id, of
//! `outbound_queue` to open a window's attempts (measured: the first took 2.4 s of
//! statement time in a 10 s run whose Postgres used 8.5 s of CPU; docs/performance.md,
//! sixth round).
//!
//! So every worker looks at the change counters of [`WATCHED`] once a second (one
//! read of `pg_stat_user_tables`) and analyzes a table itself once it may have doubled or
//! emptied since its statistics were taken ([`stale`]): a handful of `ANALYZE`s while a
//! table grows by orders of magnitude, about one per turnover of its rows while it holds
//! steady (autovacuum's finer rule, set by the migrations, still applies). A table a
//! vacuum or an analyze is working on is left to it, workers share the work through an
//! advisory lock per table, and tables this role does not own (only their owner may
//! analyze them) are reported, for the worker to say so once.

use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::StoreError;

/// The tables whose size moves by orders of magnitude within a minute: the events, the
/// queue, the attempts, the feed, the deferrals.
pub const WATCHED: [&str; 5] = [
    "federation_events",
    "outbound_queue",
    "delivery_attempts",
    "inbound_feed",
    "outbound_deferrals",
];

/// Changes below which a table's statistics are never taken again by parafed: a small
/// table is cheap to read with any plan.
pub const MIN_CHANGES: i64 = 500;

/// Whether a table's statistics should be taken again: at least [`MIN_CHANGES`] rows
/// were inserted, updated or deleted since they were taken (`changed`:
/// `pg_stat_user_tables.n_mod_since_analyze`), and at least as many as the table held
/// then (`rows`: `pg_class.reltuples`; −1 when never analyzed, 0 on Postgres 13) — so
/// it may have doubled, or lost most of its rows. Inserts, updates and deletes all
/// count: a table that only grows is analyzed about a dozen times on its way from
/// nothing to a million rows (at 500, 1 000, 2 000, … changes); a queue of steady size,
/// whose rows are inserted, settled and deleted, about once each time its rows turned
/// over.
pub fn stale(changed: i64, rows: f64) -> bool {
    changed >= MIN_CHANGES && changed as f64 >= rows.max(0.0)
}

/// What a [`refresh`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Tables it ran `ANALYZE` on (with `SKIP_LOCKED`: one that autovacuum held at that
    /// moment is counted, and left for the next look).
    pub analyzed: Vec<&'static str>,
    /// [`WATCHED`] tables this role does not own: only their owner may analyze them, so
    /// they are left to autovacuum (docs/operations.md, "Postgres settings").
    pub not_owned: Vec<&'static str>,
}

/// Analyzes the [`WATCHED`] tables this role owns whose statistics are [`stale`] and
/// that no vacuum or analyze is working on (`pg_stat_progress_*`). Workers of a fleet
/// share the work: each table is analyzed under a transaction-scoped advisory lock
/// (`pg_try_advisory_xact_lock`, keys [`LOCK_CLASS`] and the table's place in
/// [`WATCHED`]), and its counter is read again under the lock, so a worker that looked
/// just before another one's `ANALYZE` ended does not run it a second time.
///
/// # Errors
/// [`StoreError`] when the counters cannot be read or an `ANALYZE` fails.
pub async fn refresh(conn: &mut AsyncPgConnection) -> Result<Refreshed, StoreError> {
    let mut done = Refreshed::default();
    for c in counters(conn, &WATCHED).await? {
        // The name is one of ours, never the database's: only those go into the SQL.
        let Some(place) = WATCHED.iter().position(|t| *t == c.name) else {
            continue;
        };
        let table = WATCHED[place];
        if !c.owned {
            done.not_owned.push(table);
            continue;
        }
        if c.busy || !stale(c.changed, c.rows) {
            continue;
        }
        let analyzed = conn
            .transaction::<_, StoreError, _>(async |conn| {
                #[derive(QueryableByName)]
                struct Locked {
                    #[diesel(sql_type = Bool)]
                    locked: bool,
                }
                let l: Locked =
                    diesel::sql_query("SELECT pg_try_advisory_xact_lock($1, $2) AS locked")
                        .bind::<Integer, _>(LOCK_CLASS)
                        .bind::<Integer, _>(place as i32)
                        .get_result(conn)
                        .await?;
                if !l.locked {
                    return Ok(false);
                }
                let again = counters(conn, &[table]).await?;
                if !again.iter().any(|c| !c.busy && stale(c.changed, c.rows)) {
                    return Ok(false);
                }
                diesel::sql_query(format!("ANALYZE (SKIP_LOCKED) {table}"))
                    .execute(conn)
                    .await?;
                Ok(true)
            })
            .await?;
        if analyzed {
            done.analyzed.push(table);
        }
    }
    Ok(done)
}

/// The first key of the advisory locks [`refresh`] takes (the second is the table's
/// place in [`WATCHED`]): "pfst", parafed statistics.
pub const LOCK_CLASS: i32 = 0x7066_7374;

/// A table's change counter, as [`refresh`] reads it.
#[derive(QueryableByName)]
struct Counter {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = BigInt)]
    changed: i64,
    #[diesel(sql_type = Double)]
    rows: f64,
    /// This role may analyze it.
    #[diesel(sql_type = Bool)]
    owned: bool,
    /// A vacuum or an analyze is working on it now.
    #[diesel(sql_type = Bool)]
    busy: bool,
}

async fn counters(
    conn: &mut AsyncPgConnection,
    tables: &[&str],
) -> Result<Vec<Counter>, StoreError> {
    Ok(diesel::sql_query(
        "SELECT s.relname::text AS name, s.n_mod_since_analyze AS changed, \
                c.reltuples::float8 AS rows, pg_has_role(c.relowner, 'USAGE') AS owned, \
                (EXISTS (SELECT 1 FROM pg_stat_progress_vacuum v WHERE v.relid = s.relid) \
                 OR EXISTS (SELECT 1 FROM pg_stat_progress_analyze a \
                             WHERE a.relid = s.relid)) AS busy \
           FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
          WHERE s.relname = ANY($1) AND s.schemaname = current_schema()",
    )
    .bind::<Array<Text>, _>(tables)
    .load(conn)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_analyzed_again_once_it_may_have_doubled_or_emptied() {
        // (changes since the last ANALYZE, rows then, analyze now?)
        let cases = [
            (0, -1.0, false),        // never analyzed, nothing written
            (499, -1.0, false),      // small: any plan reads it cheaply
            (500, -1.0, true),       // never analyzed, now worth planning for
            (500, 0.0, true),        // analyzed empty
            (600, 1_000.0, false),   // grew by 60 %
            (1_000, 1_000.0, true),  // may have doubled
            (10_000, 1_000.0, true), // grew tenfold
            (40_000, 100_000.0, false),
            (100_000, 100_000.0, true), // may have emptied
        ];
        for (changed, rows, want) in cases {
            assert_eq!(stale(changed, rows), want, "changed {changed}, rows {rows}");
        }
    }
}
