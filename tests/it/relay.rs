//! Nobody can make parafed lose another server's event: only a room's host relays, and
//! a copy nobody could check never beats a correctly signed one (DESIGN.md "Rooms").
//!
//! The attack: in a room hosted here, `peer.test` posts an envelope claiming
//! `origin_server: relay.test`, signed with its own key, under the id relay.test is about
//! to use. If that copy were stored, relay.test's genuine event would get
//! `inserted: false` and be lost when the forgery is rejected.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use parafed::protocol::envelope::Signatures;
use parafed::protocol::{Envelope, EventId, EventType, RoomId, UserId};
use parafed::store::schema::federation_events as fe;
use serde_json::json;

use crate::support;
use support::app::{
    event_id_of, json_signed, keys_document, reserve_listener, send, FakeAnswer, FakePeers,
    FakeRequest, FnPeer, KeysAnswer, Options, Peer, TestServer, TestWorker, FAST_WORKER_TOML,
};
use support::wait_for;

const ROOM: &str = "!r:alpha.test";
const EVENT: &str = "/_paracord/federation/v1/event";
/// The id relay.test is about to use (Paracord's ids are predictable).
const ID: &str = "$384096155941736448:relay.test";

fn envelope(signer: &Peer, origin: &str, body: &str) -> Envelope {
    let mut e = Envelope {
        event_id: EventId::parse(ID).unwrap(),
        room_id: RoomId::parse(ROOM).unwrap(),
        event_type: EventType::parse("m.message").unwrap(),
        sender: UserId::parse("@bob:relay.test").unwrap(),
        origin_server: parafed::protocol::ServerName::parse(origin).unwrap(),
        origin_ts: 1_800_000_000_000,
        content: json!({"body": body, "message_id": "384096155941736448"}),
        depth: 1_800_000_000_000,
        state_key: None,
        signatures: Signatures::default(),
    };
    e.sign(&signer.key);
    e
}

struct World {
    alpha: TestServer,
    peer: Peer,
    relay: Peer,
    gamma_got: Arc<Mutex<HashSet<String>>>,
    _fakes: FakePeers,
    _gamma: FnPeer,
}

async fn world() -> World {
    let peer = Peer::new("peer.test", "ed25519:auto", [3; 32]);
    let relay = Peer::new("relay.test", "ed25519:auto", [4; 32]);
    let fakes = FakePeers::start(vec![
        ("peer".into(), KeysAnswer::Keys(vec![peer.clone()])),
        ("relay".into(), KeysAnswer::Keys(vec![relay.clone()])),
    ])
    .await;
    let gamma_got: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (lg, ug) = reserve_listener();
    let g = gamma_got.clone();
    let gamma = FnPeer::start(lg, move |r: FakeRequest| {
        let g = g.clone();
        async move {
            let id = event_id_of(&r.body);
            g.lock().unwrap().insert(id.clone());
            FakeAnswer::json(202, json!({"event_id": id, "inserted": true}))
        }
    })
    .await;
    let alpha = TestServer::start(Options {
        server_name: "alpha.test".into(),
        peers: vec![
            ("peer.test".into(), fakes.base_url("peer")),
            ("relay.test".into(), fakes.base_url("relay")),
            ("gamma.test".into(), ug),
        ],
        signing_key: true,
        extra_toml: format!(
            "\n[federation]\ndiscovery = false\nrate_limit_per_minute = 0\n{FAST_WORKER_TOML}"
        ),
        ..Options::default()
    })
    .await;
    let mut c = alpha.db().await;
    support::host_room(
        &mut c,
        ROOM,
        &[
            ("@p:peer.test", "peer.test"),
            ("@bob:relay.test", "relay.test"),
            ("@g:gamma.test", "gamma.test"),
        ],
    )
    .await;
    drop(c);
    World {
        alpha,
        peer,
        relay,
        gamma_got,
        _fakes: fakes,
        _gamma: gamma,
    }
}

async fn post(w: &World, from: &Peer, env: &Envelope) -> (u16, serde_json::Value) {
    let body = env.to_wire();
    let r = send(
        w.alpha.addr,
        "POST",
        EVENT,
        &json_signed(from, EVENT, &body),
        &body,
    )
    .await;
    let status = r.status;
    (status, r.json())
}

async fn stored_body(w: &World) -> Option<(String, String)> {
    fe::table
        .filter(fe::event_id.eq(ID))
        .select((fe::content, fe::status))
        .first(&mut *w.alpha.db().await)
        .await
        .optional()
        .unwrap()
}

