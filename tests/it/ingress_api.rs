//! The ingress over real HTTP: discovery documents, events in and out, the local and admin
//! APIs, and the request-level guards.

use crate::support;

use parafed::protocol::envelope::Signatures;
use parafed::protocol::{Envelope, EventId, EventType, RoomId, UserId};
use support::app::{json_signed, send, FakePeers, KeysAnswer, Options, Peer, TestServer};

const EVENT: &str = "/_paracord/federation/v1/event";

fn peer() -> Peer {
    Peer::new("peer.test", "ed25519:test", [1; 32])
}

fn event(p: &Peer, n: u32) -> Vec<u8> {
    let mut e = Envelope {
        event_id: EventId::parse(&format!("${n}:peer.test")).unwrap(),
        room_id: RoomId::parse("!7010:peer.test").unwrap(),
        event_type: EventType::parse("m.message").unwrap(),
        sender: UserId::parse("@alice:peer.test").unwrap(),
        origin_server: p.name.clone(),
        origin_ts: 1_700_000_000_000 + i64::from(n),
        content: serde_json::json!({"body": format!("hello {n}")}),
        depth: 1_700_000_000_000 + i64::from(n),
        state_key: None,
        signatures: Signatures::default(),
    };
    e.sign(&p.key);
    e.to_wire()
}

async fn setup() -> (FakePeers, TestServer, Peer) {
    let p = peer();
    let fakes = FakePeers::start(vec![("peer".into(), KeysAnswer::Keys(vec![p.clone()]))]).await;
    let server = TestServer::start(Options {
        peers: vec![("peer.test".into(), fakes.base_url("peer"))],
        ..Options::default()
    })
    .await;
    (fakes, server, p)
}

#[tokio::test]
async fn discovery_documents() {
    let (_f, s, _) = setup().await;
    let wk = send(s.addr, "GET", "/.well-known/paracord/server", &[], b"").await;
    assert_eq!(wk.status, 200);
    assert_eq!(
        String::from_utf8(wk.body).unwrap(),
        r#"{"domain":"paracord.test","enabled":true,"federation_endpoint":"/_paracord/federation/v1","server_name":"paracord.test","version":"federation-v1"}"#
    );
    parafed::store::keys::generate(&mut *s.db().await, None)
        .await
        .unwrap();
    let keys = send(s.addr, "GET", "/_paracord/federation/v1/keys", &[], b"")
        .await
        .json();
    let k = &keys["keys"][0];
    assert_eq!(keys["server_name"], "paracord.test");
    assert_eq!(k["server_name"], "paracord.test");
    assert_eq!(k["public_key"].as_str().unwrap().len(), 64);
    assert!(k["valid_until"].as_i64().unwrap() > parafed::time::now_ms());
}

#[tokio::test]
async fn event_round_trip_and_guards() {
    let (_f, s, p) = setup().await;
    let body = event(&p, 1);
    let r = send(s.addr, "POST", EVENT, &json_signed(&p, EVENT, &body), &body).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json(),
        serde_json::json!({"event_id": "$1:peer.test", "inserted": true})
    );

    // Signed GET returns the stored envelope (keys sorted, as Paracord answers).
    let path = "/_paracord/federation/v1/event/%241:peer.test";
    let got = send(s.addr, "GET", path, &p.sign("GET", path, b""), b"").await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let env: Envelope = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(env.to_wire(), body, "the stored envelope is byte-exact");

    let path = "/_paracord/federation/v1/events?room_id=!7010:peer.test&since_depth=0&limit=10";
    let page = send(s.addr, "GET", path, &p.sign("GET", path, b""), b"")
        .await
        .json();
    assert_eq!(page["events"].as_array().unwrap().len(), 1);

    // A duplicated header is refused, never resolved.
    let mut h = json_signed(&p, EVENT, &body);
    h.push(("X-Paracord-Origin".into(), "peer.test".into()));
    let r = send(s.addr, "POST", EVENT, &h, &body).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "BAD_REQUEST");

    // A query string on a POST endpoint is refused.
    let q = format!("{EVENT}?x=1");
    let r = send(s.addr, "POST", &q, &json_signed(&p, &q, &body), &body).await;
    assert_eq!(r.status, 400);

    // Unknown paths and methods answer JSON too.
    let r = send(s.addr, "GET", "/nope", &[], b"").await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    let r = send(s.addr, "DELETE", EVENT, &[], b"").await;
    assert_eq!(r.status, 405);
    assert_eq!(s.event_count().await, 1);
}

#[tokio::test]
async fn local_api_submits_idempotently_and_admin_reports() {
    let (_f, s, _) = setup().await;
    parafed::store::keys::generate(&mut *s.db().await, None)
        .await
        .unwrap();
    let auth = vec![
        ("Authorization".to_owned(), "Bearer local-secret".to_owned()),
        ("Content-Type".to_owned(), "application/json".to_owned()),
    ];
    let body = serde_json::json!({
        "txn_id": "t1", "room_id": "!1:peer.test", "event_type": "m.message",
        "sender": "@bob:paracord.test", "content": {"body": "hi"}
    })
    .to_string();
    let first = send(
        s.addr,
        "POST",
        "/_parafed/local/v1/events",
        &auth,
        body.as_bytes(),
    )
    .await;
    assert_eq!(
        first.status,
        202,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let again = send(
        s.addr,
        "POST",
        "/_parafed/local/v1/events",
        &auth,
        body.as_bytes(),
    )
    .await;
    assert_eq!(again.json(), first.json(), "same txn_id, same answer");
    assert_eq!(s.event_count().await, 1);
    let other = body.replace("hi", "changed");
    let conflict = send(
        s.addr,
        "POST",
        "/_parafed/local/v1/events",
        &auth,
        other.as_bytes(),
    )
    .await;
    assert_eq!(conflict.status, 409);

    // The event is signed with our key and queued for fan-out.
    let id = first.json()["event_id"].as_str().unwrap().to_owned();
    let stored = parafed::store::events::get(&mut *s.db().await, &id)
        .await
        .unwrap()
        .unwrap();
    let key = s.app.signing_key().await.unwrap();
    assert!(stored.envelope.verify(|_| Some(key.public_key())).is_ok());
    assert_eq!(
        s.app
            .queue
            .len(parafed::queue::QueueName::Fanout)
            .await
            .unwrap(),
        1
    );

    // Wrong or missing tokens.
    let bad = vec![("Authorization".to_owned(), "Bearer nope".to_owned())];
    assert_eq!(
        send(s.addr, "GET", "/_parafed/local/v1/feed", &bad, b"")
            .await
            .status,
        401
    );
    assert_eq!(
        send(s.addr, "GET", "/_parafed/admin/v1/status", &auth, b"")
            .await
            .status,
        401
    );
    let admin = vec![("Authorization".to_owned(), "Bearer admin-secret".to_owned())];
    let status = send(s.addr, "GET", "/_parafed/admin/v1/status", &admin, b"")
        .await
        .json();
    assert_eq!(status["events"]["accepted"], 1);
    let fanout = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "fanout")
        .unwrap();
    assert_eq!(fanout["ready"], 1, "{status:#}");
    assert_eq!(fanout["in_flight"], 0);

    let feed = send(
        s.addr,
        "GET",
        "/_parafed/local/v1/feed?since=0",
        &auth[..1],
        b"",
    )
    .await
    .json();
    assert_eq!(
        feed["events"],
        serde_json::json!([]),
        "our own events are not inbound"
    );
}
