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