async fn check_forgery_then_genuine(worker_first: bool) {
    let w = world().await;
    let worker = worker_first.then(|| TestWorker::start(&w.alpha));
    // The forgery: peer.test speaks for relay.test in a room hosted here.
    let forged = envelope(&w.peer, "relay.test", "forged");
    let (status, body) = post(&w, &w.peer, &forged).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "FORBIDDEN");
    assert!(
        stored_body(&w).await.is_none(),
        "nothing stored for a forgery"
    );
    // The genuine event is stored.
    let genuine = envelope(&w.relay, "relay.test", "genuine");
    let (status, body) = post(&w, &w.relay, &genuine).await;
    assert_eq!((status, &body["inserted"]), (202, &json!(true)), "{body}");
    let _worker = worker.unwrap_or_else(|| TestWorker::start(&w.alpha));
    wait_for(
        "the genuine event accepted",
        Duration::from_secs(30),
        || async {
            stored_body(&w)
                .await
                .filter(|(content, status)| status == "accepted" && content.contains("genuine"))
        },
    )
    .await;
    let g = w.gamma_got.clone();
    wait_for(
        "the genuine event relayed to gamma",
        Duration::from_secs(30),
        || async { g.lock().unwrap().contains(ID).then_some(()) },
    )
    .await;
    let path = format!("/_paracord/federation/v1/event/{}", ID.replace('$', "%24"));
    let got = send(
        w.alpha.addr,
        "GET",
        &path,
        &w.peer.sign("GET", &path, b""),
        b"",
    )
    .await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.json()["content"]["body"], "genuine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_relay_for_another_server_with_the_worker_stopped() {
    check_forgery_then_genuine(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_relay_for_another_server_with_the_worker_running() {
    check_forgery_then_genuine(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchecked_held_copy_does_not_block_the_correctly_signed_event() {
    let w = world().await;
    // A copy nobody could check, held from a quarantined sender, under the genuine id.
    let squatter = envelope(&w.peer, "relay.test", "held forgery");
    parafed::store::events::insert(
        &mut *w.alpha.db().await,
        &[parafed::store::events::NewEvent {
            envelope: &squatter,
            received_from: Some(&w.peer.name),
            status: parafed::store::events::EventStatus::Held,
            signature_checked: false,
        }],
    )
    .await
    .unwrap();
    let genuine = envelope(&w.relay, "relay.test", "genuine");
    let (status, body) = post(&w, &w.relay, &genuine).await;
    assert_eq!((status, &body["inserted"]), (202, &json!(true)), "{body}");
    let (content, status) = stored_body(&w).await.unwrap();
    assert!(content.contains("genuine"), "{content}");
    assert_eq!(status, "pending");
    // The same correctly signed event again is a duplicate, as before.
    let (status, body) = post(&w, &w.relay, &genuine).await;
    assert_eq!((status, &body["inserted"]), (202, &json!(false)), "{body}");
    let _worker = TestWorker::start(&w.alpha);
    wait_for(
        "the genuine event accepted",
        Duration::from_secs(30),
        || async { stored_body(&w).await.filter(|(_, s)| s == "accepted") },
    )
    .await;
}

/// A held event is judged again when it is released: the ingress checked its signature
/// when it arrived, but it may have been held for days, and its origin may have stopped
/// listing the key since. Released, it is checked against the keys listed now — here
/// the key it was signed with is gone — and rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_event_is_checked_against_the_keys_listed_now() {
    let w = world().await;
    // Signed with a key relay.test listed when the event arrived, and lists no more.
    let retired = Peer::new("relay.test", "ed25519:auto", [9; 32]);
    let held = envelope(&retired, "relay.test", "held for days");
    parafed::store::events::insert(
        &mut *w.alpha.db().await,
        &[parafed::store::events::NewEvent {
            envelope: &held,
            received_from: Some(&w.relay.name),
            status: parafed::store::events::EventStatus::Held,
            signature_checked: true,
        }],
    )
    .await
    .unwrap();
    let released = parafed::store::events::release_held(&mut *w.alpha.db().await, "relay.test")
        .await
        .unwrap();
    assert_eq!(released, vec![ID.to_owned()]);
    // The reconciler pushes its verify job.
    let _worker = TestWorker::start(&w.alpha);
    let (_, status) = wait_for(
        "the released event judged",
        Duration::from_secs(30),
        || async { stored_body(&w).await.filter(|(_, s)| s != "pending") },
    )
    .await;
    assert_eq!(status, "rejected");
}

/// A host relays an event whose origin is briefly unreachable: the event is stored
/// unchecked, and the verify job waits for the origin's keys instead of rejecting it —
/// its relayer was told it arrived and will not send it again, so a rejection would lose
/// it. Once the origin answers, it is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_event_waits_for_an_unreachable_origin_instead_of_being_rejected() {
    let origin = Peer::new("origin.test", "ed25519:auto", [22; 32]);
    let (status, reason, origin_fetches) =
        relayed_while_the_origin_is_down("$777:origin.test", &origin, FAST_WORKER_TOML).await;
    assert_eq!(status, "accepted", "{reason:?}");
    assert!(origin_fetches >= 3);
}

/// The same with the default `job_timeout_ms` (two minutes here): the verify job that
/// found the origin unreachable runs again seconds later, after its backoff
/// (`StreamConsumer::retry_later`), not once the job times out — the event is accepted
/// well within the wait below, which the job's timeout alone would outlast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_job_that_failed_runs_again_after_its_backoff_not_after_job_timeout_ms() {
    let origin = Peer::new("origin.test", "ed25519:auto", [22; 32]);
    let worker = FAST_WORKER_TOML.replace("job_timeout_ms = 5000", "job_timeout_ms = 120000");
    assert_ne!(worker, FAST_WORKER_TOML);
    let (status, reason, origin_fetches) =
        relayed_while_the_origin_is_down("$779:origin.test", &origin, &worker).await;
    assert_eq!(status, "accepted", "{reason:?}");
    assert!(origin_fetches >= 3);
}

