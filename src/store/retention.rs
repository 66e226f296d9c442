//! What ages out: waiting rows past their maximum age become dead, history past the
//! retention horizon is deleted, and attempt rows a vanished sender left open are
//! closed. Run by every worker's scheduler (each statement is safe to run concurrently).

use chrono::{DateTime, Utc};
use diesel::sql_types::{Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::StoreError;

/// The reason kept on rows that expired.
pub const EXPIRED: &str = "expired: not delivered within max_age";

/// Waiting rows created before `cutoff` become dead ([`EXPIRED`]); returns how many.
/// Read through the index `outbound_queue_expiry`, whose predicate only this condition
/// implies (see its migration).
pub async fn expire(
    conn: &mut AsyncPgConnection,
    cutoff: DateTime<Utc>,
) -> Result<usize, StoreError> {
    Ok(diesel::sql_query(
        "UPDATE outbound_queue SET status = 'dead', dead_reason = $2, last_error = $2, \
           updated_at = now() \
         WHERE status = 'pending' AND created_at < $1",
    )
    .bind::<Timestamptz, _>(cutoff)
    .bind::<Text, _>(EXPIRED)
    .execute(conn)
    .await?)
}

/// Closes invite / join / leave attempt rows still open that started before `cutoff`
/// (their sender stopped: no request outlives its timeout) as `interrupted`; returns how
/// many. Event attempts are closed by the next drain of their destination
/// (`attempts::close_open`), which knows their sender is gone.
pub async fn close_abandoned_attempts(
    conn: &mut AsyncPgConnection,
    cutoff: DateTime<Utc>,
) -> Result<usize, StoreError> {
    Ok(diesel::sql_query(
        "UPDATE delivery_attempts SET finished_at = now(), error_class = $2, \
           response_excerpt = 'no answer recorded: the sender stopped mid-request' \
         WHERE finished_at IS NULL AND request_kind <> 'event' AND attempted_at < $1",
    )
    .bind::<Timestamptz, _>(cutoff)
    .bind::<Text, _>(super::attempts::INTERRUPTED)
    .execute(conn)
    .await?)
}

/// Deletes history older than `cutoff`: delivery attempts, finished outbound rows and
/// local API transactions. Returns the rows deleted, in that order.
pub async fn prune(
    conn: &mut AsyncPgConnection,
    cutoff: DateTime<Utc>,
) -> Result<(usize, usize, usize), StoreError> {
    let attempts = diesel::sql_query("DELETE FROM delivery_attempts WHERE attempted_at < $1")
        .bind::<Timestamptz, _>(cutoff)
        .execute(conn)
        .await?;
    let rows = diesel::sql_query(
        "DELETE FROM outbound_queue WHERE status IN ('delivered', 'dead', 'cancelled') AND updated_at < $1",
    )
    .bind::<Timestamptz, _>(cutoff)
    .execute(conn)
    .await?;
    let txns = diesel::sql_query("DELETE FROM local_transactions WHERE created_at < $1")
        .bind::<Timestamptz, _>(cutoff)
        .execute(conn)
        .await?;
    Ok((attempts, rows, txns))
}
