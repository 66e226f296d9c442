//! The ingress under concurrency: one event posted fifty times at once, many distinct
//! events at once (the group commit answers each request for its own event), and key
//! fetching under a flood of requests (single flight, bounded refetches).

use crate::support;

use parafed::protocol::envelope::Signatures;
use parafed::protocol::{Envelope, EventId, EventType, RoomId, UserId};
use parafed::queue::QueueName;
use support::app::{json_signed, send, FakePeers, KeysAnswer, Options, Peer, TestServer};

const EVENT: &str = "/_paracord/federation/v1/event";

fn event(p: &Peer, id: &str) -> Vec<u8> {
    let mut e = Envelope {
        event_id: EventId::parse(id).unwrap(),
        room_id: RoomId::parse("!7010:peer.test").unwrap(),
        event_type: EventType::parse("m.message").unwrap(),
        sender: UserId::parse("@alice:peer.test").unwrap(),
        origin_server: p.name.clone(),
        origin_ts: 1_700_000_000_000,
        content: serde_json::json!({"body": "once"}),
        depth: 1_700_000_000_000,
        state_key: None,
        signatures: Signatures::default(),
    };
    e.sign(&p.key);
    e.to_wire()
}

async fn setup() -> (FakePeers, TestServer, Peer) {
    let p = Peer::new("peer.test", "ed25519:test", [1; 32]);
    let fakes = FakePeers::start(vec![("peer".into(), KeysAnswer::Keys(vec![p.clone()]))]).await;
    let server = TestServer::start(Options {
        peers: vec![("peer.test".into(), fakes.base_url("peer"))],
        // These tests are about many requests at once from one peer: no cap on them here.
        extra_toml: "\n[federation]\ndiscovery = false\nrate_limit_per_minute = 0\nmax_in_flight_per_peer = 100000\n".into(),
        ..Options::default()
    })
    .await;
    (fakes, server, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_event_fifty_times_at_once() {
    let (fakes, s, p) = setup().await;
    let body = event(&p, "$once:peer.test");
    let now = parafed::time::now_ms();
    // Fifty distinct signed requests (distinct timestamps: identical ones would be replays).
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let mut h = p.sign_at("POST", EVENT, &body, now + i);
            h.push(("Content-Type".into(), "application/json".into()));
            let body = body.clone();
            let addr = s.addr;
            tokio::spawn(async move { send(addr, "POST", EVENT, &h, &body).await })
        })
        .collect();
    let mut inserted = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        let j = r.json();
        assert_eq!(j["event_id"], "$once:peer.test");
        if j["inserted"] == true {
            inserted += 1;
        }
    }
    assert_eq!(inserted, 1, "exactly one answer says inserted:true");
    assert_eq!(s.event_count().await, 1, "one row");
    assert_eq!(
        s.queued_events(QueueName::Verify).await,
        vec!["$once:peer.test".to_owned()],
        "one verify job, for the one event"
    );
    assert_eq!(
        fakes.key_fetches("peer"),
        1,
        "the peer's key was fetched once"
    );
}

/// Distinct events arriving together share group commits; each request still gets the
/// answer for its own event, every event is stored once and has one verify job — also
/// when some of them are sent twice within the same burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_events_at_once_each_get_their_own_answer() {
    let (_fakes, s, p) = setup().await;
    let now = parafed::time::now_ms();
    // 400 distinct events; the first 100 of them are posted twice.
    let ids: Vec<String> = (0..500)
        .map(|i| format!("$burst{}:peer.test", i % 400))
        .collect();
    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let body = event(&p, id);
            let mut h = p.sign_at("POST", EVENT, &body, now + i as i64);
            h.push(("Content-Type".into(), "application/json".into()));
            let addr = s.addr;
            tokio::spawn(async move { send(addr, "POST", EVENT, &h, &body).await })
        })
        .collect();
    let mut inserted = std::collections::HashMap::<String, usize>::new();
    for (t, id) in tasks.into_iter().zip(&ids) {
        let r = t.await.unwrap();
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        let j = r.json();
        assert_eq!(
            j["event_id"],
            id.as_str(),
            "the answer is for the request's event"
        );
        *inserted.entry(id.clone()).or_default() += usize::from(j["inserted"] == true);
    }
    assert_eq!(inserted.len(), 400);
    assert!(
        inserted.values().all(|n| *n == 1),
        "each event is inserted:true exactly once"
    );
    assert_eq!(s.event_count().await, 400);
    // Every event is in exactly one verify job; a job carries a group commit's events.
    let mut queued = s.queued_events(QueueName::Verify).await;
    let jobs = s.app.queue.len(QueueName::Verify).await.unwrap();
    assert!(
        (1..=400).contains(&jobs),
        "{jobs} verify jobs for 400 events"
    );
    queued.sort();
    let mut want: Vec<String> = ids[..400].to_vec();
    want.sort();
    assert_eq!(queued, want, "each event queued once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_fetched_once_under_a_hundred_requests() {
    let (fakes, s, p) = setup().await;
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let body = event(&p, &format!("$k{i}:peer.test"));
            let h = json_signed(&p, EVENT, &body);
            let addr = s.addr;
            tokio::spawn(async move { send(addr, "POST", EVENT, &h, &body).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 202);
    }
    assert_eq!(
        fakes.key_fetches("peer"),
        1,
        "single flight: one fetch for 100 requests"
    );
    assert_eq!(s.app.keyring.fetch_count(), 1);
}

