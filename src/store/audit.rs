//! `admin_audit`: the operator's audit trail. Every state-changing admin call writes one
//! row — who (the admin token's configured name), what (`deliveries.retry`,
//! `queues.pause`, …), on what (an id or a destination), with which filter, and how many
//! rows or jobs it changed — read back newest first by `parafed admin audit list`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::schema::admin_audit as aa;
use super::StoreError;

/// One audit row, as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = aa, check_for_backend(diesel::pg::Pg))]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// The admin token's name (`[admin] token_name`).
    pub actor: String,
    /// `<group>.<operation>`, e.g. `deliveries.retry`.
    pub action: String,
    /// The id, destination or queue acted on; `None` for bulk operations.
    pub target: Option<String>,
    /// The bulk operation's filter, as JSON.
    pub filter: Option<String>,
    /// Rows or jobs changed.
    pub count: i64,
}

/// What an admin call did, about to be recorded.
pub struct Entry<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub filter: Option<&'a str>,
    pub count: i64,
}

/// Writes one audit row.
pub async fn record(conn: &mut AsyncPgConnection, e: &Entry<'_>) -> Result<(), StoreError> {
    diesel::insert_into(aa::table)
        .values((
            aa::actor.eq(e.actor),
            aa::action.eq(e.action),
            aa::target.eq(e.target),
            aa::filter.eq(e.filter),
            aa::count.eq(e.count),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Audit rows newest first, those with an id below `before` (the previous page's
/// cursor), `action` starting with the given prefix when one is given.
pub async fn list(
    conn: &mut AsyncPgConnection,
    before: Option<i64>,
    action: Option<&str>,
    limit: i64,
) -> Result<Vec<AuditRow>, StoreError> {
    let mut q = aa::table.select(AuditRow::as_select()).into_boxed();
    if let Some(b) = before {
        q = q.filter(aa::id.lt(b));
    }
    if let Some(a) = action {
        q = q.filter(aa::action.like(format!("{}%", a.replace(['%', '_', '\\'], ""))));
    }
    Ok(q.order(aa::id.desc()).limit(limit).load(conn).await?)
}

/// The audit rows about one target (a peer, a destination), newest first.
pub async fn for_target(
    conn: &mut AsyncPgConnection,
    target: &str,
    limit: i64,
) -> Result<Vec<AuditRow>, StoreError> {
    Ok(aa::table
        .filter(aa::target.eq(target))
        .select(AuditRow::as_select())
        .order(aa::id.desc())
        .limit(limit)
        .load(conn)
        .await?)
}
