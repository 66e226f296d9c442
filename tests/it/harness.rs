//! The harness itself: servers start on their own ports, survive a restart with their
//! data, and come back after a crash.

use crate::support;

use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use support::pg::Postgres;
use support::redis::{command_line, Redis};

#[derive(diesel::QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(url: &str) -> Option<i64> {
    let mut c = AsyncPgConnection::establish(url).await.ok()?;
    let rows: Vec<N> = diesel::sql_query("SELECT count(*) AS n FROM t")
        .load(&mut c)
        .await
        .ok()?;
    rows.into_iter().next().map(|r| r.n)
}

#[tokio::test]
async fn postgres_restarts_keep_data() {
    let mut pg = Postgres::start().await.unwrap();
    assert_ne!(pg.port, 5432, "never the machine's own Postgres");
    let url = pg.create_db("h").await.unwrap();
    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    c.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    drop(c);

    pg.stop();
    assert_eq!(
        count(&url).await,
        None,
        "stopped server must refuse connections"
    );
    pg.start_again().await.unwrap();
    assert_eq!(count(&url).await, Some(2));

    pg.kill();
    pg.start_again().await.unwrap();
    assert_eq!(
        count(&url).await,
        Some(2),
        "crash recovery keeps committed rows"
    );
}

#[tokio::test]
async fn redis_restarts_keep_data() {
    let mut r = Redis::start().await.unwrap();
    assert_ne!(r.port, 6379, "never the machine's own Redis");
    assert_eq!(command_line(r.port, "SET k v").unwrap(), "+OK");
    r.stop();
    assert!(command_line(r.port, "PING").is_err());
    r.start_again().await.unwrap();
    assert_eq!(command_line(r.port, "GET k").unwrap(), "$1\r\nv");
}
