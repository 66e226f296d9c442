//! Planner statistics that keep up with the tables that grow fastest.
//!
//! Postgres plans a query from the statistics its last `ANALYZE` took, and keeps the
//! plan of a prepared statement (`store::prepared`) until something invalidates it — an
//! `ANALYZE` of a table it reads does. Autovacuum takes them only every
//! `autovacuum_naptime` (a minute by default). The queue tables of a fresh deployment, or
//! of one whose peer just came back, grow from nothing to tens of thousands of rows
//! within that minute, and every plan made while they were nearly empty stays what it
//! was: a sequential scan of `federation_events` to read a few events by id, of
//! `outbound_queue` to open a window's attempts (measured: 2.4 s of a 10 s run's 8.5 s of
//! Postgres CPU went to the first; docs/performance.md, sixth round).
//!
//! So every worker looks at the change counters of [`WATCHED`] once a second (one
//! read of `pg_stat_user_tables`) and analyzes a table itself once it may have doubled or
//! emptied since its statistics were taken ([`stale`]): a handful of `ANALYZE`s while a
//! table grows by orders of magnitude, none while it holds steady (autovacuum's finer
//! rule, set by the migrations, still applies). `SKIP_LOCKED` leaves a table that another
//! worker or autovacuum is analyzing to them; tables this role does not own (only their
//! owner may analyze them) are left out by the read.

use diesel::sql_types::{Array, BigInt, Double, Text};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

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
/// then (`rows`: `pg_class.reltuples`, −1 when never analyzed) — so it may have doubled,
/// or lost most of its rows. A table growing from nothing to a million rows is analyzed
/// about a dozen times, at 500, 1 000, 2 000, … rows.
pub fn stale(changed: i64, rows: f64) -> bool {
    changed >= MIN_CHANGES && changed as f64 >= rows.max(0.0)
}

/// Analyzes the [`WATCHED`] tables this role owns whose statistics are [`stale`], each
/// with `ANALYZE (SKIP_LOCKED)`. Returns the tables analyzed now (a skipped one is
/// counted: its counter is left for the next look).
///
/// # Errors
/// [`StoreError`] when the counters cannot be read or an `ANALYZE` fails.
pub async fn refresh(conn: &mut AsyncPgConnection) -> Result<Vec<&'static str>, StoreError> {
    #[derive(QueryableByName)]
    struct Counter {
        #[diesel(sql_type = Text)]
        name: String,
        #[diesel(sql_type = BigInt)]
        changed: i64,
        #[diesel(sql_type = Double)]
        rows: f64,
    }
    let counters: Vec<Counter> = diesel::sql_query(
        "SELECT s.relname::text AS name, s.n_mod_since_analyze AS changed, \
                c.reltuples::float8 AS rows \
           FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
          WHERE s.relname = ANY($1) AND s.schemaname = current_schema() \
            AND pg_has_role(c.relowner, 'USAGE')",
    )
    .bind::<Array<Text>, _>(&WATCHED[..])
    .load(conn)
    .await?;
    let mut analyzed = Vec::new();
    for c in counters {
        // The name is one of ours, never the database's: only those go into the SQL.
        let Some(&table) = WATCHED.iter().find(|t| **t == c.name) else {
            continue;
        };
        if stale(c.changed, c.rows) {
            diesel::sql_query(format!("ANALYZE (SKIP_LOCKED) {table}"))
                .execute(conn)
                .await?;
            analyzed.push(table);
        }
    }
    Ok(analyzed)
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
