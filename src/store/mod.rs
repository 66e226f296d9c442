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
pub mod outbound;
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
