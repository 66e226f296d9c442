//! Backlog and isolation at scale: a long-dead peer's backlog drains when it returns, and
//! hundreds of dead peers in a room cost the healthy one little.

mod support;

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use parafed::protocol::envelope::Signatures;
use parafed::protocol::{Envelope, EventId, EventType, RoomId, UserId};
use parafed::store::events::{EventStatus, NewEvent};
use parafed::store::rooms::{self, HostedRoom, Membership};
use parafed::store::schema::{outbound_deferrals as od, outbound_queue as oq};
use serde_json::json;
use support::app::{
    reserve_listener, send, Blackhole, CountingPeer, Options, TestServer, TestWorker,
    FAST_WORKER_TOML,
};
use support::wait_for;

const ROOM: &str = "!big:alpha.test";

async fn alpha(peers: Vec<(String, String)>, concurrency: u32, window: u32) -> TestServer {
    let fast = FAST_WORKER_TOML
        .replace("concurrency = 8", &format!("concurrency = {concurrency}"))
        .replace("[delivery]\n", &format!("[delivery]\nwindow = {window}\n"));
    TestServer::start(Options {
        server_name: "alpha.test".into(),
        peers,
        signing_key: true,
        extra_toml: format!("\n[federation]\ndiscovery = false\nrate_limit_per_minute = 0\n{fast}"),
        ..Options::default()
    })
    .await
}

