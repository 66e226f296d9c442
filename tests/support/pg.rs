//! The throwaway Postgres of `parafed::devservers`, shared by every test of one test
//! binary (each test gets databases of its own on it).

use tokio::sync::OnceCell;

pub use parafed::devservers::Postgres;

/// The Postgres shared by every test in this binary.
pub async fn shared() -> &'static Postgres {
    static PG: OnceCell<Postgres> = OnceCell::const_new();
    PG.get_or_init(|| async { Postgres::start().await.expect("start the test Postgres") })
        .await
}

/// A fresh, empty database on the shared server (unique name).
pub async fn fresh_db() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    shared()
        .await
        .create_db(&name)
        .await
        .expect("create a test database")
}

/// A fresh database with every migration applied.
pub async fn migrated_db() -> String {
    let url = fresh_db().await;
    parafed::store::migrate::run_pending(&url)
        .await
        .expect("migrations apply");
    url
}
