//! Rooms: the ones hosted here, their servers, and their members.

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};

use super::prepared::prepared;
use super::schema::{hosted_rooms as hr, room_members as rm, room_servers as rs};
use super::StoreError;

/// A room hosted here, as the local app registered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Queryable)]
pub struct HostedRoom {
    pub room_id: String,
    pub guild_id: String,
    pub guild_name: String,
    pub default_channel_id: Option<String>,
}

/// A member's state in a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    Invited,
    Joined,
    Left,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Invited => "invited",
            Membership::Joined => "joined",
            Membership::Left => "left",
        }
    }
}

pub async fn hosted(
    conn: &mut AsyncPgConnection,
    room_id: &str,
) -> Result<Option<HostedRoom>, StoreError> {
    Ok(hr::table
        .filter(hr::room_id.eq(room_id))
        .select((
            hr::room_id,
            hr::guild_id,
            hr::guild_name,
            hr::default_channel_id,
        ))
        .first(conn)
        .await
        .optional()?)
}

pub async fn upsert_hosted(
    conn: &mut AsyncPgConnection,
    room: &HostedRoom,
) -> Result<(), StoreError> {
    let now = Utc::now();
    diesel::insert_into(hr::table)
        .values((
            hr::room_id.eq(&room.room_id),
            hr::guild_id.eq(&room.guild_id),
            hr::guild_name.eq(&room.guild_name),
            hr::default_channel_id.eq(&room.default_channel_id),
        ))
        .on_conflict(hr::room_id)
        .do_update()
        .set((
            hr::guild_id.eq(&room.guild_id),
            hr::guild_name.eq(&room.guild_name),
            hr::default_channel_id.eq(&room.default_channel_id),
            hr::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Sets a user's membership; returns the previous membership text, if any.
pub async fn set_member(
    conn: &mut AsyncPgConnection,
    room_id: &str,
    user_id: &str,
    server_name: &str,
    membership: Membership,
    event_id: Option<&str>,
) -> Result<Option<String>, StoreError> {
    let previous: Option<String> = rm::table
        .filter(rm::room_id.eq(room_id))
        .filter(rm::user_id.eq(user_id))
        .select(rm::membership)
        .first(conn)
        .await
        .optional()?;
    let now = Utc::now();
    diesel::insert_into(rm::table)
        .values((
            rm::room_id.eq(room_id),
            rm::user_id.eq(user_id),
            rm::server_name.eq(server_name),
            rm::membership.eq(membership.as_str()),
            rm::event_id.eq(event_id),
        ))
        .on_conflict((rm::room_id, rm::user_id))
        .do_update()
        .set((
            rm::membership.eq(membership.as_str()),
            rm::event_id.eq(event_id),
            rm::updated_at.eq(now),
        ))
        .execute(conn)
        .await?;
    Ok(previous)
}

/// Marks a server as in (or out of) a room: joined while any of its users is joined. A
/// server that leaves keeps what its deferral in the room owes it up to now, and no more
/// (`deferrals::close`).
pub async fn refresh_room_server(
    conn: &mut AsyncPgConnection,
    room_id: &str,
    server_name: &str,
) -> Result<(), StoreError> {
    let joined: i64 = rm::table
        .filter(rm::room_id.eq(room_id))
        .filter(rm::server_name.eq(server_name))
        .filter(rm::membership.eq("joined"))
        .count()
        .get_result(conn)
        .await?;
    let state = if joined > 0 { "joined" } else { "left" };
    let now = Utc::now();
    diesel::insert_into(rs::table)
        .values((
            rs::room_id.eq(room_id),
            rs::server_name.eq(server_name),
            rs::state.eq(state),
        ))
        .on_conflict((rs::room_id, rs::server_name))
        .do_update()
        .set((rs::state.eq(state), rs::updated_at.eq(now)))
        .execute(conn)
        .await?;
    if state == "left" {
        super::deferrals::close(conn, room_id, server_name).await?;
    }
    Ok(())
}

/// Servers currently joined to a room.
pub async fn joined_servers(
    conn: &mut AsyncPgConnection,
    room_id: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(rs::table
        .filter(rs::room_id.eq(room_id))
        .filter(rs::state.eq("joined"))
        .select(rs::server_name)
        .order(rs::server_name.asc())
        .load(conn)
        .await?)
}

/// A user's membership in a room, if any.
pub async fn membership(
    conn: &mut AsyncPgConnection,
    room_id: &str,
    user_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(rm::table
        .filter(rm::room_id.eq(room_id))
        .filter(rm::user_id.eq(user_id))
        .select(rm::membership)
        .first(conn)
        .await
        .optional()?)
}

/// What a verify run's room rules need (`jobs::verify`), in one statement: which of
/// `rooms` are hosted here, and the memberships of (room, user) `pairs` — keyed by
/// `(room_id, user_id)`, values as [`Membership::as_str`]; pairs without one are absent.
///
/// One statement, not two: at a steady rate a verify run holds a few events and each
/// statement costs Postgres a fixed amount beside its rows (docs/performance.md,
/// eighteenth round). Every verify run asks, so the lists are handed over as
/// `(SELECT $n)` (`store::prepared`, "Values the planner must not see") and the pairs
/// are joined by the primary key.
pub async fn rules_view(
    conn: &mut AsyncPgConnection,
    rooms: &[&str],
    pairs: &[(&str, &str)],
) -> Result<
    (
        std::collections::HashSet<String>,
        std::collections::HashMap<(String, String), String>,
    ),
    StoreError,
> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        room_id: String,
        /// `None`: the row says the room is hosted here.
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        user_id: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        membership: Option<String>,
    }
    let mut hosted = std::collections::HashSet::new();
    let mut members = std::collections::HashMap::new();
    if rooms.is_empty() && pairs.is_empty() {
        return Ok((hosted, members));
    }
    let (pair_rooms, users): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
    let rows: Vec<Row> = prepared(
        diesel::sql_query(
            "SELECT h.room_id, NULL::text AS user_id, NULL::text AS membership \
               FROM hosted_rooms h WHERE h.room_id = ANY((SELECT $1::text[])::text[]) \
             UNION ALL \
             SELECT m.room_id, m.user_id, m.membership \
               FROM UNNEST((SELECT $2::text[]), (SELECT $3::text[])) AS p(room_id, user_id) \
               JOIN room_members m ON m.room_id = p.room_id AND m.user_id = p.user_id",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(rooms)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&pair_rooms)
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&users),
    )
    .load(conn)
    .await?;
    for r in rows {
        match (r.user_id, r.membership) {
            (Some(user), Some(m)) => {
                members.insert((r.room_id, user), m);
            }
            _ => {
                hosted.insert(r.room_id);
            }
        }
    }
    Ok((hosted, members))
}