/// Bound: at most one `/keys` fetch per peer per `key_refetch_interval` (30 s by
/// default), whatever key ids it is sent. The first request fetches (the peer's real key
/// is then known); all 1 000 unknown key ids fall inside the same interval, so the total
/// is 1 fetch, and never more than 2 even if the run straddles one interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_unknown_key_ids_cause_bounded_fetches() {
    let (fakes, s, p) = setup().await;
    let body = event(&p, "$r:peer.test");
    let mut statuses = std::collections::BTreeMap::new();
    for chunk in 0..10 {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let mut h = json_signed(&p, EVENT, &body);
                let kid = format!("ed25519:rnd{chunk}x{i}");
                for (k, v) in h.iter_mut() {
                    if k == "X-Paracord-Key-Id" {
                        *v = kid.clone();
                    }
                }
                let body = body.clone();
                let addr = s.addr;
                tokio::spawn(async move { send(addr, "POST", EVENT, &h, &body).await.status })
            })
            .collect();
        for t in tasks {
            *statuses.entry(t.await.unwrap()).or_insert(0) += 1;
        }
    }
    assert_eq!(
        statuses.get(&403),
        Some(&1000),
        "every unknown key id is refused: {statuses:?}"
    );
    let fetches = fakes.key_fetches("peer");
    assert!(
        (1..=2).contains(&fetches),
        "{fetches} fetches for 1000 unknown key ids"
    );
    assert_eq!(s.event_count().await, 0);
}

/// With discovery off only configured peers federate: requests from made-up origin names
/// are refused without a key lookup, so cycling names costs parafed nothing to remember
/// and never a fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_origins_cause_no_key_lookups() {
    let (fakes, s, _) = setup().await;
    let tasks: Vec<_> = (0..300u32)
        .map(|i| {
            let mut seed = [7u8; 32];
            seed[..4].copy_from_slice(&i.to_be_bytes());
            let p = Peer::new(&format!("made-up-{i}.test"), "ed25519:x", seed);
            let body = event(&p, &format!("$m{i}:made-up-{i}.test"));
            let h = json_signed(&p, EVENT, &body);
            let addr = s.addr;
            tokio::spawn(async move { send(addr, "POST", EVENT, &h, &body).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("made-up-"));
    }
    assert_eq!(
        s.app.keyring.fetch_count(),
        0,
        "no fetch was even attempted"
    );
    assert_eq!(fakes.key_fetches("peer"), 0);
    assert_eq!(s.event_count().await, 0);
}

/// With discovery on, every request names an origin the ingress may have to look up at
/// `https://<name>/.well-known`: made-up names must not turn it into a generator of
/// outbound requests. 150 origins (each a listener on 127.0.0.1 that counts connections
/// and hangs up), three requests each: one lookup per name at most (the failure is
/// remembered), at most the per-minute budget in all, and every request answered 503.
/// Private addresses are allowed here (`federation.allow_private_addresses`): the
/// origins listen on loopback, which a discovered peer may not use by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_lookups_are_bounded_and_failures_remembered() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let mut origins = Vec::new();
    let mut counters = Vec::new();
    for _ in 0..150 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let n = Arc::new(AtomicU64::new(0));
        let c = n.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        origins.push(Peer::new(
            &format!("localhost:{port}"),
            "ed25519:auto",
            [7; 32],
        ));
        counters.push(n);
    }
    let server = TestServer::start(Options {
        extra_toml: "\n[federation]\ndiscovery = true\nallow_private_addresses = true\nrate_limit_per_minute = 0\n".into(),
        ..Options::default()
    })
    .await;
    let path = "/_paracord/federation/v1/event/%24x%3Alocalhost";
    let requests: Vec<Peer> = (0..3).flat_map(|_| origins.clone()).collect();
    use futures::StreamExt;
    let codes: Vec<u16> = futures::stream::iter(requests)
        .map(|p| {
            let addr = server.addr;
            async move {
                send(addr, "GET", path, &p.sign("GET", path, b""), b"")
                    .await
                    .status
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(codes.iter().all(|&c| c == 503), "{codes:?}");
    let per_name: Vec<u64> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    let total: u64 = per_name.iter().sum();
    assert!(
        per_name.iter().all(|&n| n <= 1),
        "a name was looked up twice: {per_name:?}"
    );
    assert!(total >= 1, "nothing was looked up");
    assert!(
        total <= u64::from(parafed::remote::directory::LOOKUPS_PER_MINUTE),
        "{total} lookups in well under a minute"
    );
}