async fn delivered(s: &TestServer, dest: &str) -> i64 {
    oq::table
        .filter(oq::destination.eq(dest))
        .filter(oq::status.eq("delivered"))
        .count()
        .get_result(&mut *s.db().await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_100k_drains_when_the_peer_returns() {
    const N: usize = 100_000;
    let (lb, ub) = reserve_listener();
    // The peer is down: nothing listens on its port until it "comes back".
    let port = lb.local_addr().unwrap();
    drop(lb);
    let s = alpha(vec![("beta.test".into(), ub)], 8, 32).await;
    let key = s.app.signing_key().await.unwrap();
    // 100 000 of our events, stored and queued for beta.
    let mut conn = s.db().await;
    for chunk in 0..N / 2000 {
        let envs: Vec<Envelope> = (0..2000)
            .map(|i| {
                let n = chunk * 2000 + i;
                let mut e = Envelope {
                    event_id: EventId::parse(&format!("$bl{n}:alpha.test")).unwrap(),
                    room_id: RoomId::parse(ROOM).unwrap(),
                    event_type: EventType::parse("m.message").unwrap(),
                    sender: UserId::parse("@a:alpha.test").unwrap(),
                    origin_server: s.app.cfg.server_name.clone(),
                    origin_ts: n as i64,
                    content: json!({"n": n}),
                    depth: n as i64,
                    state_key: None,
                    signatures: Signatures::default(),
                };
                e.sign(&key);
                e
            })
            .collect();
        let rows: Vec<NewEvent> = envs
            .iter()
            .map(|e| NewEvent {
                envelope: e,
                received_from: None,
                status: EventStatus::Accepted,
                signature_checked: true,
            })
            .collect();
        parafed::store::events::insert(&mut conn, &rows)
            .await
            .unwrap();
    }
    conn.batch_execute(
        "UPDATE federation_events SET fanned_out_at = now(); \
         INSERT INTO destination_health (destination) VALUES ('beta.test'); \
         INSERT INTO outbound_queue (destination, event_id) SELECT 'beta.test', event_id FROM federation_events",
    )
    .await
    .unwrap();
    drop(conn);

    let worker = TestWorker::start(&s);
    // The worker tries, fails, and backs beta off.
    wait_for(
        "beta to be backing off",
        Duration::from_secs(30),
        || async {
            let h = s.health("beta.test").await?;
            (h.state == "backing_off").then_some(())
        },
    )
    .await;
    // beta comes back.
    let peer = CountingPeer::start(std::net::TcpListener::bind(port).unwrap()).await;
    let t = Instant::now();
    wait_for("the backlog to drain", Duration::from_secs(900), || async {
        (delivered(&s, "beta.test").await == N as i64).then_some(())
    })
    .await;
    eprintln!(
        "backlog: {N} deliveries drained in {:?} (debug build, window 32, 2-core machine)",
        t.elapsed()
    );
    assert_eq!(peer.received(), N, "everything arrived");
    assert_eq!(
        std::sync::atomic::AtomicU64::load(&peer.duplicates, std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing duplicated at the receiver"
    );
    assert!(worker.is_running(), "no worker died");
}

/// Sends `n` events through alpha's local API; returns how long until the healthy peer
/// had them all.
async fn run_events(s: &TestServer, peer: &CountingPeer, n: usize, tag: &str) -> Duration {
    let t = Instant::now();
    let before = peer.received();
    let headers = vec![
        ("Authorization".to_owned(), "Bearer local-secret".to_owned()),
        ("Content-Type".to_owned(), "application/json".to_owned()),
    ];
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (next, headers, addr, tag) = (next.clone(), headers.clone(), s.addr, tag.to_owned());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= n {
                        return;
                    }
                    let body = json!({"txn_id": format!("{tag}{i}"), "room_id": ROOM, "event_type": "m.message",
                        "sender": "@a:alpha.test", "content": {"i": i}}).to_string();
                    // As the Paracord app would: retry a 503 with the same txn_id.
                    loop {
                        let r = send(addr, "POST", "/_parafed/local/v1/events", &headers, body.as_bytes()).await;
                        if r.status == 202 {
                            break;
                        }
                        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    wait_for(
        "the healthy peer to have every event",
        Duration::from_secs(600),
        || async { (peer.received() >= before + n).then_some(()) },
    )
    .await;
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peers_do_not_hold_up_the_healthy_one() {
    // 500 events to 500 dead peers would be 250 000 outbound rows; with deferred fan-out
    // (docs/architecture.md) each dead peer gets a row for the events fanned out before
    // it was found unreachable and one deferral for the rest. The test checks both: no
    // dead peer ever has more than its window in flight, and the rows stay few.
    const EVENTS: usize = 500;
    const DEAD: usize = 500;
    let blackhole = Blackhole::start().await;
    let (lh, uh) = reserve_listener();
    let healthy = CountingPeer::start(lh).await;
    let mut peers = vec![("healthy.test".to_owned(), uh)];
    for i in 0..DEAD {
        // Half refuse connections (nothing listens on port 1), half never answer.
        let url = if i % 2 == 0 {
            format!("http://127.0.0.1:1/dead{i}")
        } else {
            blackhole.base_url(&format!("dead{i}"))
        };
        peers.push((format!("dead{i}.test"), url));
    }
    let s = alpha(peers, 64, 8).await;
    let _w = TestWorker::start(&s);
    let mut c = s.db().await;
    rooms::upsert_hosted(
        &mut c,
        &HostedRoom {
            room_id: ROOM.into(),
            guild_id: "big".into(),
            guild_name: "Big".into(),
            default_channel_id: None,
        },
    )
    .await
    .unwrap();
    rooms::set_member(
        &mut c,
        ROOM,
        "@h:healthy.test",
        "healthy.test",
        Membership::Joined,
        None,
    )
    .await
    .unwrap();
    rooms::refresh_room_server(&mut c, ROOM, "healthy.test")
        .await
        .unwrap();
    drop(c);

    let alone = run_events(&s, &healthy, EVENTS, "alone").await;

    let mut c = s.db().await;
    for i in 0..DEAD {
        let server = format!("dead{i}.test");
        rooms::set_member(
            &mut c,
            ROOM,
            &format!("@d:{server}"),
            &server,
            Membership::Joined,
            None,
        )
        .await
        .unwrap();
        rooms::refresh_room_server(&mut c, ROOM, &server)
            .await
            .unwrap();
    }
    drop(c);
    let with_dead = run_events(&s, &healthy, EVENTS, "crowded").await;

    let window = u64::from(s.app.cfg.delivery.window);
    let worst = blackhole
        .max_in_flight
        .lock()
        .unwrap()
        .values()
        .map(|(_, max)| *max)
        .max()
        .unwrap_or(0);
    eprintln!(
        "healthy peer: {EVENTS} events in {alone:?} alone ({:.0}/s), {with_dead:?} with {DEAD} dead peers in the room ({:.0}/s); \
         most requests ever in flight to one dead peer: {worst} (window {window}) — debug build, 2-core machine",
        EVENTS as f64 / alone.as_secs_f64(),
        EVENTS as f64 / with_dead.as_secs_f64(),
    );
    assert_eq!(healthy.received(), 2 * EVENTS);
    assert!(worst >= 1, "the blackholed peers were tried");
    assert!(
        worst <= window,
        "a dead peer had {worst} requests in flight; the window is {window}"
    );
    // Unreachable peers are owed the room's events by a deferral, not a row per event:
    // a dead peer gets rows only from the verify runs that found it new to us (no state
    // row yet: its first event is its probe; two runs at once may both), and a deferral
    // once it is known. Without deferrals: one row per event and peer, none deferred.
    let mut c = s.db().await;
    let dead_rows: i64 = oq::table
        .filter(oq::destination.like("dead%"))
        .count()
        .get_result(&mut c)
        .await
        .unwrap();
    let deferred: i64 = od::table
        .filter(od::destination.like("dead%"))
        .count()
        .get_result(&mut c)
        .await
        .unwrap();
    assert!(
        dead_rows < (EVENTS * DEAD) as i64,
        "{dead_rows} outbound rows for {DEAD} dead peers and {EVENTS} events"
    );
    assert!(deferred > 0, "no dead peer got a deferral");
}
