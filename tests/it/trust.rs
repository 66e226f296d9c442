//! Trust and safety an operator runs, against running processes: decisions made with
//! `parafed admin peers …` reach two `parafed serve` processes without a restart; the
//! rate limit holds across both; a peer that sends bad signatures is quarantined
//! automatically, and its held events can be released (then processed) or purged.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use parafed::protocol::envelope::Signatures;
use parafed::protocol::{Envelope, EventId, EventType, RoomId, ServerName, UserId};
use parafed::store::schema::{federation_events as fe, outbound_queue as oq};
use serde_json::{json, Value};

use crate::admin::run;
use crate::support;
use support::app::{
    json_signed, keys_document, reserve_listener, send, FakeAnswer, FakeRequest, FnPeer, Options,
    Peer, ServeProcess, TestServer, WorkerProcess, FAST_WORKER_TOML,
};
use support::wait_for;

const ROOM: &str = "!r:alpha.test";
const EVENT: &str = "/_paracord/federation/v1/event";
const TOKEN: &str = "admin-secret";
const WAIT: Duration = Duration::from_secs(30);

fn envelope(from: &Peer, n: u64) -> Envelope {
    let origin = from.name.to_string();
    let mut e = Envelope {
        event_id: EventId::parse(&format!("${n}:{origin}")).unwrap(),
        room_id: RoomId::parse(ROOM).unwrap(),
        event_type: EventType::parse("m.message").unwrap(),
        sender: UserId::parse(&format!("@u:{origin}")).unwrap(),
        origin_server: ServerName::parse(&origin).unwrap(),
        origin_ts: 1_800_000_000_000 + n as i64,
        content: json!({"body": format!("n{n}"), "message_id": n.to_string()}),
        depth: n as i64,
        state_key: None,
        signatures: Signatures::default(),
    };
    e.sign(&from.key);
    e
}

/// Posts event `n` of `from` to the ingress at `addr`, signed in transport by `signer`.
async fn post(addr: std::net::SocketAddr, from: &Peer, signer: &Peer, n: u64) -> u16 {
    let body = envelope(from, n).to_wire();
    send(
        addr,
        "POST",
        EVENT,
        &json_signed(signer, EVENT, &body),
        &body,
    )
    .await
    .status
}

async fn status_of(alpha: &TestServer, id: &str) -> Option<String> {
    fe::table
        .filter(fe::event_id.eq(id))
        .select(fe::status)
        .first(&mut *alpha.db().await)
        .await
        .optional()
        .unwrap()
}

struct World {
    alpha: TestServer,
    peer: Peer,
    other: Peer,
    _peers: FnPeer,
}

/// Both peers on one server, each under a path prefix: their `/keys`, and 503 to every
/// delivery (so deliveries to them wait, whatever the test's timing, and a blocked
/// peer's are there to be cancelled).
async fn peers_server(peers: Vec<Peer>) -> (FnPeer, String) {
    let (l, url) = reserve_listener();
    let server = FnPeer::start(l, move |r: FakeRequest| {
        let peers = peers.clone();
        async move {
            let prefix = r
                .path
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or("")
                .to_owned();
            let Some(p) = peers
                .iter()
                .find(|p| p.name.as_str().starts_with(&format!("{prefix}.")))
            else {
                return FakeAnswer::empty(404);
            };
            if !r.path.ends_with("/keys") {
                return FakeAnswer::json(503, json!({"error": "busy"}));
            }
            FakeAnswer::json(200, keys_document(p))
        }
    })
    .await;
    (server, url)
}

async fn world(federation_toml: &str) -> World {
    let peer = Peer::new("peer.test", "ed25519:auto", [5; 32]);
    let other = Peer::new("other.test", "ed25519:auto", [6; 32]);
    let (server, base) = peers_server(vec![peer.clone(), other.clone()]).await;
    let alpha = TestServer::start(Options {
        server_name: "alpha.test".into(),
        peers: vec![
            ("peer.test".into(), format!("{base}/peer")),
            ("other.test".into(), format!("{base}/other")),
        ],
        signing_key: true,
        extra_toml: format!(
            "\n[federation]\ndiscovery = false\n{federation_toml}\n{FAST_WORKER_TOML}"
        ),
        ..Options::default()
    })
    .await;
    support::host_room(
        &mut *alpha.db().await,
        ROOM,
        &[
            ("@u:peer.test", "peer.test"),
            ("@u:other.test", "other.test"),
        ],
    )
    .await;
    World {
        alpha,
        peer,
        other,
        _peers: server,
    }
}

