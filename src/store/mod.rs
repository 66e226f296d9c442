//! Postgres, through Diesel (diesel-async, deadpool): the pool, migrations and the
//! queries each part of parafed needs, one concept per file.
//!
//! Every query takes a connection from the shared pool; nothing here opens connections of
//! its own. Postgres is the system of record: what Redis carries can always be rebuilt
//! from these tables.

pub mod attempts;
pub mod audit;
pub mod deferrals;
pub mod destinations;
pub mod events;
pub mod feed;
pub mod gauges;
pub mod inspect;
pub mod keys;
pub mod local;
pub mod migrate;
pub mod outbound;
pub mod prepared;
pub mod retention;
pub mod rooms;
pub mod schema;
pub mod statistics;
pub mod status;

use diesel_async::pooled_connection::deadpool::{self, Pool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::AsyncPgConnection;

/// The shared connection pool.
pub type PgPool = Pool<AsyncPgConnection>;
/// A connection borrowed from the pool.
pub type PgConn = deadpool::Object<AsyncPgConnection>;

/// Storage failures, kept typed so the HTTP edge and the CLI can say what happened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Postgres cannot be reached, or the pool has no connection to give.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A failure that says nothing about the request and goes away when it is tried
    /// again: a lost connection, a serialization failure or deadlock, a server shutting
    /// down or out of connections (see [`StoreError::from`]).
    #[error("database busy or restarting: {0}")]
    Transient(String),
    #[error("database error: {0}")]
    Query(diesel::result::Error),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A query error shared by every caller of one failed operation (a group commit).
    #[error("database error: {0}")]
    Shared(String),
}

impl StoreError {
    /// This error again, for each of several callers that shared one failed operation:
    /// the kind is kept where it can be, the text always.
    pub fn for_each_caller(&self) -> StoreError {
        match self {
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            StoreError::Transient(m) => StoreError::Transient(m.clone()),
            StoreError::Migration(m) => StoreError::Migration(m.clone()),
            StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
            StoreError::NotFound(m) => StoreError::NotFound(m.clone()),
            StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
            StoreError::Query(e) => StoreError::Shared(e.to_string()),
            StoreError::Shared(m) => StoreError::Shared(m.clone()),
        }
    }
}

impl StoreError {
    /// True for failures that say nothing about the request: the same request may
    /// succeed when tried again (answered 503 with `Retry-After` at the HTTP edge).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Transient(_))
    }
}

/// SQLSTATEs that mean "try again" (PostgreSQL Appendix A): 40001 serialization
/// failure, 40P01 deadlock detected, 57P01–57P03 the server is shutting down, crashed or
/// starting, 53300 too many connections, class 08 connection exceptions.
///
/// diesel-async 0.9 keeps only 40001 (as `SerializationFailure`) and connection-level
/// failures (`UnableToSendCommand`, `ClosedConnection`); it reports every other SQLSTATE
/// as `Unknown` without the code. Until it exposes the code, those few are recognised
/// by the primary message PostgreSQL gives for them (their English text, which is what
/// a server with the default `lc_messages` sends); everything else is a real fault.
fn transient_message(message: &str) -> bool {
    const MESSAGES: [&str; 6] = [
        "deadlock detected",                    // 40P01
        "terminating connection due to",        // 57P01, 57P02
        "the database system is starting up",   // 57P03
        "the database system is shutting down", // 57P03
        "sorry, too many clients already",      // 53300
        "server closed the connection",         // 08006
    ];
    MESSAGES.iter().any(|m| message.starts_with(m))
}

impl From<diesel::result::Error> for StoreError {
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind as K, Error as E};
        let transient = match &e {
            E::DatabaseError(
                K::SerializationFailure
                | K::UnableToSendCommand
                | K::ClosedConnection
                | K::ReadOnlyTransaction,
                _,
            ) => true,
            E::DatabaseError(K::Unknown, info) => transient_message(info.message()),
            E::BrokenTransactionManager => true,
            _ => false,
        };
        if transient {
            StoreError::Transient(e.to_string())
        } else {
            StoreError::Query(e)
        }
    }
}

impl From<deadpool::PoolError> for StoreError {
    fn from(e: deadpool::PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Builds the pool. Connections are opened lazily, so this succeeds while Postgres is
/// down; the first query then reports `Unavailable`.
pub fn pool(url: &str, max_size: u32) -> Result<PgPool, StoreError> {
    // No probe query on checkout (`RecyclingMethod::Verified` runs `SELECT 1` each
    // time: measured, six per delivered event). A connection whose socket closed is
    // still dropped on checkout (`is_broken`); one that fails on its first query gives
    // a transient error, which the caller retries like any other (a 503 at the HTTP
    // edge, a retried job in a worker).
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    let mgr = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config);
    Pool::builder(mgr)
        .max_size(max_size as usize)
        .runtime(::deadpool::Runtime::Tokio1)
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .build()
        .map_err(|e| StoreError::Unavailable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind as K, Error as E};

    fn db(kind: K, message: &str) -> StoreError {
        StoreError::from(E::DatabaseError(kind, Box::new(message.to_owned())))
    }

    #[test]
    fn transient_failures_are_told_apart_from_faults() {
        let table = [
            (K::SerializationFailure, "could not serialize access", true),
            (K::UnableToSendCommand, "connection closed", true),
            (K::ClosedConnection, "closed", true),
            (
                K::ReadOnlyTransaction,
                "cannot execute INSERT in a read-only transaction",
                true,
            ),
            (K::Unknown, "deadlock detected", true),
            (
                K::Unknown,
                "terminating connection due to administrator command",
                true,
            ),
            (K::Unknown, "the database system is shutting down", true),
            (K::Unknown, "sorry, too many clients already", true),
            (K::Unknown, "syntax error at or near \"SELEC\"", false),
            (K::Unknown, "relation \"x\" does not exist", false),
            (K::UniqueViolation, "duplicate key value", false),
            (K::CheckViolation, "violates check constraint", false),
        ];
        for (kind, message, transient) in table {
            let e = db(kind, message);
            assert_eq!(e.is_transient(), transient, "{message}: {e:?}");
        }
        assert!(!StoreError::from(E::NotFound).is_transient());
        assert!(StoreError::Unavailable("pool".into()).is_transient());
    }
}
