//! The delivery attempt log: one row per request parafed sends to a peer.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::schema::delivery_attempts as da;
use super::StoreError;

/// Longest response excerpt kept per attempt.
pub const EXCERPT_BYTES: usize = 512;

/// One attempt, as recorded.
#[derive(Clone, Debug)]
pub struct Attempt<'a> {
    pub outbound_id: Option<i64>,
    pub destination: &'a str,
    pub event_id: Option<&'a str>,
    /// `event`, `invite`, `join`, `leave`.
    pub request_kind: &'a str,
    pub attempt: i32,
    pub status_code: Option<i32>,
    pub error_class: Option<&'a str>,
    pub latency_ms: i32,
    pub response_excerpt: Option<String>,
}

/// The first bytes of a response body as text (lossy), for the attempt log.
pub fn excerpt(body: &[u8]) -> String {
    let cut = &body[..body.len().min(EXCERPT_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

pub async fn record(
    conn: &mut AsyncPgConnection,
    attempts: &[Attempt<'_>],
) -> Result<(), StoreError> {
    if attempts.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = attempts
        .iter()
        .map(|a| {
            (
                da::outbound_id.eq(a.outbound_id),
                da::destination.eq(a.destination),
                da::event_id.eq(a.event_id),
                da::request_kind.eq(a.request_kind),
                da::attempt.eq(a.attempt),
                da::status_code.eq(a.status_code),
                da::error_class.eq(a.error_class),
                da::latency_ms.eq(a.latency_ms),
                da::response_excerpt.eq(a.response_excerpt.as_deref()),
            )
        })
        .collect();
    diesel::insert_into(da::table)
        .values(&rows)
        .execute(conn)
        .await?;
    Ok(())
}
