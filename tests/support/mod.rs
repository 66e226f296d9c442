//! The test harness: throwaway Postgres and Redis servers (`parafed::devservers`, started
//! from the installed binaries on free loopback ports, never the machine's own services),
//! parafed instances and fake peers on 127.0.0.1, and a raw HTTP client for requests no
//! well-behaved client would send.
#![allow(dead_code)]

pub mod app;
pub mod pg;
pub mod redis;

/// Polls `f` until it returns `Some`; panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: std::time::Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    parafed::devservers::wait_until(what, timeout, f)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Sends parafed's warnings and errors to the test's captured output, so a failing test
/// shows what the server logged (an "internal error; it has been logged" answer is
/// otherwise a dead end). `RUST_LOG` overrides the level. Idempotent.
pub fn log_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// Makes `room` a room hosted by the server whose database `conn` is, with each
/// `(user, server)` a joined member (and its server in the room's fan-out set).
pub async fn host_room(
    conn: &mut diesel_async::AsyncPgConnection,
    room: &str,
    members: &[(&str, &str)],
) {
    use parafed::store::rooms;
    rooms::upsert_hosted(
        conn,
        &rooms::HostedRoom {
            room_id: room.into(),
            guild_id: "g".into(),
            guild_name: "Guild".into(),
            default_channel_id: None,
        },
    )
    .await
    .expect("host the room");
    for (user, server) in members {
        rooms::set_member(conn, room, user, server, rooms::Membership::Joined, None)
            .await
            .expect("add the member");
        rooms::refresh_room_server(conn, room, server)
            .await
            .expect("add the member's server");
    }
}
