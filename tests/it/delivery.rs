//! The delivery core against peers that misbehave the way real ones do: slow and
//! jittery answers (order of dependants), `Retry-After` as an HTTP date, redirects, a
//! worker killed mid-request, a Redis restart that leaves every connection stale, and a
//! peer that cannot be reached for a while (deferred fan-out).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use parafed::store::schema::{
    delivery_attempts as da, destination_health as dh, outbound_deferrals as od,
    outbound_queue as oq,
};
use serde_json::json;

use crate::pipeline::{alpha_with_member_cfg, row_status, submit};
use crate::support;
use support::app::{
    event_id_of, reserve_listener, FakeAnswer, FakeRequest, FnPeer, TestWorker, WorkerProcess,
    FAST_WORKER_TOML,
};
use support::wait_for;

fn accepted(r: &FakeRequest) -> FakeAnswer {
    FakeAnswer::json(
        202,
        json!({"event_id": event_id_of(&r.body), "inserted": true}),
    )
}

/// Waits until the event's row is delivered.
async fn delivered(alpha: &support::app::TestServer, id: &str, what: &str, secs: u64) {
    wait_for(what, Duration::from_secs(secs), || async {
        (row_status(alpha, id).await.map(|r| r.0).as_deref() == Some("delivered")).then_some(())
    })
    .await;
}

/// Every attempt of an event: (attempt number, status, error class, started at).
async fn attempts(
    s: &support::app::TestServer,
    event_id: &str,
) -> Vec<(
    i32,
    Option<i32>,
    Option<String>,
    chrono::DateTime<chrono::Utc>,
)> {
    da::table
        .filter(da::event_id.eq(event_id))
        .order(da::id.asc())
        .select((
            da::attempt,
            da::status_code,
            da::error_class,
            da::attempted_at,
        ))
        .load(&mut *s.db().await)
        .await
        .unwrap()
}

/// Where beta's deferrals start (`from_seq`), one per room.
async fn deferral_starts(alpha: &support::app::TestServer) -> Vec<i64> {
    od::table
        .filter(od::destination.eq("beta.test"))
        .select(od::from_seq)
        .load(&mut *alpha.db().await)
        .await
        .unwrap()
}

