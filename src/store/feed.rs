//! The inbound feed the local Paracord app reads: accepted events, in commit order,
//! paged by a [`Position`].
//!
//! A plain sequence number is not a safe cursor: two transactions can take seq 5 and 6
//! and commit 6 first, so a reader that has seen 6 would skip 5 for ever. Each entry
//! therefore records the id of the transaction that wrote it, and a page holds only
//! entries of transactions older than every transaction still running
//! (`pg_snapshot_xmin`), ordered by (transaction id, seq). An entry that commits later
//! always sorts after every position already handed out. The price: a write transaction
//! left open anywhere in the cluster holds the feed back until it ends.

use std::fmt;

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::events::{self, StoredEvent};
use super::prepared::prepared;
use super::schema::inbound_feed as f;
use super::StoreError;

/// A place in the feed: everything up to and including it has been read. Written as
/// `<txid>-<seq>`; `0` is the beginning. Clients treat it as opaque.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    txid: i64,
    seq: i64,
}

impl Position {
    pub const START: Position = Position { txid: 0, seq: 0 };

    /// Parses a position handed out as `next_since` (or `0`).
    pub fn parse(s: &str) -> Option<Position> {
        if s == "0" {
            return Some(Position::START);
        }
        let (t, q) = s.split_once('-')?;
        let digits =
            |x: &str| !x.is_empty() && x.len() <= 19 && x.bytes().all(|b| b.is_ascii_digit());
        if !digits(t) || !digits(q) {
            return None;
        }
        Some(Position {
            txid: t.parse().ok()?,
            seq: q.parse().ok()?,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Position::START {
            return f.write_str("0");
        }
        write!(f, "{}-{}", self.txid, self.seq)
    }
}

/// Appends accepted events (idempotent per event). Call it inside the transaction that
/// accepts them: the entry's position is that transaction's id.
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

/// Entries after `since` whose writers are older than every running transaction, oldest
/// first, at most `limit`; with their events, loaded in one query.
pub async fn page(
    conn: &mut AsyncPgConnection,
    since: Position,
    limit: i64,
) -> Result<Vec<(Position, StoredEvent)>, StoreError> {
    #[derive(QueryableByName)]
    struct Entry {
        #[diesel(sql_type = BigInt)]
        txid: i64,
        #[diesel(sql_type = BigInt)]
        seq: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        event_id: String,
    }
    let entries: Vec<Entry> = prepared(
        diesel::sql_query(
            "SELECT txid, seq, event_id FROM inbound_feed \
          WHERE (txid, seq) > ($1, $2) \
            AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint \
          ORDER BY txid, seq LIMIT $3",
        )
        .bind::<BigInt, _>(since.txid)
        .bind::<BigInt, _>(since.seq)
        .bind::<BigInt, _>(limit),
    )
    .load(conn)
    .await?;
    let ids: Vec<&str> = entries.iter().map(|e| e.event_id.as_str()).collect();
    let mut by_id = events::get_many(conn, &ids).await?;
    // An entry's event is deleted with it (ON DELETE CASCADE); a miss is a purge racing
    // this read, and the entry is skipped like the purged entry it is.
    Ok(entries
        .into_iter()
        .filter_map(|e| {
            let ev = by_id.remove(&e.event_id)?;
            Some((
                Position {
                    txid: e.txid,
                    seq: e.seq,
                },
                ev,
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::Position;

    #[test]
    fn positions_print_and_parse() {
        assert_eq!(Position::parse("0"), Some(Position::START));
        assert_eq!(Position::START.to_string(), "0");
        let p = Position { txid: 812, seq: 5 };
        assert_eq!(p.to_string(), "812-5");
        assert_eq!(Position::parse("812-5"), Some(p));
        for bad in [
            "",
            "5",
            "-5",
            "1-",
            "a-1",
            "1-2-3",
            "+1-2",
            "99999999999999999999-1",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
        assert!(Position { txid: 1, seq: 9 } < Position { txid: 2, seq: 1 });
    }
}
