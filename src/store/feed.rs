//! The inbound feed the local Paracord app reads: accepted events, in acceptance order,
//! paged by a cursor (`seq`).

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::events::{self, StoredEvent};
use super::schema::inbound_feed as f;
use super::StoreError;

/// Appends accepted events (idempotent per event).
pub async fn append(
    conn: &mut AsyncPgConnection,
    entries: &[(&str, &str)],
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = entries
        .iter()
        .map(|(event_id, room_id)| (f::event_id.eq(*event_id), f::room_id.eq(*room_id)))
        .collect();
    diesel::insert_into(f::table)
        .values(&rows)
        .on_conflict(f::event_id)
        .do_nothing()
        .execute(conn)
        .await?;
    Ok(())
}

/// Entries after `since`, oldest first, at most `limit`.
pub async fn page(
    conn: &mut AsyncPgConnection,
    since: i64,
    limit: i64,
) -> Result<Vec<(i64, StoredEvent)>, StoreError> {
    let rows: Vec<(i64, String)> = f::table
        .filter(f::seq.gt(since))
        .order(f::seq.asc())
        .limit(limit)
        .select((f::seq, f::event_id))
        .load(conn)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (seq, id) in rows {
        if let Some(ev) = events::get(conn, &id).await? {
            out.push((seq, ev));
        }
    }
    Ok(out)
}