/// What the ordering peer saw.
#[derive(Default)]
struct Seen {
    /// Event ids in the order their requests arrived.
    arrived: Vec<String>,
    /// `message_id`s of messages already answered.
    answered_messages: HashSet<String>,
    /// Requests that arrived before the message they refer to was answered.
    early: Vec<String>,
    /// Event ids per `message_id`, in arrival order.
    per_message: HashMap<String, Vec<String>>,
    in_flight: u64,
    max_in_flight: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependants_arrive_after_what_they_refer_to_while_requests_overlap() {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (lp, up) = reserve_listener();
    let s = seen.clone();
    let _peer = FnPeer::start(lp, move |r: FakeRequest| {
        let seen = s.clone();
        async move {
            if !r.path.ends_with("/event") {
                return FakeAnswer::empty(404);
            }
            let env: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            let id = env["event_id"].as_str().unwrap_or_default().to_owned();
            let kind = env["event_type"].as_str().unwrap_or_default().to_owned();
            let message = env["content"]["message_id"].as_str().map(str::to_owned);
            {
                let mut s = seen.lock().unwrap();
                s.arrived.push(id.clone());
                s.in_flight += 1;
                s.max_in_flight = s.max_in_flight.max(s.in_flight);
                if let Some(m) = &message {
                    if kind != "m.message" && !s.answered_messages.contains(m) {
                        s.early.push(id.clone());
                    }
                    s.per_message.entry(m.clone()).or_default().push(id.clone());
                }
            }
            // Random delays, 0–50 ms: answers overtake each other.
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 51)).await;
            {
                let mut s = seen.lock().unwrap();
                s.in_flight -= 1;
                if kind == "m.message" {
                    if let Some(m) = message {
                        s.answered_messages.insert(m);
                    }
                }
            }
            accepted(&r)
        }
    })
    .await;
    let alpha = alpha_with_member_cfg("beta.test", &up, FAST_WORKER_TOML).await;
    let _w = TestWorker::start(&alpha);

    // 200 events of one room: messages, and a third edits, reactions and deletes of
    // earlier messages (a deleted message gets nothing more). Seeded, so a failure
    // reproduces.
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut live: Vec<String> = Vec::new();
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    let mut dependants = 0;
    for i in 0..200 {
        let (kind, message) = if i % 3 != 2 || live.is_empty() {
            let m = format!("m{i}");
            live.push(m.clone());
            ("m.message", m)
        } else {
            dependants += 1;
            let m = live[next(live.len() as u64) as usize].clone();
            let kind = [
                "m.message.edit",
                "m.reaction.add",
                "m.reaction.remove",
                "m.message.delete",
            ][next(4) as usize];
            if kind == "m.message.delete" {
                live.retain(|x| *x != m);
            }
            (kind, m)
        };
        let id = submit(
            &alpha,
            &format!("o{i}"),
            kind,
            "@alice:alpha.test",
            json!({"message_id": message, "channel_id": "1", "body": format!("#{i}")}),
        )
        .await;
        expected.entry(message).or_default().push(id);
    }
    assert!(dependants >= 60, "{dependants} dependants");

    let s = seen.clone();
    wait_for(
        "all 200 events at the peer",
        Duration::from_secs(120),
        || async { (s.lock().unwrap().arrived.len() >= 200).then_some(()) },
    )
    .await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.arrived.len(), 200, "each event once");
    assert!(
        seen.early.is_empty(),
        "sent before their message was delivered: {:?}",
        seen.early
    );
    for (m, ids) in &expected {
        assert_eq!(
            seen.per_message.get(m),
            Some(ids),
            "events of message {m} out of order"
        );
    }
    assert!(
        seen.max_in_flight > 1,
        "unrelated events should overlap; at most {} in flight",
        seen.max_in_flight
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_date_retry_after_is_a_floor_on_the_next_attempt() {
    let not_before: Arc<Mutex<Option<SystemTime>>> = Arc::default();
    let hits = Arc::new(AtomicU64::new(0));
    let (lp, up) = reserve_listener();
    let (nb, h) = (not_before.clone(), hits.clone());
    let _peer = FnPeer::start(lp, move |r: FakeRequest| {
        let (nb, h) = (nb.clone(), h.clone());
        async move {
            if h.fetch_add(1, Ordering::SeqCst) > 0 {
                return accepted(&r);
            }
            // 20 s ahead, in whole seconds (an HTTP-date has no fractions).
            let at = SystemTime::now() + Duration::from_secs(20);
            let at = SystemTime::UNIX_EPOCH
                + Duration::from_secs(at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs());
            *nb.lock().unwrap() = Some(at);
            FakeAnswer {
                status: 429,
                headers: vec![("retry-after".into(), httpdate::fmt_http_date(at))],
                body: json!({"code": "RATE_LIMITED"}).to_string(),
            }
        }
    })
    .await;
    // A backoff cap above 20 s, so the cap does not shorten the peer's floor.
    let cfg = FAST_WORKER_TOML.replace("backoff_cap_ms = 5000", "backoff_cap_ms = 60000");
    let alpha = alpha_with_member_cfg("beta.test", &up, &cfg).await;
    let _w = TestWorker::start(&alpha);
    let id = submit(
        &alpha,
        "ra",
        "m.message",
        "@alice:alpha.test",
        json!({"body": "x"}),
    )
    .await;
    delivered(&alpha, &id, "delivery after the 429", 60).await;
    let a = attempts(&alpha, &id).await;
    assert_eq!(
        a.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
        vec![(1, Some(429)), (2, Some(202))]
    );
    let floor: chrono::DateTime<chrono::Utc> = not_before.lock().unwrap().unwrap().into();
    assert!(
        a[1].3 >= floor,
        "second attempt at {} is before the Retry-After date {floor}",
        a[1].3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_back_the_destination_off_and_never_kill_the_event() {
    let hits = Arc::new(AtomicU64::new(0));
    let (lp, up) = reserve_listener();
    let h = hits.clone();
    let _peer = FnPeer::start(lp, move |r: FakeRequest| {
        let h = h.clone();
        async move {
            let status = match h.fetch_add(1, Ordering::SeqCst) {
                0 => 307,
                1 => 308,
                2 => 301,
                _ => return accepted(&r),
            };
            FakeAnswer {
                status,
                headers: vec![("location".into(), "http://127.0.0.1:9/elsewhere".into())],
                body: String::new(),
            }
        }
    })
    .await;
    let alpha = alpha_with_member_cfg("beta.test", &up, FAST_WORKER_TOML).await;
    let _w = TestWorker::start(&alpha);
    let id = submit(
        &alpha,
        "rd",
        "m.message",
        "@alice:alpha.test",
        json!({"body": "x"}),
    )
    .await;
    // The first redirect shows on the destination, like a run of 403s.
    let h = wait_for(
        "the redirect on the destination",
        Duration::from_secs(30),
        || async {
            alpha
                .health("beta.test")
                .await
                .filter(|h| h.last_status_code == Some(307))
        },
    )
    .await;
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("redirect")),
        "{h:?}"
    );
    delivered(&alpha, &id, "delivery after three redirects", 60).await;
    let a = attempts(&alpha, &id).await;
    assert_eq!(
        a.iter().map(|x| (x.1, x.2.as_deref())).collect::<Vec<_>>(),
        vec![
            (Some(307), Some("http_3xx")),
            (Some(308), Some("http_3xx")),
            (Some(301), Some("http_3xx")),
            (Some(202), None)
        ]
    );
    assert_eq!(AtomicU64::load(&hits, Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_request_leaves_that_request_on_record() {
    let hits = Arc::new(AtomicU64::new(0));
    let (lp, up) = reserve_listener();
    let h = hits.clone();
    let _peer = FnPeer::start(lp, move |r: FakeRequest| {
        let h = h.clone();
        async move {
            if h.fetch_add(1, Ordering::SeqCst) == 0 {
                // Never answered in time: the worker is killed while it waits.
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            accepted(&r)
        }
    })
    .await;
    // The drain lease lasts max(job timeout, 2 × request timeout + 1 s) = 11 s.
    let alpha = alpha_with_member_cfg("beta.test", &up, FAST_WORKER_TOML).await;
    let mut first = WorkerProcess::start(&alpha);
    let id = submit(
        &alpha,
        "k9",
        "m.message",
        "@alice:alpha.test",
        json!({"body": "x"}),
    )
    .await;
    let h = hits.clone();
    wait_for(
        "the first request at the peer",
        Duration::from_secs(30),
        || async { (AtomicU64::load(&h, Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;
    first.kill9();
    let _second = WorkerProcess::start(&alpha);
    delivered(&alpha, &id, "delivery by the second worker", 60).await;
    let a = attempts(&alpha, &id).await;
    assert_eq!(
        a.len() as u64,
        AtomicU64::load(&hits, Ordering::SeqCst),
        "one attempt row per request the peer received: {a:?}"
    );
    assert_eq!(
        a.iter()
            .map(|x| (x.0, x.1, x.2.as_deref()))
            .collect::<Vec<_>>(),
        vec![(1, None, Some("interrupted")), (2, Some(202), None)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_empty_redis_restart_events_go_out_without_the_reconciler() {
    let received: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (lp, up) = reserve_listener();
    let rc = received.clone();
    let _peer = FnPeer::start(lp, move |r: FakeRequest| {
        let rc = rc.clone();
        async move {
            rc.lock().unwrap().insert(event_id_of(&r.body));
            accepted(&r)
        }
    })
    .await;
    // The reconciler runs once at start, then not for an hour: anything that arrives
    // after the restart was pushed, not re-pushed.
    let cfg = FAST_WORKER_TOML.replace(
        "reconcile_interval_ms = 200",
        "reconcile_interval_ms = 3600000",
    );
    let mut alpha = alpha_with_member_cfg("beta.test", &up, &cfg).await;
    // The worker in a process of its own: the ingress's Redis connection is used by the
    // ingress alone, as in a fleet, so nothing else notices the restart first.
    let _w = WorkerProcess::start(&alpha);
    let first = submit(
        &alpha,
        "r1",
        "m.message",
        "@alice:alpha.test",
        json!({"body": "1"}),
    )
    .await;
    let rc = received.clone();
    wait_for("the first event", Duration::from_secs(30), || async {
        rc.lock().unwrap().contains(&first).then_some(())
    })
    .await;
    alpha.redis.restart_empty().await.unwrap();
    let second = submit(
        &alpha,
        "r2",
        "m.message",
        "@alice:alpha.test",
        json!({"body": "2"}),
    )
    .await;
    let rc = received.clone();
    wait_for(
        "the event submitted after the restart",
        Duration::from_secs(60),
        || async { rc.lock().unwrap().contains(&second).then_some(()) },
    )
    .await;
}

/// A worker process whose database pool has a single connection still delivers: no
/// step of a drain holds a connection while it waits for a second one. (A drain read the
/// signing key — which takes a connection when the worker has not cached it yet — while
/// holding one: with every connection held that way, as under load with many drains,
/// the pool was empty until its 10 s wait timeout, the jobs failed and were retried
/// only after `job_timeout_ms`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_one_database_connection_delivers() {
    let (lp, up) = reserve_listener();
    let _peer = FnPeer::start(lp, |r: FakeRequest| async move { accepted(&r) }).await;
    let alpha = alpha_with_member_cfg("beta.test", &up, FAST_WORKER_TOML).await;
    let _w = WorkerProcess::start_with(&alpha, |cfg| cfg.database.pool_size = 1);
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = submit(
            &alpha,
            &format!("one{i}"),
            "m.message",
            "@alice:alpha.test",
            json!({"body": i}),
        )
        .await;
        ids.push(id);
    }
    for id in &ids {
        delivered(&alpha, id, "delivery by a one-connection worker", 60).await;
        let a = attempts(&alpha, id).await;
        assert_eq!(
            a.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
            vec![(1, Some(202))],
            "one attempt each, answered"
        );
    }
}

/// An unreachable peer (nothing listens: connection refused) gets one row — its probe —
/// and then a deferral instead of a row per event; once it listens again, its drain
/// writes the owed rows and it receives every event exactly once, dependants after what
/// they refer to and each message's events in storage order. Caught up, the deferral
/// ends, and a later event reaches it through its own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_is_owed_by_a_deferral_and_gets_everything_in_order_once_back() {
    let (lp, up) = reserve_listener();
    let addr = lp.local_addr().unwrap();
    drop(lp); // refused until the peer starts below
    let alpha = alpha_with_member_cfg("beta.test", &up, FAST_WORKER_TOML).await;
    let _w = TestWorker::start(&alpha);
    let count = |table: &'static str| {
        let alpha = &alpha;
        async move {
            let mut c = alpha.db().await;
            match table {
                "rows" => oq::table
                    .filter(oq::destination.eq("beta.test"))
                    .count()
                    .get_result::<i64>(&mut *c)
                    .await
                    .unwrap(),
                _ => od::table
                    .filter(od::destination.eq("beta.test"))
                    .count()
                    .get_result::<i64>(&mut *c)
                    .await
                    .unwrap(),
            }
        }
    };

    // The probe: a row, refused, and the destination backs off without an HTTP answer.
    let first = submit(
        &alpha,
        "d0",
        "m.message",
        "@alice:alpha.test",
        json!({"message_id": "m0", "channel_id": "1", "body": "first"}),
    )
    .await;
    wait_for(
        "beta backs off, unreachable",
        Duration::from_secs(30),
        || async {
            let (state, code): (String, Option<i32>) = dh::table
                .filter(dh::destination.eq("beta.test"))
                .select((dh::state, dh::last_status_code))
                .first(&mut *alpha.db().await)
                .await
                .ok()?;
            (state == "backing_off" && code.is_none()).then_some(())
        },
    )
    .await;

    // While it is unreachable: messages and their edits, reactions and a delete.
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    expected.insert("m0".into(), vec![first.clone()]);
    let mut all = vec![first];
    for i in 1..=40 {
        let m = format!("m{}", i / 4);
        let kind = match i % 4 {
            0 => "m.message",
            1 => "m.message.edit",
            2 => "m.reaction.add",
            _ => "m.message.edit",
        };
        let (kind, m) = if i < 4 {
            ("m.message.edit", "m0".to_owned())
        } else {
            (kind, m)
        };
        let id = submit(
            &alpha,
            &format!("d{i}"),
            kind,
            "@alice:alpha.test",
            json!({"message_id": m, "channel_id": "1", "body": format!("#{i}")}),
        )
        .await;
        expected.entry(m).or_default().push(id.clone());
        all.push(id);
    }
    wait_for(
        "every event fanned out",
        Duration::from_secs(30),
        || async {
            use parafed::store::schema::federation_events as fe;
            let n: i64 = fe::table
                .filter(fe::event_id.eq_any(&all))
                .filter(fe::fanned_out_at.is_not_null())
                .count()
                .get_result(&mut *alpha.db().await)
                .await
                .unwrap();
            (n == all.len() as i64).then_some(())
        },
    )
    .await;
    assert_eq!(count("deferrals").await, 1, "one deferral for the room");
    // The probe's row only: a probe writes a deferral's rows only when nothing else
    // waits, and the first row waits.
    let rows: Vec<(String, i64, String)> = oq::table
        .filter(oq::destination.eq("beta.test"))
        .select((oq::event_id, oq::event_seq, oq::status))
        .order(oq::event_seq)
        .load(&mut *alpha.db().await)
        .await
        .unwrap();
    let deferral: Vec<(i64, Option<i64>)> = od::table
        .filter(od::destination.eq("beta.test"))
        .select((od::from_seq, od::until_seq))
        .load(&mut *alpha.db().await)
        .await
        .unwrap();
    let submitted: Vec<(usize, i64)> = {
        use parafed::store::schema::federation_events as fe;
        let seqs: HashMap<String, i64> = fe::table
            .filter(fe::event_id.eq_any(&all))
            .select((fe::event_id, fe::seq))
            .load::<(String, i64)>(&mut *alpha.db().await)
            .await
            .unwrap()
            .into_iter()
            .collect();
        all.iter()
            .enumerate()
            .map(|(i, id)| (i, seqs[id]))
            .collect()
    };
    let named: Vec<(Option<usize>, i64, String)> = rows
        .into_iter()
        .map(|(id, seq, status)| (all.iter().position(|a| *a == id), seq, status))
        .collect();
    assert_eq!(
        named.len(),
        1,
        "rows written for an unreachable peer (submitted index, seq, status): {named:?}; \
         deferral (from, until): {deferral:?}; submitted (index, seq): {submitted:?}"
    );

    // Back: it listens again, on the same address, and checks the order.
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s = seen.clone();
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let _peer = FnPeer::start(listener, move |r: FakeRequest| {
        let seen = s.clone();
        async move {
            if !r.path.ends_with("/event") {
                return FakeAnswer::empty(404);
            }
            let env: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            let id = env["event_id"].as_str().unwrap_or_default().to_owned();
            let message = env["content"]["message_id"].as_str().map(str::to_owned);
            let mut s = seen.lock().unwrap();
            s.arrived.push(id.clone());
            if let Some(m) = message {
                s.per_message.entry(m).or_default().push(id);
            }
            accepted(&r)
        }
    })
    .await;
    let s = seen.clone();
    let n = all.len();
    wait_for(
        "every owed event at beta",
        Duration::from_secs(60),
        || async { (s.lock().unwrap().arrived.len() >= n).then_some(()) },
    )
    .await;
    // One more, after it is back: its own row, from fan-out (checked below).
    let later = submit(
        &alpha,
        "d-later",
        "m.message",
        "@alice:alpha.test",
        json!({"message_id": "later", "channel_id": "1", "body": "later"}),
    )
    .await;
    wait_for(
        "the later event at beta",
        Duration::from_secs(30),
        || async { s.lock().unwrap().arrived.contains(&later).then_some(()) },
    )
    .await;
    // Caught up while answering, the deferral ended: later events get rows again.
    assert_eq!(
        count("deferrals").await,
        0,
        "the deferral ended once caught up"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.arrived.len(), n + 1, "each event once");
    let distinct: HashSet<&String> = seen.arrived.iter().collect();
    assert_eq!(distinct.len(), n + 1, "no duplicates");
    for (m, ids) in &expected {
        assert_eq!(
            seen.per_message.get(m),
            Some(ids),
            "events of message {m} out of order"
        );
    }
}

/// Fan-outs run concurrently and finish in any order: an earlier event fanned out after
/// a later one started a deferral for an unreachable peer gets no row either — the
/// deferral starts before it instead (`delivery::deferral::fan_out`) — and the peer's
/// drain later writes every row, in storage order. (Before, each late event got a row
/// at once: with a thousand dead servers in a room, a thousand rows per late event.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_event_fanned_out_late_moves_an_unreachable_peers_deferral_back() {
    use diesel_async::SimpleAsyncConnection;
    use parafed::store::schema::federation_events as fe;
    let (lp, up) = reserve_listener();
    // Refused. No worker: the fan-out jobs wait in the stream and are run below, out
    // of order.
    drop(lp);
    let alpha = alpha_with_member_cfg("beta.test", &up, FAST_WORKER_TOML).await;
    // beta failed without an HTTP answer and backs off for an hour: unreachable.
    alpha
        .db()
        .await
        .batch_execute(
            "INSERT INTO destination_health \
               (destination, state, consecutive_failures, backoff_until, last_error_at, last_error) \
             VALUES ('beta.test', 'backing_off', 1, now() + interval '1 hour', now(), \
                     'connecting failed: connection refused')",
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            submit(
                &alpha,
                &format!("late{i}"),
                "m.message",
                "@alice:alpha.test",
                json!({"message_id": format!("late{i}"), "channel_id": "1", "body": i}),
            )
            .await,
        );
    }
    let seqs: Vec<i64> = fe::table
        .filter(fe::event_id.eq_any(&ids))
        .order(fe::seq)
        .select(fe::seq)
        .load(&mut *alpha.db().await)
        .await
        .unwrap();
    let ctx = parafed_jobs::context::Ctx::new(alpha.app.clone(), "late-fanout-test".into());
    // The last event first, then the others, latest to earliest.
    for id in ids.iter().rev() {
        let job = parafed::queue::jobs::FanoutJob {
            event_ids: vec![id.clone()],
        };
        parafed_jobs::fanout::run(&ctx, &job).await.unwrap();
    }
    async fn rows(c: &mut diesel_async::AsyncPgConnection) -> QueryResult<Vec<String>> {
        oq::table
            .filter(oq::destination.eq("beta.test"))
            .order(oq::event_seq)
            .select(oq::event_id)
            .load::<String>(c)
            .await
    }
    assert_eq!(
        rows(&mut *alpha.db().await).await.unwrap(),
        Vec::<String>::new(),
        "no rows for an unreachable peer"
    );
    assert_eq!(
        deferral_starts(&alpha).await,
        vec![seqs[0] - 1],
        "one deferral, from before the first event"
    );
    // The drain's backfill (as the admin's) writes them all, in storage order.
    let mut c = alpha.db().await;
    let written = parafed::backfill::all(&mut c, "beta.test", Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(written, 3);
    assert_eq!(rows(&mut c).await.unwrap(), ids);
}

/// Peers new to us are probed together (`jobs/src/probe.rs`): in a room with a healthy
/// peer and eight that refuse connections, each refusing peer gets exactly one request
/// — for the first event, its attempt closed with the connection error — and backs off
/// without an HTTP status; the healthy peer gets every event; the round gives every
/// lease back and leaves no attempt open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_peers_are_probed_together_and_each_answer_is_recorded_once() {
    const DEAD: usize = 8;
    let (lp, up) = reserve_listener();
    let _peer = FnPeer::start(lp, |r: FakeRequest| async move { accepted(&r) }).await;
    let mut peers = vec![("beta.test".to_owned(), up)];
    for i in 0..DEAD {
        // Nothing listens on port 1: the connection is refused.
        peers.push((
            format!("dead{i}.test"),
            format!("http://127.0.0.1:1/dead{i}"),
        ));
    }
    // A long first backoff step: each refusing peer is probed once in this test.
    let toml = FAST_WORKER_TOML
        .replace("backoff_base_ms = 200", "backoff_base_ms = 600000")
        .replace("backoff_cap_ms = 5000", "backoff_cap_ms = 600000");
    let (la, _) = reserve_listener();
    let alpha = crate::pipeline::server_with("alpha.test", la, peers.clone(), &toml).await;
    let members: Vec<(String, String)> = peers
        .iter()
        .map(|(name, _)| (format!("@x:{name}"), name.clone()))
        .collect();
    let members: Vec<(&str, &str)> = members
        .iter()
        .map(|(u, s)| (u.as_str(), s.as_str()))
        .collect();
    support::host_room(&mut *alpha.db().await, crate::pipeline::ROOM, &members).await;
    let _w = TestWorker::start(&alpha);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            submit(
                &alpha,
                &format!("p{i}"),
                "m.message",
                "@alice:alpha.test",
                json!({"message_id": format!("m{i}"), "channel_id": "1", "body": "hi"}),
            )
            .await,
        );
    }
    wait_for(
        "every event delivered to the healthy peer",
        Duration::from_secs(60),
        || async {
            let n: i64 = oq::table
                .filter(oq::destination.eq("beta.test"))
                .filter(oq::event_id.eq_any(&ids))
                .filter(oq::status.eq("delivered"))
                .count()
                .get_result(&mut *alpha.db().await)
                .await
                .unwrap();
            (n == ids.len() as i64).then_some(())
        },
    )
    .await;
    let dead: Vec<String> = (0..DEAD).map(|i| format!("dead{i}.test")).collect();
    wait_for(
        "every refusing peer backed off and given back",
        Duration::from_secs(60),
        || async {
            let n: i64 = dh::table
                .filter(dh::destination.eq_any(&dead))
                .filter(dh::state.eq("backing_off"))
                .filter(dh::last_status_code.is_null())
                .filter(dh::lease_owner.is_null())
                .count()
                .get_result(&mut *alpha.db().await)
                .await
                .unwrap();
            (n == DEAD as i64).then_some(())
        },
    )
    .await;
    let mut c = alpha.db().await;
    /// An attempt: destination, number, status, error class, finished.
    type Tried = (String, i32, Option<i32>, Option<String>, bool);
    let tried: Vec<Tried> = da::table
        .filter(da::destination.eq_any(&dead))
        .select((
            da::destination,
            da::attempt,
            da::status_code,
            da::error_class,
            da::finished_at.is_not_null(),
        ))
        .order(da::destination.asc())
        .load(&mut *c)
        .await
        .unwrap();
    assert_eq!(
        tried.len(),
        DEAD,
        "one request per refusing peer: {tried:?}"
    );
    for (dest, attempt, status, class, finished) in &tried {
        assert_eq!(*attempt, 1, "{dest}");
        assert_eq!(*status, None, "{dest}: no HTTP answer");
        assert!(class.is_some(), "{dest}: the connection error is recorded");
        assert!(*finished, "{dest}: the attempt is closed");
    }
    let failures: Vec<i32> = dh::table
        .filter(dh::destination.eq_any(&dead))
        .select(dh::consecutive_failures)
        .load(&mut *c)
        .await
        .unwrap();
    assert_eq!(failures, vec![1; DEAD], "one backoff step each");
    let open: i64 = da::table
        .filter(da::finished_at.is_null())
        .count()
        .get_result(&mut *c)
        .await
        .unwrap();
    assert_eq!(open, 0, "no attempt left open");
}

/// The window of the mid-round tests ([`MidRound`]).
const MID_ROUND_WINDOW: usize = 4;

/// What a change made while a round of a backlog is out needs: beta's peer, which
/// records every event it gets and, once armed, makes a change on alpha before it
/// answers the first request of the drain (`on_first`); alpha with a window of
/// [`MID_ROUND_WINDOW`] and a worker; and a backlog of three windows for beta, fanned
/// out while beta was paused after one event reached it.
struct MidRound {
    alpha: support::app::TestServer,
    arrived: Arc<Mutex<Vec<String>>>,
    armed: Arc<std::sync::atomic::AtomicBool>,
    backlog: Vec<String>,
    _peer: FnPeer,
    _worker: TestWorker,
}

type OnFirst =
    Arc<dyn Fn(Arc<parafed::app::App>) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

impl MidRound {
    /// `federation_toml`: lines for alpha's `[federation]` table.
    async fn start(federation_toml: &str, on_first: OnFirst) -> MidRound {
        use parafed::admin::destinations::{act, Action};
        let arrived: Arc<Mutex<Vec<String>>> = Arc::default();
        let app_cell: Arc<std::sync::OnceLock<Arc<parafed::app::App>>> = Arc::default();
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (lp, up) = reserve_listener();
        let (a, cell, arm) = (arrived.clone(), app_cell.clone(), armed.clone());
        let peer = FnPeer::start(lp, move |r: FakeRequest| {
            let (arrived, cell, arm, on_first) =
                (a.clone(), cell.clone(), arm.clone(), on_first.clone());
            async move {
                if !r.path.ends_with("/event") {
                    return FakeAnswer::empty(404);
                }
                arrived.lock().unwrap().push(event_id_of(&r.body));
                if arm.swap(false, Ordering::SeqCst) {
                    on_first(cell.get().expect("alpha started").clone()).await;
                }
                accepted(&r)
            }
        })
        .await;
        let toml = format!("{federation_toml}{FAST_WORKER_TOML}window = {MID_ROUND_WINDOW}\n");
        let alpha = alpha_with_member_cfg("beta.test", &up, &toml).await;
        let _ = app_cell.set(alpha.app.clone());
        let worker = TestWorker::start(&alpha);

        // beta is reached once, then paused while a backlog of three windows is fanned out.
        let body =
            |i: usize| json!({"message_id": format!("m{i}"), "channel_id": "1", "body": "x"});
        let first = submit(&alpha, "p0", "m.message", "@alice:alpha.test", body(0)).await;
        delivered(&alpha, &first, "the first event at beta", 60).await;
        act(&alpha.app, "beta.test", Action::Pause, None)
            .await
            .unwrap();
        let mut backlog = Vec::new();
        for i in 1..=3 * MID_ROUND_WINDOW {
            backlog.push(
                submit(
                    &alpha,
                    &format!("p{i}"),
                    "m.message",
                    "@alice:alpha.test",
                    body(i),
                )
                .await,
            );
        }
        let m = MidRound {
            alpha,
            arrived,
            armed,
            backlog,
            _peer: peer,
            _worker: worker,
        };
        wait_for("the backlog's rows", Duration::from_secs(60), || async {
            let rows = m.statuses(&m.backlog).await;
            (rows.len() == m.backlog.len() && rows.iter().all(|r| r.0 == "pending")).then_some(())
        })
        .await;
        m
    }

    /// The rows of `ids`: (status, attempts).
    async fn statuses(&self, ids: &[String]) -> Vec<(String, i32)> {
        oq::table
            .filter(oq::event_id.eq_any(ids))
            .select((oq::status, oq::attempts))
            .load(&mut *self.alpha.db().await)
            .await
            .unwrap()
    }

    /// Arms the peer and resumes beta: its drain starts.
    async fn resume(&self) {
        use parafed::admin::destinations::{act, Action};
        self.armed.store(true, Ordering::SeqCst);
        act(&self.alpha.app, "beta.test", Action::Resume, None)
            .await
            .unwrap();
    }

    /// Waits until the drain let beta go (its lease released) with a round delivered
    /// and beta's state as `stopped` says; then checks that one round at most went out,
    /// settled, and that the rest waits untried. Returns the rest.
    async fn one_round_then_nothing(
        &self,
        what: &str,
        stopped: impl Fn(&parafed::store::destinations::Health) -> bool,
    ) -> Vec<String> {
        wait_for(what, Duration::from_secs(60), || async {
            let h = self.alpha.health("beta.test").await?;
            let lease: Option<String> = dh::table
                .filter(dh::destination.eq("beta.test"))
                .select(dh::lease_owner)
                .first(&mut *self.alpha.db().await)
                .await
                .unwrap();
            let delivered = self
                .statuses(&self.backlog)
                .await
                .iter()
                .filter(|r| r.0 == "delivered")
                .count();
            (stopped(&h) && lease.is_none() && delivered > 0).then_some(())
        })
        .await;
        let sent: Vec<String> = self.arrived.lock().unwrap()[1..].to_vec();
        assert!(
            !sent.is_empty() && sent.len() <= MID_ROUND_WINDOW,
            "one round at most goes out after the change; {} went",
            sent.len()
        );
        let rows = self.statuses(&sent).await;
        assert!(
            rows.iter().all(|r| r.0 == "delivered"),
            "the answered round is settled: {rows:?}"
        );
        let open: i64 = da::table
            .filter(da::destination.eq("beta.test"))
            .filter(da::finished_at.is_null())
            .count()
            .get_result(&mut *self.alpha.db().await)
            .await
            .unwrap();
        assert_eq!(open, 0, "no attempt left open");
        let rest: Vec<String> = self
            .backlog
            .iter()
            .filter(|id| !sent.contains(id))
            .cloned()
            .collect();
        assert!(
            self.statuses(&rest)
                .await
                .iter()
                .all(|r| r == &("pending".to_owned(), 0)),
            "the rest waits, never tried"
        );
        rest
    }

    /// Once beta may be sent to again: the rest arrives, and every event arrived once.
    async fn each_once(&self, rest: &[String]) {
        for id in rest {
            delivered(&self.alpha, id, "the rest", 60).await;
        }
        let arrived = self.arrived.lock().unwrap().clone();
        let unique: HashSet<&String> = arrived.iter().collect();
        assert_eq!(
            arrived.len(),
            1 + self.backlog.len(),
            "each event once: {arrived:?}"
        );
        assert_eq!(unique.len(), arrived.len());
    }
}

/// A destination paused while a round of a backlog is out (its read-ahead round
/// chosen meanwhile): after that round's answers the drain sends nothing more — not the
/// round read ahead — and the answered round is settled (rows delivered, attempts
/// closed) before the drain lets the destination go. Resumed, the rest goes out, each
/// event once. Whichever look catches the pause (the read ahead's, or the check just
/// before sending the round read ahead), the outcome is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_while_a_round_is_out_stops_the_round_read_ahead_and_settles_the_one_answered() {
    use parafed::admin::destinations::{act, Action};
    let m = MidRound::start(
        "",
        Arc::new(|app| {
            Box::pin(async move {
                act(
                    &app,
                    "beta.test",
                    Action::Pause,
                    Some("test: paused mid-round"),
                )
                .await
                .unwrap();
            })
        }),
    )
    .await;
    m.resume().await;
    let rest = m
        .one_round_then_nothing("the drain to stop at the pause", |h| h.state == "paused")
        .await;
    act(&m.alpha.app, "beta.test", Action::Resume, None)
        .await
        .unwrap();
    m.each_once(&rest).await;
}

/// A peer quarantined automatically while a round of its backlog is out (its offenses
/// reached the threshold, `trust::offenses`) gets nothing more from the drain after
/// that round: not the round read ahead, not the rounds after. The destination is held
/// with the rest of the backlog waiting, untried; released, the rest goes out, each
/// event once. Before, a drain looked at the peer's standing only when its job started
/// (an operator's decision also queues a job that holds the destination; the automatic
/// quarantine does not), and sent a peer quarantined meanwhile its whole backlog, for
/// as long as the drain's time budget lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_quarantined_while_its_backlog_drains_gets_nothing_after_the_round_out() {
    use parafed::trust::offenses::{record, Offense};
    let beta = parafed::protocol::ServerName::parse("beta.test").unwrap();
    // The peer's first answer of the drain records an offense, which quarantines it
    // (threshold 1).
    let name = beta.clone();
    let m = MidRound::start(
        "quarantine_threshold = 1\n",
        Arc::new(move |app| {
            let name = name.clone();
            Box::pin(async move { record(&app.trust, &name, Offense::RejectedEvent).await })
        }),
    )
    .await;
    m.resume().await;
    let rest = m
        .one_round_then_nothing("the drain to stop at the quarantine", |h| {
            h.paused_reason
                .as_deref()
                .is_some_and(|r| r.contains("quarantined"))
        })
        .await;
    parafed::admin::peers::release(&m.alpha.app, &beta)
        .await
        .unwrap();
    m.each_once(&rest).await;
}

/// A fan-out decides from a view it read before it writes: an earlier event whose
/// fan-out read beta as new (its first request in flight: unreachable) defers after a
/// later event — here a reaction to it — got its own row, and moves beta's cursor in
/// the room back before that row while beta's drain has a round out. The drain read
/// beta's deferrals when it started; it must not act on that read: the reaction waits
/// until the drain has caught the deferral up and sent the message (`deliver::
/// fresh_deferrals`). Before, the drain sent the reaction at once — the order check
/// counts an event fanned out as settled — and the message later. The state the late
/// fan-out leaves is made here by running it while beta's row reads as new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_moved_back_under_a_running_drain_holds_back_the_rows_after_it() {
    use diesel_async::SimpleAsyncConnection;
    use parafed::store::schema::federation_events as fe;
    let arrived: Arc<Mutex<Vec<String>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (lp, up) = reserve_listener();
    let (a, g) = (arrived.clone(), gate.clone());
    let _peer = FnPeer::start(lp, move |r: FakeRequest| {
        let (arrived, gate) = (a.clone(), g.clone());
        async move {
            if !r.path.ends_with("/event") {
                return FakeAnswer::empty(404);
            }
            let env: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            arrived
                .lock()
                .unwrap()
                .push(env["event_id"].as_str().unwrap_or_default().to_owned());
            if env["content"]["body"] == "hold" {
                // Answered once the test has moved the cursor back.
                gate.acquire().await.unwrap().forget();
            }
            accepted(&r)
        }
    })
    .await;
    // No worker: the test runs each fan-out and the drain itself, in the order above.
    let alpha = alpha_with_member_cfg("beta.test", &up, FAST_WORKER_TOML).await;
    alpha
        .db()
        .await
        .batch_execute(
            "INSERT INTO destination_health (destination, state, last_success_at, last_status_code) \
             VALUES ('beta.test', 'healthy', now(), 202)",
        )
        .await
        .unwrap();
    let ctx = Arc::new(parafed_jobs::context::Ctx::new(
        alpha.app.clone(),
        "cursor-test".into(),
    ));
    let fan_out = |id: &str| {
        let ctx = ctx.clone();
        let job = parafed::queue::jobs::FanoutJob {
            event_ids: vec![id.to_owned()],
        };
        async move { parafed_jobs::fanout::run(&ctx, &job).await.unwrap() }
    };
    let drain = || {
        let ctx = ctx.clone();
        async move {
            let job = parafed::queue::DeliverJob {
                destination: "beta.test".into(),
            };
            parafed_jobs::deliver::run(&ctx, &job).await.unwrap()
        }
    };

    // Alice's event `kind` about message `message_id`.
    let post = |txn: &'static str, kind: &'static str, message_id: &'static str, body| {
        let alpha = &alpha;
        async move {
            submit(
                alpha,
                txn,
                kind,
                "@alice:alpha.test",
                json!({"message_id": message_id, "channel_id": "1", "body": body}),
            )
            .await
        }
    };

    // A round out: beta's drain sends `first` and waits for its answer.
    let first = post("c0", "m.message", "first", "hold").await;
    fan_out(&first).await;
    let running = tokio::spawn(drain());
    let seen = arrived.clone();
    wait_for(
        "the held round at beta",
        Duration::from_secs(30),
        || async { (seen.lock().unwrap().as_slice() == [first.clone()]).then_some(()) },
    )
    .await;

    // Meanwhile: a message and a reaction to it. The reaction is fanned out first and
    // gets a row; the message's fan-out reads beta as new and defers.
    let message = post("c1", "m.message", "m", "message").await;
    let reaction = post("c2", "m.reaction.add", "m", "reaction").await;
    fan_out(&reaction).await;
    let set = |sql: &'static str| {
        let alpha = &alpha;
        async move { alpha.db().await.batch_execute(sql).await.unwrap() }
    };
    set(
        "UPDATE destination_health SET last_success_at = NULL, last_status_code = NULL \
         WHERE destination = 'beta.test'",
    )
    .await;
    fan_out(&message).await;
    set(
        "UPDATE destination_health SET last_success_at = now(), last_status_code = 202 \
         WHERE destination = 'beta.test'",
    )
    .await;
    let rows: Vec<String> = oq::table
        .filter(oq::destination.eq("beta.test"))
        .filter(oq::event_id.ne(&first))
        .select(oq::event_id)
        .load(&mut *alpha.db().await)
        .await
        .unwrap();
    assert_eq!(rows, vec![reaction.clone()], "the reaction's row only");
    let message_seq: i64 = fe::table
        .filter(fe::event_id.eq(&message))
        .select(fe::seq)
        .first(&mut *alpha.db().await)
        .await
        .unwrap();
    assert_eq!(
        deferral_starts(&alpha).await,
        vec![message_seq - 1],
        "the cursor, before the message"
    );

    // The round is answered; the drain goes on (and later drains, if it stops).
    gate.add_permits(1);
    running.await.unwrap();
    wait_for(
        "the message and the reaction at beta",
        Duration::from_secs(30),
        || async {
            if seen.lock().unwrap().len() >= 3 {
                return Some(());
            }
            drain().await;
            None
        },
    )
    .await;
    assert_eq!(
        *arrived.lock().unwrap(),
        vec![first, message, reaction],
        "the message before its reaction, each once"
    );
}

