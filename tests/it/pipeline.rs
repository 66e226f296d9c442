//! The delivery pipeline end to end: parafed servers with their worker fleets, and
//! scripted peers, all real HTTP on 127.0.0.1 with real Postgres and Redis.

use crate::support;

use std::time::Duration;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use parafed::store::schema::{
    delivery_attempts as da, federation_events as fe, outbound_queue as oq,
};
use serde_json::json;
use support::app::{
    reserve_listener, send, Options, ScriptedPeer, TestServer, TestWorker, FAST_WORKER_TOML,
};
use support::wait_for;

pub(crate) const ROOM: &str = "!r:alpha.test";
/// 403s in a row after which the destination backs off (src/delivery/policy.rs).
const FORBIDDEN_RUN: i32 = 3;

pub(crate) fn local(token: &str) -> Vec<(String, String)> {
    vec![
        ("Authorization".into(), format!("Bearer {token}")),
        ("Content-Type".into(), "application/json".into()),
    ]
}

pub(crate) async fn local_post(
    s: &TestServer,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let r = send(
        s.addr,
        "POST",
        path,
        &local("local-secret"),
        body.to_string().as_bytes(),
    )
    .await;
    assert!(
        r.status < 300,
        "{path}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

pub(crate) async fn submit(
    s: &TestServer,
    txn: &str,
    event_type: &str,
    sender: &str,
    content: serde_json::Value,
) -> String {
    let j = local_post(
        s,
        "/_parafed/local/v1/events",
        json!({"txn_id": txn, "room_id": ROOM, "event_type": event_type, "sender": sender, "content": content}),
    )
    .await;
    j["event_id"].as_str().unwrap().to_owned()
}

pub(crate) async fn has_event(s: &TestServer, id: &str) -> bool {
    let n: i64 = fe::table
        .filter(fe::event_id.eq(id))
        .filter(fe::status.eq("accepted"))
        .count()
        .get_result(&mut *s.db().await)
        .await
        .unwrap();
    n == 1
}

pub(crate) async fn server(
    name: &str,
    listener: std::net::TcpListener,
    peers: Vec<(String, String)>,
) -> TestServer {
    server_with(name, listener, peers, FAST_WORKER_TOML).await
}

pub(crate) async fn server_with(
    name: &str,
    listener: std::net::TcpListener,
    peers: Vec<(String, String)>,
    worker_toml: &str,
) -> TestServer {
    TestServer::start(Options {
        server_name: name.into(),
        peers,
        listener: Some(listener),
        signing_key: true,
        extra_toml: format!(
            "\n[federation]\ndiscovery = false\nrate_limit_per_minute = 0\n{worker_toml}"
        ),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_exchange_every_text_feature() {
    let (la, ua) = reserve_listener();
    let (lb, ub) = reserve_listener();
    let (lg, ug) = reserve_listener();
    let peers = |me: &str| -> Vec<(String, String)> {
        [("alpha.test", &ua), ("beta.test", &ub), ("gamma.test", &ug)]
            .iter()
            .filter(|(n, _)| *n != me)
            .map(|(n, u)| (n.to_string(), u.to_string()))
            .collect()
    };
    let alpha = server("alpha.test", la, peers("alpha.test")).await;
    let beta = server("beta.test", lb, peers("beta.test")).await;
    let gamma = server("gamma.test", lg, peers("gamma.test")).await;
    let _workers = [
        TestWorker::start(&alpha),
        TestWorker::start(&beta),
        TestWorker::start(&gamma),
    ];

    // alpha hosts the room; beta and gamma ask for an invite, then join.
    let r = send(
        alpha.addr,
        "PUT",
        &format!("/_parafed/local/v1/rooms/{ROOM}"),
        &local("local-secret"),
        json!({"guild_name": "Federated Guild", "default_channel_id": "1"})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    for (s, user) in [(&beta, "@bob:beta.test"), (&gamma, "@carol:gamma.test")] {
        let inv = local_post(
            s,
            "/_parafed/local/v1/invite",
            json!({"room_id": ROOM, "user_id": user}),
        )
        .await;
        assert_eq!(inv["status"], 200, "{inv}");
        assert_eq!(inv["response"]["guild_name"], "Federated Guild");
        let join = local_post(
            s,
            "/_parafed/local/v1/join",
            json!({"room_id": ROOM, "user_id": user}),
        )
        .await;
        assert_eq!(join["status"], 200, "{join}");
        assert_eq!(join["response"]["joined"], true);
    }

    // Every text feature, from every server, in this order.
    let script = [
        (
            "alpha",
            &alpha,
            "a1",
            "m.message",
            "@alice:alpha.test",
            json!({"body": "welcome"}),
        ),
        (
            "beta",
            &beta,
            "b0",
            "m.member.join",
            "@bob:beta.test",
            json!({"user_id": "bob"}),
        ),
        (
            "beta",
            &beta,
            "b1",
            "m.message",
            "@bob:beta.test",
            json!({"body": "hi from beta", "message_id": "b1"}),
        ),
        (
            "beta",
            &beta,
            "b2",
            "m.message.edit",
            "@bob:beta.test",
            json!({"message_id": "b1", "body": "hi (edited)"}),
        ),
        (
            "gamma",
            &gamma,
            "g1",
            "m.message",
            "@carol:gamma.test",
            json!({"body": "hi from gamma", "message_id": "g1"}),
        ),
        (
            "gamma",
            &gamma,
            "g2",
            "m.reaction.add",
            "@carol:gamma.test",
            json!({"message_id": "b1", "emoji": "👍"}),
        ),
        (
            "gamma",
            &gamma,
            "g3",
            "m.reaction.remove",
            "@carol:gamma.test",
            json!({"message_id": "b1", "emoji": "👍"}),
        ),
        (
            "alpha",
            &alpha,
            "a2",
            "m.message.delete",
            "@alice:alpha.test",
            json!({"message_id": "a1"}),
        ),
        (
            "beta",
            &beta,
            "b3",
            "m.message.delete",
            "@bob:beta.test",
            json!({"message_id": "b1"}),
        ),
    ];
    let mut sent: Vec<(&str, String)> = Vec::new(); // (origin, event id)
    for (origin, server, txn, event_type, sender, content) in script {
        sent.push((
            origin,
            submit(server, txn, event_type, sender, content).await,
        ));
    }

    let servers = [("alpha", &alpha), ("beta", &beta), ("gamma", &gamma)];
    for (origin, id) in &sent {
        for (name, s) in &servers {
            if name == origin {
                continue;
            }
            wait_for(
                &format!("{id} (from {origin}) at {name}"),
                Duration::from_secs(30),
                || async { has_event(s, id).await.then_some(()) },
            )
            .await;
        }
    }

    // gamma's events reached beta through alpha's relay.
    for (origin, id) in sent.iter().filter(|(o, _)| *o == "gamma") {
        let from: Option<String> = fe::table
            .filter(fe::event_id.eq(id))
            .select(fe::received_from)
            .first(&mut *beta.db().await)
            .await
            .unwrap();
        assert_eq!(
            from.as_deref(),
            Some("alpha.test"),
            "{origin} event {id} came via alpha"
        );
    }
    // beta's feed shows alpha's and gamma's events (and none of its own).
    let feed = send(
        beta.addr,
        "GET",
        "/_parafed/local/v1/feed?since=0&limit=100",
        &local("local-secret")[..1],
        b"",
    )
    .await
    .json();
    let ids: Vec<&str> = feed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["event_id"].as_str().unwrap())
        .collect();
    for (origin, id) in &sent {
        assert_eq!(
            ids.contains(&id.as_str()),
            *origin != "beta",
            "{id} from {origin} in beta's feed: {ids:?}"
        );
    }

    // Leave: gamma's user leaves through alpha; alpha's room no longer has gamma.
    let leave = local_post(
        &gamma,
        "/_parafed/local/v1/leave",
        json!({"room_id": ROOM, "user_id": "@carol:gamma.test"}),
    )
    .await;
    assert_eq!(leave["response"]["left"], true, "{leave}");
    let servers_in_room = parafed::store::rooms::joined_servers(&mut *alpha.db().await, ROOM)
        .await
        .unwrap();
    assert_eq!(servers_in_room, vec!["beta.test".to_owned()]);

    // Exactly once: each server holds each event once, and alpha delivered each of its
    // relayed rows once.
    for (_, s) in &servers {
        let n: i64 = fe::table
            .count()
            .get_result(&mut *s.db().await)
            .await
            .unwrap();
        assert_eq!(n as usize, sent.len(), "every event once in every store");
    }
    let undelivered: i64 = oq::table
        .filter(oq::status.ne("delivered"))
        .count()
        .get_result(&mut *alpha.db().await)
        .await
        .unwrap();
    assert_eq!(undelivered, 0);
}

pub(crate) async fn alpha_with_member(peer_name: &str, peer_url: &str) -> TestServer {
    alpha_with_member_cfg(peer_name, peer_url, FAST_WORKER_TOML).await
}

pub(crate) async fn alpha_with_member_cfg(
    peer_name: &str,
    peer_url: &str,
    worker_toml: &str,
) -> TestServer {
    let (la, _) = reserve_listener();
    let alpha = server_with(
        "alpha.test",
        la,
        vec![(peer_name.to_owned(), peer_url.to_owned())],
        worker_toml,
    )
    .await;
    let mut c = alpha.db().await;
    support::host_room(&mut c, ROOM, &[(&format!("@x:{peer_name}"), peer_name)]).await;
    alpha
}

pub(crate) async fn attempts_of(
    s: &TestServer,
    event_id: &str,
) -> Vec<(Option<i32>, chrono::DateTime<chrono::Utc>, i32)> {
    da::table
        .filter(da::event_id.eq(event_id))
        .order(da::attempt.asc())
        .select((da::status_code, da::attempted_at, da::attempt))
        .load(&mut *s.db().await)
        .await
        .unwrap()
}

pub(crate) async fn row_status(s: &TestServer, event_id: &str) -> Option<(String, Option<String>)> {
    oq::table
        .filter(oq::event_id.eq(event_id))
        .select((oq::status, oq::dead_reason))
        .first(&mut *s.db().await)
        .await
        .optional()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_back_off_with_growing_gaps() {
    let (lp, up) = reserve_listener();
    let peer = ScriptedPeer::start(lp, vec![503, 503, 503, 503], 202).await;
    // Base 600 ms: successive gaps differ by at least 200 ms (src/delivery/backoff.rs), far
    // more than scheduling noise on a loaded machine.
    let slow = FAST_WORKER_TOML.replace("backoff_base_ms = 200", "backoff_base_ms = 600");
    let alpha = alpha_with_member_cfg("beta.test", &up, &slow).await;
    let _w = TestWorker::start(&alpha);
    let id = submit(
        &alpha,
        "t1",
        "m.message",
        "@alice:alpha.test",
        json!({"body": "retry me"}),
    )
    .await;
    wait_for(
        "delivery after four 503s",
        Duration::from_secs(30),
        || async {
            (row_status(&alpha, &id).await.map(|r| r.0).as_deref() == Some("delivered"))
                .then_some(())
        },
    )
    .await;
    let a = attempts_of(&alpha, &id).await;
    let statuses: Vec<Option<i32>> = a.iter().map(|x| x.0).collect();
    assert_eq!(
        statuses,
        vec![Some(503), Some(503), Some(503), Some(503), Some(202)]
    );
    assert_eq!(
        a.iter().map(|x| x.2).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    let gaps: Vec<i64> = a
        .windows(2)
        .map(|w| (w[1].1 - w[0].1).num_milliseconds())
        .collect();
    assert!(gaps.windows(2).all(|g| g[1] > g[0]), "gaps grow: {gaps:?}");
    assert_eq!(peer.hits(), 5);
    let h = alpha.health("beta.test").await.unwrap();
    assert_eq!((h.state.as_str(), h.consecutive_failures), ("healthy", 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_dead_and_403s_show_on_the_destination() {
    // 400: one attempt, a dead row with the reason.
    let (lp, up) = reserve_listener();
    let _peer = ScriptedPeer::start(lp, vec![], 400).await;
    let alpha = alpha_with_member("beta.test", &up).await;
    let _w = TestWorker::start(&alpha);
    let id = submit(
        &alpha,
        "p1",
        "m.message",
        "@alice:alpha.test",
        json!({"body": "bad"}),
    )
    .await;
    wait_for("dead row", Duration::from_secs(30), || async {
        (row_status(&alpha, &id).await.map(|r| r.0).as_deref() == Some("dead")).then_some(())
    })
    .await;
    let (_, reason) = row_status(&alpha, &id).await.unwrap();
    assert!(reason.unwrap().starts_with("HTTP 400"), "reason kept");
    assert_eq!(attempts_of(&alpha, &id).await.len(), 1, "one attempt");

    // 403 to everything: the first few events are dead with the 403 kept; then the run of
    // 403s becomes the destination's state (backing off) and later events stay pending.
    let (lq, uq) = reserve_listener();
    let _peer403 = ScriptedPeer::start(lq, vec![], 403).await;
    let alpha2 = alpha_with_member("gamma.test", &uq).await;
    let _w2 = TestWorker::start(&alpha2);
    let mut outcomes = Vec::new();
    let mut h = None;
    for i in 0..10 {
        let id = submit(
            &alpha2,
            &format!("f{i}"),
            "m.message",
            "@alice:alpha.test",
            json!({"n": i}),
        )
        .await;
        // Wait until this event's row was attempted and settled.
        let status = wait_for("the 403 attempt", Duration::from_secs(30), || async {
            // Attempts are counted when a request starts; a settled answer is a final
            // status or an error noted on a row that stays pending.
            let (status, last_error): (String, Option<String>) = oq::table
                .filter(oq::event_id.eq(&id))
                .select((oq::status, oq::last_error))
                .first(&mut *alpha2.db().await)
                .await
                .optional()
                .unwrap()?;
            (status != "pending" || last_error.is_some()).then_some(status)
        })
        .await;
        outcomes.push(status);
        let now = alpha2.health("gamma.test").await.unwrap();
        if now.state == "backing_off" {
            h = Some(now);
            break;
        }
    }
    let h = h.unwrap_or_else(|| panic!("no backoff after ten 403s: {outcomes:?}"));
    assert!(h.consecutive_forbidden >= FORBIDDEN_RUN, "{h:?}");
    assert_eq!(h.last_status_code, Some(403));
    assert_eq!(
        outcomes.last().map(String::as_str),
        Some("pending"),
        "the event that hit the run is kept: {outcomes:?}"
    );
    assert!(
        outcomes[..outcomes.len() - 1].iter().all(|s| s == "dead"),
        "{outcomes:?}"
    );
    assert!(h.last_error.unwrap().contains("403"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_over_one_link() {
    const N: usize = 10_000;
    let (lb, ub) = reserve_listener();
    let (la, ua) = reserve_listener();
    let beta = server("beta.test", lb, vec![("alpha.test".into(), ua.clone())]).await;
    let alpha = {
        let a = server("alpha.test", la, vec![("beta.test".into(), ub.clone())]).await;
        let mut c = a.db().await;
        support::host_room(&mut c, ROOM, &[("@bob:beta.test", "beta.test")]).await;
        drop(c);
        a
    };
    let _wa = TestWorker::start(&alpha);
    let _wb = TestWorker::start(&beta);
    let started = std::time::Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let next = next.clone();
            let addr = alpha.addr;
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= N {
                        break;
                    }
                    let body = json!({"txn_id": format!("bulk{i}"), "room_id": ROOM, "event_type": "m.message",
                        "sender": "@alice:alpha.test", "content": {"n": i}}).to_string();
                    let r = send(addr, "POST", "/_parafed/local/v1/events", &local("local-secret"), body.as_bytes()).await;
                    assert_eq!(r.status, 202);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let count = |s: &TestServer| {
        let pool = s.app.pool.clone();
        async move {
            let n: i64 = fe::table
                .filter(fe::status.eq("accepted"))
                .count()
                .get_result(&mut *pool.get().await.unwrap())
                .await
                .unwrap();
            n as usize
        }
    };
    wait_for(
        "10 000 events at beta",
        Duration::from_secs(300),
        || async { (count(&beta).await == N).then_some(()) },
    )
    .await;
    eprintln!(
        "10 000 events alpha -> beta in {:?} (debug build)",
        started.elapsed()
    );
    let rows: i64 = fe::table
        .count()
        .get_result(&mut *beta.db().await)
        .await
        .unwrap();
    assert_eq!(rows as usize, N, "no duplicates at beta");
    let delivered: i64 = oq::table
        .filter(oq::status.eq("delivered"))
        .count()
        .get_result(&mut *alpha.db().await)
        .await
        .unwrap();
    assert_eq!(delivered as usize, N);
    // Every delivered row has its attempt recorded.
    let attempted: i64 = da::table
        .filter(da::status_code.eq(202))
        .select(diesel::dsl::count(da::outbound_id).aggregate_distinct())
        .first(&mut *alpha.db().await)
        .await
        .unwrap();
    assert_eq!(
        attempted as usize, N,
        "every delivery recorded as an attempt"
    );
}

/// The reconciler re-pushes a job only when Redis lost it: a backlog older than
/// `stale_after` is left alone (re-pushing it would lengthen the backlog, which makes more
/// of it stale: a spiral), and a deleted stream is rebuilt from Postgres, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_repushes_lost_jobs_and_leaves_a_backlog_alone() {
    // Long enough that an event's insert and its job's push (milliseconds apart) never
    // look further apart than this, even on a loaded machine.
    let stale_ms = 1000;
    let cfg = FAST_WORKER_TOML.replace(
        "stale_after_ms = 2000",
        &format!("stale_after_ms = {stale_ms}"),
    );
    // No worker runs: the fanout jobs of these events wait in the stream.
    let alpha = alpha_with_member_cfg("beta.test", "http://127.0.0.1:9", &cfg).await;
    let mut submitted = Vec::new();
    for i in 0..50 {
        let id = submit(
            &alpha,
            &format!("r{i}"),
            "m.message",
            "@a:alpha.test",
            json!({"n": i}),
        )
        .await;
        submitted.push(id);
    }
    let ctx = parafed_jobs::context::Ctx::new(alpha.app.clone(), "reconcile-test".into());
    let q = parafed::queue::QueueName::Fanout;
    assert_eq!(alpha.app.queue.len(q).await.unwrap(), 50);
    // Every job is now older than stale_after, but all of them are still queued.
    let newest = {
        let mut c = alpha.db().await;
        fe::table
            .select(diesel::dsl::max(fe::enqueued_at))
            .first::<Option<chrono::DateTime<chrono::Utc>>>(&mut *c)
            .await
            .unwrap()
            .unwrap()
    };
    wait_for(
        "the backlog to pass stale_after",
        Duration::from_secs(10),
        || async {
            (chrono::Utc::now() - newest > chrono::Duration::milliseconds(stale_ms + 50))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        parafed_jobs::scheduler::reconcile(&ctx).await.unwrap(),
        (0, 0)
    );
    assert_eq!(alpha.app.queue.len(q).await.unwrap(), 50);

    // Redis loses the stream: every job is re-pushed, once.
    let mut r = alpha.app.queue.connection();
    let _: () = redis::cmd("DEL")
        .arg(alpha.app.queue.keys().queue(q))
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(
        parafed_jobs::scheduler::reconcile(&ctx).await.unwrap(),
        (0, 50)
    );
    assert_eq!(
        parafed_jobs::scheduler::reconcile(&ctx).await.unwrap(),
        (0, 0)
    );
    // Re-pushed as one batch, in storage order: every event once.
    assert_eq!(alpha.app.queue.len(q).await.unwrap(), 1);
    let queued = alpha.queued_events(q).await;
    assert_eq!(queued.len(), 50);
    assert_eq!(
        queued.iter().collect::<std::collections::HashSet<_>>(),
        submitted.iter().collect::<std::collections::HashSet<_>>()
    );

    // A worker then fans every event out, once: to beta (new to us, and nothing listens
    // there) a row for the first event of the batch — its probe — and a deferral for
    // the others (docs/architecture.md, "Deferred fan-out").
    let mut worker = TestWorker::start(&alpha);
    wait_for(
        "every event fanned out",
        Duration::from_secs(60),
        || async {
            let mut c = alpha.db().await;
            let left: i64 = fe::table
                .filter(fe::fanned_out_at.is_null())
                .count()
                .get_result(&mut *c)
                .await
                .unwrap();
            (left == 0).then_some(())
        },
    )
    .await;
    worker.stop().await;
    let mut c = alpha.db().await;
    let rows: std::collections::HashSet<String> = oq::table
        .filter(oq::destination.eq("beta.test"))
        .select(oq::event_id)
        .load::<String>(&mut *c)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let from: Option<i64> = parafed::store::schema::outbound_deferrals::table
        .filter(parafed::store::schema::outbound_deferrals::destination.eq("beta.test"))
        .select(parafed::store::schema::outbound_deferrals::from_seq)
        .first(&mut *c)
        .await
        .optional()
        .unwrap();
    let seqs: Vec<(String, i64)> = fe::table
        .filter(fe::event_id.eq_any(&submitted))
        .select((fe::event_id, fe::seq))
        .load(&mut *c)
        .await
        .unwrap();
    assert_eq!(seqs.len(), 50);
    for (id, seq) in &seqs {
        let by_row = rows.contains(id);
        let deferred = from.is_some_and(|f| *seq > f);
        assert!(
            by_row != deferred,
            "{id} must be owed exactly once: row {by_row}, deferred {deferred}"
        );
    }
    assert!(
        rows.len() < 50,
        "a deferral, not a row per event: {} rows",
        rows.len()
    );
}

/// Sets (or with `None` lifts) the operator's decision about `peer`, as the admin
/// commands will.
async fn set_trust(s: &TestServer, peer: &str, state: Option<&str>) {
    use diesel_async::SimpleAsyncConnection;
    let sql = match state {
        Some(st) => format!(
            "INSERT INTO peer_trust (server_name, state, reason) VALUES ('{peer}', '{st}', 'test') \
             ON CONFLICT (server_name) DO UPDATE SET state = EXCLUDED.state"
        ),
        None => format!("DELETE FROM peer_trust WHERE server_name = '{peer}'"),
    };
    s.db().await.batch_execute(&sql).await.unwrap();
    s.app.trust.invalidate();
}

/// Nothing is sent to a quarantined peer (its rows wait, and go once it is released);
/// a blocked peer's waiting rows are cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_peers_get_nothing_until_released_and_blocked_ones_are_cancelled() {
    let (lp, up) = reserve_listener();
    let peer = ScriptedPeer::start(lp, vec![], 202).await;
    let alpha = alpha_with_member("beta.test", &up).await;
    set_trust(&alpha, "beta.test", Some("quarantine")).await;
    let _w = TestWorker::start(&alpha);
    let held = submit(
        &alpha,
        "q1",
        "m.message",
        "@alice:alpha.test",
        json!({"body": "held"}),
    )
    .await;
    let health = wait_for(
        "the destination to be held",
        Duration::from_secs(30),
        || async {
            let h = alpha.health("beta.test").await?;
            h.paused_reason
                .as_deref()?
                .contains("quarantined")
                .then_some(h)
        },
    )
    .await;
    assert_eq!(health.consecutive_failures, 0, "holding is not a failure");
    assert_eq!(row_status(&alpha, &held).await.unwrap().0, "pending");
    assert_eq!(peer.hits(), 0);

    // Released: the waiting row goes at the next look.
    set_trust(&alpha, "beta.test", None).await;
    wait_for(
        "the held row delivered and the hold lifted",
        Duration::from_secs(30),
        || async {
            // Delivered, and the hold lifted (so the next wait cannot see this one's).
            let lifted = alpha.health("beta.test").await?.paused_reason.is_none();
            (lifted && row_status(&alpha, &held).await?.0 == "delivered").then_some(())
        },
    )
    .await;
    assert_eq!(peer.hits(), 1);

    // Quarantined again, a row waits; then blocked, it is cancelled, never sent.
    set_trust(&alpha, "beta.test", Some("quarantine")).await;
    let second = submit(
        &alpha,
        "q2",
        "m.message",
        "@alice:alpha.test",
        json!({"body": "never"}),
    )
    .await;
    wait_for("the second row held", Duration::from_secs(30), || async {
        let h = alpha.health("beta.test").await?;
        (h.paused_reason.is_some() && row_status(&alpha, &second).await?.0 == "pending")
            .then_some(())
    })
    .await;
    set_trust(&alpha, "beta.test", Some("block")).await;
    let (status, reason) = wait_for(
        "the waiting row cancelled",
        Duration::from_secs(30),
        || async {
            row_status(&alpha, &second)
                .await
                .filter(|(s, _)| s == "cancelled")
        },
    )
    .await;
    assert_eq!(status, "cancelled");
    assert!(
        reason.unwrap_or_default().contains("blocked"),
        "the reason is kept"
    );
    assert_eq!(peer.hits(), 1);
}
