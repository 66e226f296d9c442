//! Keys follow what the peer publishes (PROTOCOL.md "Identity and keys"): a peer that
//! re-keys under the same key id is accepted after one refetch, a key it withdrew stops
//! verifying once a fetch succeeded, and a peer whose keys cannot be fetched gets 503
//! with `Retry-After` (a 403 would be final to a Paracord sender).

use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::support;
use support::app::{send, FakeAnswer, FakeRequest, FnPeer, Options, Peer, TestServer};

/// A signed GET of an event nobody has: 404 once authenticated.
const PATH: &str = "/_paracord/federation/v1/event/%24nothing:peer.test";

/// A peer's `/keys`, served from whatever `keys` holds now.
async fn keys_server(keys: Arc<Mutex<Vec<Peer>>>) -> (FnPeer, String) {
    let (l, url) = support::app::reserve_listener();
    let peer = FnPeer::start(l, move |r: FakeRequest| {
        let keys = keys.clone();
        async move {
            if !r.path.ends_with("/keys") {
                return FakeAnswer::empty(404);
            }
            let ks = keys.lock().unwrap().clone();
            let doc = json!({
                "keys": ks.iter().map(|p| json!({
                    "key_id": p.key.key_id(),
                    "public_key": p.key.public_key_hex(),
                    "server_name": "peer.test",
                    "valid_until": parafed::time::now_ms() + 86_400_000,
                })).collect::<Vec<_>>(),
                "server_name": "peer.test",
            });
            FakeAnswer::json(200, doc)
        }
    })
    .await;
    (peer, url)
}

async fn server(peer_url: &str) -> TestServer {
    TestServer::start(Options {
        peers: vec![("peer.test".into(), peer_url.to_owned())],
        // No throttle between fetches, so the refetches are exactly the ones asked for.
        extra_toml: "\n[federation]\ndiscovery = false\nkey_refetch_interval_ms = 0\n".into(),
        ..Options::default()
    })
    .await
}

async fn get_as(s: &TestServer, p: &Peer) -> u16 {
    send(s.addr, "GET", PATH, &p.sign("GET", PATH, b""), b"")
        .await
        .status
}

#[tokio::test]
async fn a_peer_that_rekeys_under_the_same_id_is_accepted_after_one_refetch() {
    let old = Peer::new("peer.test", "ed25519:auto", [7; 32]);
    let new = Peer::new("peer.test", "ed25519:auto", [8; 32]);
    let keys = Arc::new(Mutex::new(vec![old.clone()]));
    let (_peer, url) = keys_server(keys.clone()).await;
    let s = server(&url).await;
    assert_eq!(
        get_as(&s, &old).await,
        404,
        "authenticated with the first key"
    );
    let fetched = s.app.keyring.fetch_count();
    // The peer re-keys, keeping the id (as Paracord does).
    *keys.lock().unwrap() = vec![new.clone()];
    assert_eq!(
        get_as(&s, &new).await,
        404,
        "the first request with the new key"
    );
    assert_eq!(
        s.app.keyring.fetch_count(),
        fetched + 1,
        "exactly one refetch"
    );
    assert_eq!(get_as(&s, &new).await, 404);
    assert_eq!(s.app.keyring.fetch_count(), fetched + 1, "and then none");
    // The old key is gone from what the peer publishes: it no longer verifies.
    assert_eq!(get_as(&s, &old).await, 403);
}

#[tokio::test]
async fn a_withdrawn_key_stops_verifying_after_a_successful_refetch() {
    let a = Peer::new("peer.test", "ed25519:a", [1; 32]);
    let b = Peer::new("peer.test", "ed25519:b", [2; 32]);
    let c = Peer::new("peer.test", "ed25519:c", [3; 32]);
    let keys = Arc::new(Mutex::new(vec![a.clone(), b.clone()]));
    let (_peer, url) = keys_server(keys.clone()).await;
    let s = server(&url).await;
    assert_eq!(get_as(&s, &a).await, 404);
    assert_eq!(get_as(&s, &b).await, 404);
    // `a` is withdrawn, `c` is new: a request with `c` makes parafed fetch again.
    *keys.lock().unwrap() = vec![b.clone(), c.clone()];
    assert_eq!(get_as(&s, &c).await, 404, "a new key id is fetched");
    assert_eq!(
        get_as(&s, &a).await,
        403,
        "the withdrawn key no longer verifies"
    );
    assert_eq!(get_as(&s, &b).await, 404, "a key still listed still does");
    let stored: i64 = {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        use parafed::store::schema::federation_server_keys as fsk;
        fsk::table
            .filter(fsk::server_name.eq("peer.test"))
            .filter(fsk::key_id.eq("ed25519:a"))
            .count()
            .get_result(&mut *s.db().await)
            .await
            .unwrap()
    };
    assert_eq!(stored, 0, "and it is gone from the database too");
}