/// A worker's drains share one budget of requests in flight
/// (`worker.max_requests_in_flight`): three busy peers with a window of 4 each could
/// have 12 requests out at once; with a budget of 4 the peers, counting together, never
/// see more than 4 — and every event still reaches every peer once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_requests_in_flight_stay_within_its_budget_across_destinations() {
    #[derive(Default)]
    struct Load {
        in_flight: usize,
        max_in_flight: usize,
        /// Per peer: event ids received.
        got: HashMap<String, Vec<String>>,
    }
    let load: Arc<Mutex<Load>> = Arc::default();
    let names = ["beta.test", "gamma.test", "delta.test"];
    let mut peers = Vec::new();
    let mut urls = Vec::new();
    for name in names {
        let (l, u) = reserve_listener();
        let load = load.clone();
        peers.push(
            FnPeer::start(l, move |r: FakeRequest| {
                let load = load.clone();
                async move {
                    if !r.path.ends_with("/event") {
                        return FakeAnswer::empty(404);
                    }
                    {
                        let mut l = load.lock().unwrap();
                        l.in_flight += 1;
                        l.max_in_flight = l.max_in_flight.max(l.in_flight);
                        l.got
                            .entry(name.to_owned())
                            .or_default()
                            .push(event_id_of(&r.body));
                    }
                    // A peer that takes a moment: the rounds of the three drains overlap.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    load.lock().unwrap().in_flight -= 1;
                    accepted(&r)
                }
            })
            .await,
        );
        urls.push((name.to_owned(), u));
    }
    let toml = FAST_WORKER_TOML
        .replace("[worker]\n", "[worker]\nmax_requests_in_flight = 4\n")
        .replace("[delivery]\n", "[delivery]\nwindow = 4\n");
    let (la, _) = reserve_listener();
    let alpha = crate::pipeline::server_with("alpha.test", la, urls, &toml).await;
    {
        let mut c = alpha.db().await;
        let members: Vec<(String, &str)> = names.iter().map(|n| (format!("@x:{n}"), *n)).collect();
        let members: Vec<(&str, &str)> = members.iter().map(|(u, n)| (u.as_str(), *n)).collect();
        support::host_room(&mut c, crate::pipeline::ROOM, &members).await;
    }
    let _w = TestWorker::start(&alpha);
    // First contact goes through probes, which the budget does not count
    // (`worker.probe_concurrency` bounds them): every peer has answered its probe before
    // the load starts, so none is still out beside the load's rounds.
    submit(
        &alpha,
        "warm",
        "m.message",
        "@alice:alpha.test",
        json!({"body": "hi"}),
    )
    .await;
    let l = load.clone();
    wait_for(
        "the first event answered by every peer",
        Duration::from_secs(60),
        || async {
            let l = l.lock().unwrap();
            (l.got.len() == names.len() && l.in_flight == 0).then_some(())
        },
    )
    .await;
    {
        let mut l = load.lock().unwrap();
        l.max_in_flight = 0;
        l.got.clear();
    }
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            submit(
                &alpha,
                &format!("b{i}"),
                "m.message",
                "@alice:alpha.test",
                json!({"body": format!("#{i}")}),
            )
            .await,
        );
    }
    let l = load.clone();
    wait_for(
        "every event at every peer",
        Duration::from_secs(120),
        || async {
            let l = l.lock().unwrap();
            names
                .iter()
                .all(|n| l.got.get(*n).is_some_and(|g| g.len() >= ids.len()))
                .then_some(())
        },
    )
    .await;
    let l = load.lock().unwrap();
    assert!(
        l.max_in_flight <= 4,
        "{} requests in flight at once with a budget of 4",
        l.max_in_flight
    );
    for n in names {
        let got: HashSet<&String> = l.got[n].iter().collect();
        assert_eq!(l.got[n].len(), ids.len(), "{n}: each event once");
        assert_eq!(got.len(), ids.len(), "{n}: each event once");
        assert!(ids.iter().all(|id| got.contains(id)), "{n}: every event");
    }
}