/// The same, with an envelope signed by a key the origin does not hold: stored
/// unchecked at the door (the origin's keys could not be had), it is checked by the
/// verify job once they can, and rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_event_stored_unchecked_with_a_bad_signature_is_rejected_by_the_job() {
    let forger = Peer::new("origin.test", "ed25519:auto", [23; 32]);
    let (status, reason, _) =
        relayed_while_the_origin_is_down("$778:origin.test", &forger, FAST_WORKER_TOML).await;
    assert_eq!(status, "rejected");
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("signature")),
        "{reason:?}"
    );
}

/// host.test relays origin.test's event `id`, signed by `signer`, while origin.test's
/// key server is down (its first two fetches get 503); a worker (`worker_toml`: its
/// `[worker]` and `[delivery]` settings) judges it. Returns the event's status once
/// judged (within 60 s), its reject reason, and how often origin.test's keys were
/// fetched.
async fn relayed_while_the_origin_is_down(
    id: &str,
    signer: &Peer,
    worker_toml: &str,
) -> (String, Option<String>, u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let host = Peer::new("host.test", "ed25519:auto", [21; 32]);
    let origin = Peer::new("origin.test", "ed25519:auto", [22; 32]);
    let origin_fetches = Arc::new(AtomicU64::new(0));
    let (l, url) = reserve_listener();
    let (h, o, n) = (host.clone(), origin.clone(), origin_fetches.clone());
    let _keys = FnPeer::start(l, move |r: FakeRequest| {
        let (h, o, n) = (h.clone(), o.clone(), n.clone());
        async move {
            let p = if r.path.starts_with("/host/") {
                h
            } else {
                o.clone()
            };
            if !r.path.ends_with("/keys") {
                return FakeAnswer::json(
                    202,
                    json!({"event_id": event_id_of(&r.body), "inserted": true}),
                );
            }
            // The origin is down for its first two key fetches.
            if p.name.as_str() == "origin.test" && n.fetch_add(1, Ordering::SeqCst) < 2 {
                return FakeAnswer::json(503, json!({"error": "down"}));
            }
            FakeAnswer::json(200, keys_document(&p))
        }
    })
    .await;
    let alpha = TestServer::start(Options {
        server_name: "alpha.test".into(),
        peers: vec![
            ("host.test".into(), format!("{url}/host")),
            ("origin.test".into(), format!("{url}/origin")),
        ],
        signing_key: true,
        extra_toml: format!(
            "\n[federation]\ndiscovery = false\nrate_limit_per_minute = 0\nkey_refetch_interval_ms = 100\n{worker_toml}"
        ),
        ..Options::default()
    })
    .await;
    let _worker = TestWorker::start(&alpha);
    let mut e = Envelope {
        event_id: EventId::parse(id).unwrap(),
        room_id: RoomId::parse("!r:host.test").unwrap(),
        event_type: EventType::parse("m.message").unwrap(),
        sender: UserId::parse("@o:origin.test").unwrap(),
        origin_server: parafed::protocol::ServerName::parse("origin.test").unwrap(),
        origin_ts: 1_800_000_000_000,
        content: json!({"body": "through the host", "message_id": id}),
        depth: 1,
        state_key: None,
        signatures: Signatures::default(),
    };
    e.sign(&signer.key);
    let body = e.to_wire();
    let r = send(
        alpha.addr,
        "POST",
        EVENT,
        &json_signed(&host, EVENT, &body),
        &body,
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    let (status, reason) = wait_for(
        "the relayed event is judged",
        Duration::from_secs(60),
        || async {
            let s: Option<(String, Option<String>)> = fe::table
                .filter(fe::event_id.eq(id))
                .select((fe::status, fe::reject_reason))
                .first(&mut *alpha.db().await)
                .await
                .optional()
                .unwrap();
            s.filter(|(s, _)| s != "pending")
        },
    )
    .await;
    (
        status,
        reason,
        AtomicU64::load(&origin_fetches, Ordering::SeqCst),
    )
}