#[tokio::test]
async fn a_peer_whose_keys_cannot_be_fetched_gets_503_with_retry_after() {
    // Nobody listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let s = server(&closed).await;
    let p = Peer::new("peer.test", "ed25519:auto", [9; 32]);
    let r = send(s.addr, "GET", PATH, &p.sign("GET", PATH, b""), b"").await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some(), "503 carries Retry-After");
    assert_eq!(r.json()["code"], "KEYS_UNREACHABLE");
}

/// An event whose envelope signature the ingress verified is judged without the
/// origin's keys: a worker that cannot have them (the origin's key server down, none
/// stored) accepts it at once, with no fetch of its own, instead of waiting up to
/// `verify::UNREACHABLE_WAIT` for keys that would only check the signature again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_ingress_checked_is_accepted_without_the_origins_keys() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use parafed::protocol::envelope::Signatures;
    use parafed::protocol::{Envelope, EventId, EventType, RoomId, ServerName, UserId};
    use parafed::store::schema::federation_events as fe;
    use support::app::{json_signed, keys_document, WorkerProcess};

    const EVENT: &str = "/_paracord/federation/v1/event";
    let peer = Peer::new("peer.test", "ed25519:auto", [31; 32]);
    let down = Arc::new(AtomicBool::new(false));
    let fetches = Arc::new(AtomicU64::new(0));
    let (l, url) = support::app::reserve_listener();
    let (p, d, n) = (peer.clone(), down.clone(), fetches.clone());
    let _keys = FnPeer::start(l, move |_r: FakeRequest| {
        let (p, d, n) = (p.clone(), d.clone(), n.clone());
        async move {
            n.fetch_add(1, Ordering::SeqCst);
            if AtomicBool::load(&d, Ordering::SeqCst) {
                return FakeAnswer::json(503, json!({"error": "down"}));
            }
            FakeAnswer::json(200, keys_document(&p))
        }
    })
    .await;
    let s = TestServer::start(Options {
        peers: vec![("peer.test".into(), url)],
        extra_toml: format!(
            "\n[federation]\ndiscovery = false\nrate_limit_per_minute = 0\n{}",
            support::app::FAST_WORKER_TOML
        ),
        ..Options::default()
    })
    .await;
    let mut e = Envelope {
        event_id: EventId::parse("$checked:peer.test").unwrap(),
        room_id: RoomId::parse("!r:peer.test").unwrap(),
        event_type: EventType::parse("m.message").unwrap(),
        sender: UserId::parse("@p:peer.test").unwrap(),
        origin_server: ServerName::parse("peer.test").unwrap(),
        origin_ts: 1_800_000_000_000,
        content: json!({"body": "checked at the door", "message_id": "1"}),
        depth: 1,
        state_key: None,
        signatures: Signatures::default(),
    };
    e.sign(&peer.key);
    let body = e.to_wire();
    let r = send(
        s.addr,
        "POST",
        EVENT,
        &json_signed(&peer, EVENT, &body),
        &body,
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        AtomicU64::load(&fetches, Ordering::SeqCst),
        1,
        "the ingress fetched the keys"
    );
    // The origin's key server goes down, and its keys are nowhere else: not in the
    // database (where a worker would load them from), not in the worker's memory (a
    // process of its own, started now). Judging the event must not need them.
    down.store(true, Ordering::SeqCst);
    {
        use parafed::store::schema::federation_server_keys as fsk;
        let gone = diesel::delete(fsk::table.filter(fsk::server_name.eq("peer.test")))
            .execute(&mut *s.db().await)
            .await
            .unwrap();
        assert!(gone > 0, "the ingress stored the keys it fetched");
    }
    let _worker = WorkerProcess::start(&s);
    let status = support::wait_for(
        "the event to be judged",
        Duration::from_secs(30),
        || async {
            let st: Option<String> = fe::table
                .filter(fe::event_id.eq("$checked:peer.test"))
                .select(fe::status)
                .first(&mut *s.db().await)
                .await
                .optional()
                .unwrap();
            st.filter(|st| st != "pending")
        },
    )
    .await;
    assert_eq!(status, "accepted");
    assert_eq!(
        AtomicU64::load(&fetches, Ordering::SeqCst),
        1,
        "the worker did not fetch the keys again"
    );
}
