//! Local API idempotency: one event per client transaction id.
//!
//! The first request with a `txn_id` stores its response; a retry with the same request
//! gets the same response, and a different request under the same id is refused.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::schema::local_transactions as lt;
use super::StoreError;

/// A remembered transaction: the hash of its request and the response given.
pub struct Transaction {
    pub request_sha256: String,
    pub response: String,
}

pub async fn find(
    conn: &mut AsyncPgConnection,
    txn_id: &str,
) -> Result<Option<Transaction>, StoreError> {
    let row: Option<(String, String)> = lt::table
        .filter(lt::txn_id.eq(txn_id))
        .select((lt::request_sha256, lt::response))
        .first(conn)
        .await
        .optional()?;
    Ok(row.map(|(request_sha256, response)| Transaction {
        request_sha256,
        response,
    }))
}

/// Records a transaction; `false` when the id was taken (by a concurrent request).
pub async fn record(
    conn: &mut AsyncPgConnection,
    txn_id: &str,
    request_sha256: &str,
    event_id: &str,
    response: &str,
) -> Result<bool, StoreError> {
    let n = diesel::insert_into(lt::table)
        .values((
            lt::txn_id.eq(txn_id),
            lt::request_sha256.eq(request_sha256),
            lt::event_id.eq(event_id),
            lt::response.eq(response),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(n == 1)
}