async fn admin_json(url: &str, args: &[&str]) -> Value {
    let mut full = vec!["--output", "json"];
    full.extend_from_slice(args);
    let (code, out, err) = run(url, Some(TOKEN), &full).await;
    assert_eq!(code, 0, "parafed admin {args:?}: exit {code}\n{out}\n{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_decisions_reach_both_ingress_processes_without_a_restart() {
    let w = world("rate_limit_per_minute = 0").await;
    let a = ServeProcess::start(&w.alpha, TOKEN).await;
    let b = ServeProcess::start(&w.alpha, TOKEN).await;
    let _worker = WorkerProcess::start(&w.alpha);
    let url = a.base_url();
    let mut n = 0u64;
    let mut next = || {
        n += 1;
        n
    };

    // Allowlist mode: an unlisted peer is refused on both, and nothing is stored.
    let m = admin_json(&url, &["peers", "mode", "allowlist"]).await;
    assert_eq!(m["mode"], "allowlist");
    let fresh = std::sync::atomic::AtomicU64::new(1_000_000);
    for addr in [a.addr, b.addr] {
        wait_for("the allowlist refuses peer.test", WAIT, || async {
            let id = fresh.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (post(addr, &w.peer, &w.peer, id).await == 403).then_some(())
        })
        .await;
    }
    let before = w.alpha.event_count().await;
    for addr in [a.addr, b.addr] {
        assert_eq!(post(addr, &w.peer, &w.peer, next()).await, 403);
    }
    assert_eq!(
        w.alpha.event_count().await,
        before,
        "a refused peer stored something"
    );

    // allow: admitted right after, on both processes, with no restart.
    let shown = admin_json(
        &url,
        &["peers", "allow", "peer.test", "--reason", "partner"],
    )
    .await;
    assert_eq!(shown["standing"], "allowed");
    for addr in [a.addr, b.addr] {
        let id = next();
        wait_for("peer.test is admitted", WAIT, || async {
            (post(addr, &w.peer, &w.peer, id).await == 202).then_some(())
        })
        .await;
    }
    // other.test is still unlisted.
    assert_eq!(post(b.addr, &w.other, &w.other, next()).await, 403);

    // quarantine: inbound stored but held; outbound held.
    admin_json(
        &url,
        &["peers", "quarantine", "peer.test", "--reason", "spam wave"],
    )
    .await;
    wait_for("peer.test's events are held", WAIT, || async {
        let id = fresh.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        next_held(&w, a.addr, b.addr, id).await.then_some(())
    })
    .await;
    let local = crate::pipeline::submit(
        &w.alpha,
        "q1",
        "m.message",
        "@a:alpha.test",
        json!({"message_id": "q1", "body": "to the room"}),
    )
    .await;
    wait_for("outbound to peer.test is held", WAIT, || async {
        (w.alpha
            .health("peer.test")
            .await
            .map(|h| h.state)
            .as_deref()
            == Some("held"))
        .then_some(())
    })
    .await;
    let shown = admin_json(&url, &["peers", "show", "peer.test"]).await;
    assert_eq!(shown["standing"], "quarantined");
    assert_eq!(shown["decision"]["reason"], "spam wave");
    assert_eq!(shown["decision"]["set_by"], "ops-test");
    assert!(shown["held_events"].as_i64().unwrap() >= 1);
    assert!(shown["waiting_deliveries"].as_i64().unwrap() >= 1);
    let audit: Vec<&str> = shown["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(audit[..2], ["peers.quarantine", "peers.allow"], "{audit:?}");

    // release: the held events are processed (accepted), oldest first.
    let held: Vec<String> = fe::table
        .filter(fe::status.eq("held"))
        .order(fe::seq.asc())
        .select(fe::event_id)
        .load(&mut *w.alpha.db().await)
        .await
        .unwrap();
    let released = admin_json(&url, &["peers", "release", "peer.test"]).await;
    assert_eq!(released["count"].as_u64().unwrap() as usize, held.len());
    for id in &held {
        wait_for("a released event is accepted", WAIT, || async {
            (status_of(&w.alpha, id).await.as_deref() == Some("accepted")).then_some(())
        })
        .await;
    }

    // block: refused on both, nothing stored, its waiting deliveries cancelled (kept).
    admin_json(&url, &["peers", "quarantine", "peer.test"]).await; // hold outbound again
    let (code, _, _) = run(&url, Some(TOKEN), &["peers", "block", "peer.test"]).await;
    assert_eq!(code, 2, "block without --yes");
    let blocked = admin_json(
        &url,
        &["peers", "block", "peer.test", "--reason", "abuse", "--yes"],
    )
    .await;
    assert_eq!(blocked["standing"], "refused");
    for addr in [a.addr, b.addr] {
        wait_for("peer.test is refused", WAIT, || async {
            let id = fresh.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (post(addr, &w.peer, &w.peer, id).await == 403).then_some(())
        })
        .await;
    }
    // Once refused, nothing it sends is stored, on either process.
    let before = w.alpha.event_count().await;
    for addr in [a.addr, b.addr] {
        assert_eq!(post(addr, &w.peer, &w.peer, next()).await, 403);
    }
    assert_eq!(w.alpha.event_count().await, before);
    let row: (String, Option<String>) = oq::table
        .filter(oq::event_id.eq(&local))
        .filter(oq::destination.eq("peer.test"))
        .select((oq::status, oq::dead_reason))
        .first(&mut *w.alpha.db().await)
        .await
        .unwrap();
    assert_eq!(row.0, "cancelled");
    let why = row.1.unwrap_or_default();
    assert!(why.contains("blocked"), "{why}");

    // Limits of one's own, and back to open mode: other.test federates again.
    let limited = admin_json(
        &url,
        &[
            "peers",
            "rate-limit",
            "other.test",
            "--per-minute",
            "100",
            "--in-flight",
            "4",
        ],
    )
    .await;
    assert_eq!(limited["limits"]["rate_limit_per_minute"], 100);
    assert_eq!(limited["limits"]["max_in_flight"], 4);
    admin_json(&url, &["peers", "mode", "open"]).await;
    let id = next();
    wait_for("other.test is admitted in open mode", WAIT, || async {
        (post(b.addr, &w.other, &w.other, id).await == 202).then_some(())
    })
    .await;
    let list = admin_json(&url, &["peers", "list"]).await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["server_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other.test", "peer.test"]);
    let audit = admin_json(&url, &["audit", "list", "--action", "peers."]).await;
    assert!(audit["items"].as_array().unwrap().len() >= 8);
}

/// Posts event `id` to both processes until one is stored held.
async fn next_held(w: &World, a: std::net::SocketAddr, b: std::net::SocketAddr, id: u64) -> bool {
    for (i, addr) in [a, b].into_iter().enumerate() {
        let n = id * 10 + i as u64;
        if post(addr, &w.peer, &w.peer, n).await != 202 {
            return false;
        }
        if status_of(&w.alpha, &format!("${n}:peer.test"))
            .await
            .as_deref()
            != Some("held")
        {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_across_two_ingress_processes() {
    const PER_MINUTE: f64 = 600.0;
    let w = world(&format!("rate_limit_per_minute = {PER_MINUTE}")).await;
    let a = ServeProcess::start(&w.alpha, TOKEN).await;
    let b = ServeProcess::start(&w.alpha, TOKEN).await;
    // other.test has a limit of its own, well above what it sends.
    admin_json(
        &a.base_url(),
        &[
            "peers",
            "rate-limit",
            "other.test",
            "--per-minute",
            "100000",
        ],
    )
    .await;
    let started = Instant::now();
    let get = |from: Peer, addr: std::net::SocketAddr, i: u64| async move {
        let path = format!("/_paracord/federation/v1/event/%24{i}%3Anowhere.test");
        send(addr, "GET", &path, &from.sign("GET", &path, b""), b"")
            .await
            .status
    };
    let flood = {
        let (peer, a, b) = (w.peer.clone(), a.addr, b.addr);
        tokio::spawn(async move {
            use futures::StreamExt;
            futures::stream::iter(0..5000u64)
                .map(|i| get(peer.clone(), if i % 2 == 0 { a } else { b }, i))
                .buffer_unordered(32)
                .collect::<Vec<u16>>()
                .await
        })
    };
    let steady = {
        let (other, a, b) = (w.other.clone(), a.addr, b.addr);
        tokio::spawn(async move {
            let mut codes = Vec::new();
            for i in 0..200u64 {
                codes.push(get(other.clone(), if i % 2 == 0 { a } else { b }, i).await);
            }
            codes
        })
    };
    let flood = flood.await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let steady = steady.await.unwrap();
    let admitted = flood.iter().filter(|&&c| c != 429).count() as f64;
    let limited = flood.iter().filter(|&&c| c == 429).count();
    assert!(
        flood.iter().all(|&c| c == 404 || c == 429),
        "{:?}",
        &flood[..10]
    );
    // GCRA: a burst of the limit, then the limit's rate, whichever process answers.
    let expected = PER_MINUTE + PER_MINUTE / 60.0 * elapsed;
    assert!(
        (admitted - expected).abs() <= expected * 0.10,
        "admitted {admitted} of 5000 in {elapsed:.1} s; the limit allows {expected:.0}"
    );
    assert!(limited > 0);
    assert!(
        steady.iter().all(|&c| c == 404),
        "other.test was limited: {steady:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_bad_signatures_quarantine_a_peer_automatically() {
    let w =
        world("rate_limit_per_minute = 0\nquarantine_threshold = 50\nquarantine_secs = 0").await;
    let serve = ServeProcess::start(&w.alpha, TOKEN).await;
    let _worker = WorkerProcess::start(&w.alpha);
    let url = serve.base_url();
    // Same name and key id, another key: every transport signature is bad.
    let impostor = Peer::new("peer.test", "ed25519:auto", [99; 32]);
    for n in 0..50 {
        assert_eq!(post(serve.addr, &w.peer, &impostor, 1000 + n).await, 403);
    }
    let shown = wait_for("peer.test is quarantined", WAIT, || async {
        let s = admin_json(&url, &["peers", "show", "peer.test"]).await;
        (s["standing"] == "quarantined").then_some(s)
    })
    .await;
    assert_eq!(shown["decision"]["automatic"], true);
    assert_eq!(shown["decision"]["set_by"], "parafed (automatic)");
    let reason = shown["decision"]["reason"].as_str().unwrap();
    assert!(reason.contains("50 bad transport signature"), "{reason}");
    assert!(
        shown["decision"]["until"].is_null(),
        "waits for an operator"
    );
    let offenses: Value =
        serde_json::from_str(shown["decision"]["offenses"].as_str().unwrap()).unwrap();
    assert_eq!(offenses["bad_transport_signature"], 50);
    assert_eq!(w.alpha.event_count().await, 0);

    // Its events are now held; purge drops them (counted and recorded).
    for n in 1..=3 {
        assert_eq!(post(serve.addr, &w.peer, &w.peer, n).await, 202);
    }
    assert_eq!(
        status_of(&w.alpha, "$1:peer.test").await.as_deref(),
        Some("held")
    );
    let (code, _, _) = run(&url, Some(TOKEN), &["peers", "purge", "peer.test"]).await;
    assert_eq!(code, 2, "purge without --yes");
    let purged = admin_json(&url, &["peers", "purge", "peer.test", "--yes"]).await;
    assert_eq!(purged["count"], 3);
    assert_eq!(purged["peer"]["held_events"], 0);
    assert_eq!(w.alpha.event_count().await, 0);
    let audit = admin_json(&url, &["audit", "list", "--action", "peers."]).await;
    let rows = audit["items"].as_array().unwrap();
    assert_eq!(rows[0]["action"], "peers.purge");
    assert_eq!(rows[0]["count"], 3);
    assert_eq!(rows[1]["actor"], "parafed (automatic)");

    // More held events; release processes them, in order.
    for n in 4..=8 {
        assert_eq!(post(serve.addr, &w.peer, &w.peer, n).await, 202);
    }
    let released = admin_json(&url, &["peers", "release", "peer.test"]).await;
    assert_eq!(released["count"], 5);
    assert_eq!(released["peer"]["standing"], "allowed");
    for n in 4..=8 {
        let id = format!("${n}:peer.test");
        wait_for("a released event is accepted", WAIT, || async {
            (status_of(&w.alpha, &id).await.as_deref() == Some("accepted")).then_some(())
        })
        .await;
    }

    // A quarantine with an end: when it lapses, the peer is back where it was and what
    // was held is processed (the workers' scheduler runs this once a minute).
    let q = admin_json(
        &url,
        &["peers", "quarantine", "peer.test", "--for-secs", "1"],
    )
    .await;
    let until: chrono::DateTime<chrono::Utc> =
        q["decision"]["until"].as_str().unwrap().parse().unwrap();
    for n in 9..=10 {
        assert_eq!(post(serve.addr, &w.peer, &w.peer, n).await, 202);
    }
    assert_eq!(
        status_of(&w.alpha, "$9:peer.test").await.as_deref(),
        Some("held")
    );
    wait_for("the quarantine's end time passes", WAIT, || async {
        (chrono::Utc::now() > until).then_some(())
    })
    .await;
    let lifted = parafed::admin::peers::lift_lapsed(&w.alpha.app)
        .await
        .unwrap();
    assert_eq!(lifted, 1);
    for n in 9..=10 {
        let id = format!("${n}:peer.test");
        wait_for(
            "an event held until the quarantine ended is accepted",
            WAIT,
            || async {
                (status_of(&w.alpha, &id).await.as_deref() == Some("accepted")).then_some(())
            },
        )
        .await;
    }
    let shown = admin_json(&url, &["peers", "show", "peer.test"]).await;
    assert_eq!(shown["standing"], "allowed");
    assert_eq!(shown["audit"][0]["action"], "peers.release");
    assert_eq!(shown["audit"][0]["actor"], "parafed (automatic)");
    assert_eq!(shown["audit"][0]["count"], 2);
}

/// A peer chooses where discovery sends our requests (its name, its `/.well-known`): a
/// member server named by a loopback address — here the address of a listener on this
/// machine, as a peer could name our Redis — is never connected to. Its delivery fails
/// before anything is sent, with a message an operator can act on, and the destination
/// backs off (`remote::address`; discovery is on, as by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_server_named_by_a_loopback_address_is_never_connected_to() {
    let inward_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let inward = inward_listener.local_addr().unwrap().to_string();
    let (la, _) = reserve_listener();
    let alpha = TestServer::start(Options {
        server_name: "alpha.test".into(),
        listener: Some(la),
        signing_key: true,
        extra_toml: format!("\n[federation]\nrate_limit_per_minute = 0\n{FAST_WORKER_TOML}"),
        ..Options::default()
    })
    .await;
    let member = format!("@x:{inward}");
    support::host_room(
        &mut *alpha.db().await,
        ROOM,
        &[
            ("@alice:alpha.test", "alpha.test"),
            (member.as_str(), inward.as_str()),
        ],
    )
    .await;
    let _w = support::app::TestWorker::start(&alpha);
    crate::pipeline::submit(
        &alpha,
        "inward-1",
        "m.message",
        "@alice:alpha.test",
        json!({"message_id": "1", "channel_id": "1", "body": "hi"}),
    )
    .await;
    let h = wait_for("the inward destination to fail", WAIT, || async {
        alpha
            .health(&inward)
            .await
            .filter(|h| h.last_error.is_some())
    })
    .await;
    let error = h.last_error.unwrap_or_default();
    assert!(
        error.contains(&format!(
            "{} is a non-public address",
            inward.split(':').next().unwrap()
        )) && error.contains("[peers]"),
        "{error}"
    );
    assert_eq!(h.state, "backing_off");
    assert_eq!(h.last_status_code, None);
    // Nothing reached the listener: the refusal came before any connection.
    inward_listener.set_nonblocking(true).unwrap();
    assert!(
        matches!(inward_listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a connection reached the loopback address"
    );
}
