//! Postgres, through Diesel (diesel-async, deadpool): the pool, migrations and the
//! queries each part of parafed needs, one concept per file.
//!
//! Every query takes a connection from the shared pool; nothing here opens connections of
//! its own. Postgres is the system of record: what Redis carries can always be rebuilt
//! from these tables.

pub mod attempts;
pub mod events;
pub mod feed;
pub mod keys;
pub mod local;
pub mod migrate;
pub mod destinations;
pub mod outbound;
pub mod retention;
pub mod rooms;
pub mod schema;
pub mod status;

use diesel_async::pooled_connection::deadpool::{self, Pool};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::AsyncPgConnection;

/// The shared connection pool.
pub type PgPool = Pool<AsyncPgConnection>;
/// A connection borrowed from the pool.
pub type PgConn = deadpool::Object<AsyncPgConnection>;

/// Storage failures, kept typed so the HTTP edge and the CLI can say what happened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
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
            StoreError::Migration(m) => StoreError::Migration(m.clone()),
            StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
            StoreError::NotFound(m) => StoreError::NotFound(m.clone()),
            StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
            StoreError::Query(e) => StoreError::Shared(e.to_string()),
            StoreError::Shared(m) => StoreError::Shared(m.clone()),
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
    let mgr = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
    Pool::builder(mgr)
        .max_size(max_size as usize)
        .runtime(::deadpool::Runtime::Tokio1)
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .build()
        .map_err(|e| StoreError::Unavailable(e.to_string()))
}
