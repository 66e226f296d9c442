//! `parafed admin` against a running fleet: a `parafed serve` process (whose admin API
//! the command calls) and a `parafed-worker` process, over real Postgres and Redis, with
//! peers on 127.0.0.1. Every command is run as an operator would run it — the `parafed`
//! binary, `--output json` or a table — and its effect is checked in the database, in
//! the queues or at the peers. The JSON of every command is compared with the shape
//! `docs/admin.md` documents (`PARAFED_TEST_BLESS_DOCS=1` rewrites the examples there from
//! this run).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::pipeline::{server_with, submit, ROOM};
use crate::support;
use support::app::{
    event_id_of, reserve_listener, send, FakeAnswer, FakeRequest, FnPeer, ServeProcess, TestServer,
    WorkerProcess, FAST_WORKER_TOML,
};
use support::wait_for;

const TOKEN: &str = "admin-secret";
const WAIT: Duration = Duration::from_secs(30);

/// A peer whose answer to `POST /event` is `status` (202 = accepted), and which records
/// the event ids it accepted, in order.
struct Sink {
    status: Arc<AtomicU16>,
    accepted: Arc<Mutex<Vec<String>>>,
    _peer: FnPeer,
    url: String,
}

impl Sink {
    async fn start(status: u16) -> Sink {
        let (l, url) = reserve_listener();
        let st = Arc::new(AtomicU16::new(status));
        let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s, a) = (st.clone(), accepted.clone());
        let peer = FnPeer::start(l, move |r: FakeRequest| {
            let (s, a) = (s.clone(), a.clone());
            async move {
                if !r.path.ends_with("/event") {
                    return FakeAnswer::empty(404);
                }
                let id = event_id_of(&r.body);
                match s.load(Ordering::SeqCst) {
                    202 => {
                        a.lock().unwrap().push(id.clone());
                        FakeAnswer::json(202, json!({"event_id": id, "inserted": true}))
                    }
                    503 => {
                        let mut f = FakeAnswer::json(503, json!({"error": "down for maintenance"}));
                        f.headers.push(("Retry-After".into(), "60".into()));
                        f
                    }
                    code => FakeAnswer::json(
                        code,
                        json!({"code": "BAD_REQUEST", "error": "bad request", "message": "refused by the test"}),
                    ),
                }
            }
        })
        .await;
        Sink {
            status: st,
            accepted,
            _peer: peer,
            url,
        }
    }

    fn count(&self, id: &str) -> usize {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .filter(|x| *x == id)
            .count()
    }

    fn order(&self) -> Vec<String> {
        self.accepted.lock().unwrap().clone()
    }
}

/// Runs `parafed admin …` against `serve`; returns (exit code, stdout, stderr).
pub(crate) async fn run(url: &str, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_parafed"));
    cmd.arg("admin").args(args).env("PARAFED_ADMIN_URL", url);
    cmd.env_remove("PARAFED_ADMIN_TOKEN")
        .env_remove("PARAFED_CONFIG");
    if let Some(t) = token {
        cmd.env("PARAFED_ADMIN_TOKEN", t);
    }
    let out = cmd.output().await.expect("run parafed admin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The fleet under test and what the commands printed.
struct Fleet {
    alpha: TestServer,
    serve: ServeProcess,
    _worker: WorkerProcess,
    /// Command (e.g. `deliveries list`) → its JSON, for the docs check.
    seen: Mutex<BTreeMap<String, Value>>,
}

impl Fleet {
    fn url(&self) -> String {
        self.serve.base_url()
    }

    /// Runs a command with `--output json`; asserts exit 0 and returns the document.
    async fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let (code, out, err) = run(&self.url(), Some(TOKEN), &full).await;
        assert_eq!(code, 0, "parafed admin {args:?}: exit {code}\n{out}\n{err}");
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("parafed admin {args:?} printed no JSON ({e}): {out}"));
        let name: Vec<&str> = args
            .iter()
            .take_while(|a| !a.starts_with('-'))
            .take(2)
            .copied()
            .collect();
        let key = if name.first() == Some(&"status") {
            "status".to_owned()
        } else {
            name.join(" ")
        };
        self.seen.lock().unwrap().insert(key, v.clone());
        v
    }

    /// Runs a command printing a table; asserts exit 0.
    async fn table(&self, args: &[&str]) -> String {
        let (code, out, err) = run(&self.url(), Some(TOKEN), args).await;
        assert_eq!(code, 0, "parafed admin {args:?}: exit {code}\n{out}\n{err}");
        out
    }

    async fn code(&self, args: &[&str]) -> i32 {
        run(&self.url(), Some(TOKEN), args).await.0
    }
}

async fn start_fleet(peers: &[(&str, &Sink)]) -> Fleet {
    let (la, _) = reserve_listener();
    let alpha = server_with(
        "alpha.test",
        la,
        peers
            .iter()
            .map(|(n, s)| (n.to_string(), s.url.clone()))
            .collect(),
        FAST_WORKER_TOML,
    )
    .await;
    {
        let members: Vec<(String, String)> = peers
            .iter()
            .map(|(n, _)| (format!("@u:{n}"), n.to_string()))
            .collect();
        let refs: Vec<(&str, &str)> = members
            .iter()
            .map(|(u, n)| (u.as_str(), n.as_str()))
            .collect();
        support::host_room(&mut *alpha.db().await, ROOM, &refs).await;
    }
    let serve = ServeProcess::start(&alpha, TOKEN).await;
    let worker = WorkerProcess::start(&alpha);
    Fleet {
        alpha,
        serve,
        _worker: worker,
        seen: Mutex::default(),
    }
}

/// The delivery of an event to `destination`, from `events show`.
fn report<'a>(shown: &'a Value, destination: &str) -> &'a Value {
    try_report(shown, destination).unwrap_or_else(|| panic!("no {destination} in {shown:#}"))
}

fn try_report<'a>(shown: &'a Value, destination: &str) -> Option<&'a Value> {
    shown["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["destination"] == destination)
}

async fn delivery_state(f: &Fleet, event: &str, destination: &str) -> String {
    let v = f
        .json(&[
            "deliveries",
            "list",
            "--event",
            event,
            "--destination",
            destination,
        ])
        .await;
    v["items"][0]["state"].as_str().unwrap_or("none").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_command_against_a_running_fleet() {
    let beta = Sink::start(400).await; // refuses for good at first
    let gamma = Sink::start(503).await; // down: backs off
    let delta = Sink::start(202).await;
    let f = start_fleet(&[
        ("beta.test", &beta),
        ("gamma.test", &gamma),
        ("delta.test", &delta),
    ])
    .await;

    // Both processes report in.
    wait_for("serve and worker heartbeats", WAIT, || async {
        let s = f.json(&["status"]).await;
        let roles: Vec<String> = s["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["role"].as_str().unwrap().to_owned())
            .collect();
        (roles.contains(&"ingress".into()) && roles.contains(&"worker".into())).then_some(())
    })
    .await;

    // --- events show: dead at beta, backing off at gamma, delivered at delta.
    let m1 = submit(
        &f.alpha,
        "t1",
        "m.message",
        "@a:alpha.test",
        json!({"message_id": "m1", "body": "one"}),
    )
    .await;
    wait_for(
        "m1 settles at beta and delta, gamma backs off",
        WAIT,
        || async {
            let s = f.json(&["events", "show", &m1]).await;
            let (b, g, d) = (
                try_report(&s, "beta.test")?,
                try_report(&s, "gamma.test")?,
                try_report(&s, "delta.test")?,
            );
            let ok = b["delivery"]["state"] == "dead"
                && d["delivery"]["state"] == "delivered"
                && g["destination_state"] == "backing_off"
                && !g["attempts"].as_array()?.is_empty();
            ok.then_some(())
        },
    )
    .await;
    let shown = f.json(&["events", "show", &m1]).await;
    assert_eq!(shown["event"]["status"], "accepted");
    assert_eq!(shown["event"]["room_id"], ROOM);
    assert!(shown["next"].is_null(), "{shown:#}");
    let b = report(&shown, "beta.test");
    assert_eq!(b["attempts"][0]["status_code"], 400);
    assert_eq!(b["attempts"][0]["error_class"], "http_4xx");
    assert!(
        b["next"]["what"]
            .as_str()
            .unwrap()
            .contains("deliveries retry"),
        "{b:#}"
    );
    let g = report(&shown, "gamma.test");
    assert!(["pending", "in_flight"].contains(&g["delivery"]["state"].as_str().unwrap()));
    assert_eq!(g["attempts"][0]["status_code"], 503);
    let d = report(&shown, "delta.test");
    assert_eq!(d["attempts"][0]["status_code"], 202);
    assert!(d["next"]["what"].as_str().unwrap().contains("delivered"));
    let table = f.table(&["events", "show", &m1]).await;
    for want in ["dead", "backing_off", "delivered", "http_4xx", "gamma.test"] {
        assert!(table.contains(want), "table lacks {want}:\n{table}");
    }

    // --- deliveries retry: the dead delivery is sent again once beta accepts, once.
    let dead = f
        .json(&[
            "deliveries",
            "list",
            "--state",
            "dead",
            "--destination",
            "beta.test",
        ])
        .await;
    let items = dead["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{dead:#}");
    let id = items[0]["id"].as_i64().unwrap().to_string();
    let one = f.json(&["deliveries", "show", &id]).await;
    assert_eq!(one["delivery"]["event_id"], m1.as_str());
    assert_eq!(one["attempts"].as_array().unwrap().len(), 1);
    beta.status.store(202, Ordering::SeqCst);
    assert_eq!(beta.count(&m1), 0);
    let retried = f.json(&["deliveries", "retry", &id]).await;
    // The answer is read before the retry schedules a drain, but the worker's scheduler
    // (every 10 ms here) may find the pending row first and deliver it at once.
    let state = retried["delivery"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        ["pending", "in_flight", "delivered"].contains(&state.as_str()),
        "retried delivery is {state}"
    );
    assert_eq!(retried["delivery"]["dead_reason"], serde_json::Value::Null);
    wait_for("m1 reaches beta", WAIT, || async {
        (beta.count(&m1) == 1).then_some(())
    })
    .await;
    wait_for("m1 delivered to beta", WAIT, || async {
        (delivery_state(&f, &m1, "beta.test").await == "delivered").then_some(())
    })
    .await;
    assert_eq!(beta.count(&m1), 1, "arrives once");
    // Retrying a delivered one is refused and changes nothing.
    assert_eq!(f.code(&["deliveries", "retry", &id]).await, 1);

    // --- destinations pause / resume: delta waits, beta does not; then delta drains in order.
    let paused = f
        .json(&[
            "destinations",
            "pause",
            "delta.test",
            "--reason",
            "maintenance",
        ])
        .await;
    assert_eq!(paused["destination"]["state"], "paused");
    assert_eq!(paused["destination"]["paused_by"], "ops-test");
    // A message and four edits of it: dependants, which must arrive in order.
    let mut batch = vec![
        submit(
            &f.alpha,
            "p0",
            "m.message",
            "@a:alpha.test",
            json!({"message_id": "p", "body": "v0"}),
        )
        .await,
    ];
    for i in 1..5 {
        batch.push(
            submit(
                &f.alpha,
                &format!("p{i}"),
                "m.message.edit",
                "@a:alpha.test",
                json!({"message_id": "p", "body": format!("v{i}")}),
            )
            .await,
        );
    }
    wait_for(
        "beta gets the batch while delta is paused",
        WAIT,
        || async { batch.iter().all(|e| beta.count(e) == 1).then_some(()) },
    )
    .await;
    assert!(
        batch.iter().all(|e| delta.count(e) == 0),
        "paused delta got events"
    );
    let listed = f.json(&["destinations", "list", "--state", "paused"]).await;
    assert_eq!(listed["items"][0]["destination"], "delta.test");
    assert_eq!(listed["items"][0]["backlog"], 5);
    let resumed = f.json(&["destinations", "resume", "delta.test"]).await;
    assert_ne!(resumed["destination"]["state"], "paused");
    wait_for("delta drains its backlog", WAIT, || async {
        batch.iter().all(|e| delta.count(e) == 1).then_some(())
    })
    .await;
    let order: Vec<String> = delta
        .order()
        .into_iter()
        .filter(|e| batch.contains(e))
        .collect();
    assert_eq!(order, batch, "delta's backlog arrives in order");
    let shown = f.json(&["destinations", "show", "delta.test"]).await;
    assert!(!shown["recent_attempts"].as_array().unwrap().is_empty());

    // --- destinations retry-now: gamma probes at once.
    let before = f.json(&["destinations", "show", "gamma.test"]).await["recent_attempts"]
        .as_array()
        .unwrap()
        .len();
    f.json(&["destinations", "retry-now", "gamma.test"]).await;
    wait_for("gamma is probed", WAIT, || async {
        let n = f.json(&["destinations", "show", "gamma.test"]).await["recent_attempts"]
            .as_array()
            .unwrap()
            .len();
        (n > before).then_some(())
    })
    .await;

    // --- queues pause deliver: nothing is sent fleet-wide; ingress keeps accepting.
    let q = f.json(&["queues", "pause", "deliver"]).await;
    assert_eq!(q["paused"]["by"], "ops-test");
    wait_for("the worker has seen the pause", WAIT, || async {
        let s = f.json(&["status"]).await;
        s["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["role"] == "worker")
            .all(|p| {
                p["paused"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|q| q == "deliver")
            })
            .then_some(())
    })
    .await;
    let m3 = submit(
        &f.alpha,
        "t3",
        "m.message",
        "@a:alpha.test",
        json!({"message_id": "m3", "body": "three"}),
    )
    .await;
    wait_for(
        "m3's deliver job waits in the paused queue",
        WAIT,
        || async {
            let jobs = f
                .json(&["jobs", "list", "--queue", "deliver", "--state", "ready"])
                .await;
            (!jobs["items"].as_array().unwrap().is_empty()).then_some(jobs)
        },
    )
    .await;
    let queues = f.json(&["queues", "list"]).await;
    let deliver = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "deliver")
        .unwrap();
    assert!(deliver["ready"].as_u64().unwrap() >= 1);
    assert_eq!(delivery_state(&f, &m3, "beta.test").await, "pending");
    assert_eq!(beta.count(&m3), 0);
    let stats = f.json(&["queues", "stats", "deliver"]).await;
    assert!(!stats["paused"].is_null());
    f.json(&["queues", "resume", "deliver"]).await;
    wait_for(
        "m3 reaches beta and delta after the resume",
        WAIT,
        || async { (beta.count(&m3) == 1 && delta.count(&m3) == 1).then_some(()) },
    )
    .await;

    // --- bulk cancel and purge by filter: dry runs change nothing and count what the
    // real run then changes; destructive commands refuse without --yes (exit 2).
    let gamma_pending = f
        .json(&[
            "deliveries",
            "list",
            "--destination",
            "gamma.test",
            "--state",
            "pending",
            "--limit",
            "1000",
        ])
        .await["items"]
        .as_array()
        .unwrap()
        .len();
    assert!(gamma_pending >= 6, "{gamma_pending}");
    assert_eq!(
        f.code(&[
            "deliveries",
            "cancel",
            "--destination",
            "gamma.test",
            "--state",
            "pending"
        ])
        .await,
        2
    );
    let cancelled = f
        .json(&[
            "deliveries",
            "cancel",
            "--destination",
            "gamma.test",
            "--yes",
        ])
        .await;
    assert!(cancelled["count"].as_i64().unwrap() >= gamma_pending as i64);
    let n = cancelled["count"].as_i64().unwrap();
    let dry = f
        .json(&[
            "deliveries",
            "purge",
            "--destination",
            "gamma.test",
            "--state",
            "cancelled",
            "--dry-run",
        ])
        .await;
    assert_eq!(dry["count"], n);
    assert_eq!(dry["dry_run"], true);
    let still = f
        .json(&[
            "deliveries",
            "list",
            "--destination",
            "gamma.test",
            "--state",
            "cancelled",
            "--limit",
            "1000",
        ])
        .await;
    assert_eq!(
        still["items"].as_array().unwrap().len() as i64,
        n,
        "a dry run removed rows"
    );
    assert_eq!(
        f.code(&[
            "deliveries",
            "purge",
            "--destination",
            "gamma.test",
            "--state",
            "cancelled"
        ])
        .await,
        2
    );
    let purged = f
        .json(&[
            "deliveries",
            "purge",
            "--destination",
            "gamma.test",
            "--state",
            "cancelled",
            "--yes",
        ])
        .await;
    assert_eq!(purged["count"], n);
    let gone = f
        .json(&["deliveries", "list", "--destination", "gamma.test"])
        .await;
    assert!(gone["items"].as_array().unwrap().is_empty(), "{gone:#}");
    // Bulk retry of what is left dead anywhere: nothing, reported as 0.
    let none = f
        .json(&["deliveries", "retry", "--state", "dead", "--dry-run"])
        .await;
    assert_eq!(none["count"], 0);

    // --- jobs: a dead job is visible with its error, retried into its queue, purged.
    let mut redis = f.alpha.app.redis.clone();
    let dead_key = f.alpha.app.keys.dead(parafed::queue::QueueName::Fanout);
    let dead_id: String = redis::cmd("XADD")
        .arg(&dead_key)
        .arg("*")
        .arg("job")
        .arg(json!({"event_id": "$nonexistent:alpha.test"}).to_string())
        .arg("from")
        .arg("1-1")
        .arg("error")
        .arg("event $nonexistent:alpha.test vanished")
        .query_async(&mut redis)
        .await
        .unwrap();
    let dead_jobs = f.json(&["jobs", "list", "--state", "dead"]).await;
    let j = &dead_jobs["items"][0];
    assert_eq!(j["id"], dead_id.as_str());
    assert_eq!(j["queue"], "fanout");
    assert!(j["last_error"].as_str().unwrap().contains("vanished"));
    let shown = f.json(&["jobs", "show", "fanout", &dead_id]).await;
    assert_eq!(shown["state"], "dead");
    let retried = f.json(&["jobs", "retry", "fanout", &dead_id]).await;
    assert_ne!(retried["id"], dead_id.as_str());
    assert_eq!(f.code(&["jobs", "show", "fanout", &dead_id]).await, 3);
    // Three more dead jobs: one cancelled on its own, then purge counts the other two
    // in a dry run and removes them.
    let mut extra = Vec::new();
    for _ in 0..3 {
        let id: String = redis::cmd("XADD")
            .arg(&dead_key)
            .arg("*")
            .arg("job")
            .arg(json!({"event_id": "$x:alpha.test"}).to_string())
            .query_async(&mut redis)
            .await
            .unwrap();
        extra.push(id);
    }
    assert_eq!(f.code(&["jobs", "cancel", "fanout", &extra[0]]).await, 2);
    let cancelled_job = f
        .json(&["jobs", "cancel", "fanout", &extra[0], "--yes"])
        .await;
    assert_eq!(cancelled_job["id"], extra[0].as_str());
    assert_eq!(f.code(&["jobs", "show", "fanout", &extra[0]]).await, 3);
    let dry = f
        .json(&["jobs", "purge", "--queue", "fanout", "--dry-run"])
        .await;
    assert_eq!(dry["count"], 2);
    assert_eq!(f.code(&["jobs", "purge", "--queue", "fanout"]).await, 2);
    let purged = f
        .json(&["jobs", "purge", "--queue", "fanout", "--yes"])
        .await;
    assert_eq!(purged["count"], 2);
    let redriven = f.json(&["jobs", "redrive", "--dry-run"]).await;
    assert_eq!(redriven["count"], 0);
    let all = f.json(&["jobs", "list"]).await;
    assert!(all["items"].is_array());

    // --- events list, keys, audit.
    let evs = f
        .json(&["events", "list", "--room", ROOM, "--limit", "2"])
        .await;
    assert_eq!(evs["items"].as_array().unwrap().len(), 2);
    let cursor = evs["next_cursor"].as_str().unwrap().to_owned();
    let next = f
        .json(&[
            "events", "list", "--room", ROOM, "--limit", "2", "--cursor", &cursor,
        ])
        .await;
    assert_ne!(next["items"][0]["event_id"], evs["items"][0]["event_id"]);
    let keys = f.json(&["keys", "list"]).await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    assert_eq!(f.code(&["keys", "rotate"]).await, 2);
    let rotated = f.json(&["keys", "rotate", "--yes"]).await;
    assert_eq!(rotated["keys"].as_array().unwrap().len(), 2);
    let audit = f.json(&["audit", "list"]).await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for want in [
        "deliveries.retry",
        "destinations.pause",
        "destinations.resume",
        "destinations.retry-now",
        "queues.pause",
        "queues.resume",
        "deliveries.cancel",
        "deliveries.purge",
        "jobs.retry",
        "jobs.cancel",
        "jobs.purge",
        "keys.rotate",
    ] {
        assert!(actions.contains(&want), "audit lacks {want}: {actions:?}");
    }
    assert!(audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["actor"] == "ops-test"));
    let purge_row = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["action"] == "deliveries.purge")
        .unwrap();
    assert_eq!(purge_row["count"], n);
    assert!(purge_row["filter"].as_str().unwrap().contains("gamma.test"));
    let table = f.table(&["audit", "list"]).await;
    assert!(
        table.contains("ACTION") && table.contains("queues.pause"),
        "{table}"
    );

    // --- not found is exit 3; a bad argument exit 2.
    assert_eq!(f.code(&["events", "show", "$missing:alpha.test"]).await, 3);
    assert_eq!(f.code(&["deliveries", "show", "999999"]).await, 3);
    assert_eq!(f.code(&["deliveries", "list", "--state", "lost"]).await, 2);
    assert_eq!(f.code(&["queues", "stats", "nosuch"]).await, 2);

    // --- peers: every trust command (their effects are tests/it/trust.rs's).
    assert_eq!(f.json(&["peers", "mode"]).await["mode"], "open");
    let limited = f
        .json(&["peers", "rate-limit", "delta.test", "--per-minute", "1000"])
        .await;
    assert_eq!(limited["limits"]["own_rate_limit_per_minute"], 1000);
    assert_eq!(
        f.json(&["peers", "allow", "delta.test"]).await["standing"],
        "allowed"
    );
    let q = f
        .json(&[
            "peers",
            "quarantine",
            "gamma.test",
            "--reason",
            "test",
            "--for-secs",
            "600",
        ])
        .await;
    assert_eq!(q["standing"], "quarantined");
    assert!(!q["decision"]["until"].is_null());
    assert_eq!(
        f.json(&["peers", "purge", "gamma.test", "--yes"]).await["count"],
        0
    );
    assert_eq!(
        f.json(&["peers", "release", "gamma.test"]).await["count"],
        0
    );
    assert_eq!(
        f.json(&["peers", "block", "gamma.test", "--yes"]).await["standing"],
        "refused"
    );
    let peers = f.json(&["peers", "list"]).await;
    assert_eq!(peers["items"].as_array().unwrap().len(), 2);
    let shown = f.json(&["peers", "show", "gamma.test"]).await;
    assert_eq!(shown["audit"][0]["action"], "peers.block");
    assert_eq!(
        f.json(&["peers", "mode", "allowlist"]).await["mode"],
        "allowlist"
    );

    check_docs(&f.seen.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_token_is_refused_and_changes_nothing() {
    let beta = Sink::start(202).await;
    let f = start_fleet(&[("beta.test", &beta)]).await;
    for token in [None, Some("wrong")] {
        let (code, _, err) = run(&f.url(), token, &["queues", "pause", "deliver"]).await;
        assert_ne!(code, 0, "{err}");
    }
    let r = send(
        f.serve.addr,
        "POST",
        "/_parafed/admin/v1/queues/deliver/pause",
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    let r = send(
        f.serve.addr,
        "POST",
        "/_parafed/admin/v1/queues/deliver/pause",
        &[("Authorization".to_owned(), "Bearer wrong".to_owned())],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], "UNAUTHORIZED");
    assert!(
        f.alpha.app.queue.paused().await.unwrap().is_empty(),
        "a refused call paused a queue"
    );
    let audit = f.json(&["audit", "list"]).await;
    assert!(audit["items"].as_array().unwrap().is_empty());
    // An unknown filter is refused rather than ignored (it would widen a bulk change).
    let r = send(
        f.serve.addr,
        "POST",
        "/_parafed/admin/v1/deliveries/purge",
        &[
            ("Authorization".to_owned(), format!("Bearer {TOKEN}")),
            ("Content-Type".to_owned(), "application/json".to_owned()),
        ],
        br#"{"destnation": "beta.test"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.json());
    let auth = vec![
        ("Authorization".to_owned(), format!("Bearer {TOKEN}")),
        ("Content-Type".to_owned(), "application/json".to_owned()),
    ];
    // A bulk change without a filter is refused by the API too, not only by the CLI.
    let r = send(
        f.serve.addr,
        "POST",
        "/_parafed/admin/v1/deliveries/purge",
        &auth,
        b"{}",
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.json());
    // A body whose length is not given is refused, never read as an empty one (which
    // would drop its filter and its dry run).
    let chunked = format!(
        "POST /_parafed/admin/v1/deliveries/purge HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         2a\r\n{{\"destination\":\"beta.test\",\"dry_run\":true}}\r\n0\r\n\r\n"
    );
    let r = support::app::raw(f.serve.addr, chunked.as_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.json());
    // Out-of-range numbers are a 400, not a crash.
    let r = send(
        f.serve.addr,
        "GET",
        "/_parafed/admin/v1/deliveries?older_than_secs=10000000000000",
        &auth,
        b"",
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.json());
    let r = send(
        f.serve.addr,
        "POST",
        "/_parafed/admin/v1/peers/beta.test/quarantine",
        &auth,
        br#"{"for_secs": 18000000000000000000}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.json());
    let audit = f.json(&["audit", "list"]).await;
    assert!(audit["items"].as_array().unwrap().is_empty(), "{audit:#}");
}

/// The shape of a JSON value: object keys (recursively), the shape of an array's first
/// element, and the kind of a scalar. `null` and `[]` match anything (a field that is
/// empty in one run is full in another).
fn same_shape(doc: &Value, real: &Value, path: &str, errors: &mut Vec<String>) {
    match (doc, real) {
        (Value::Null, _) | (_, Value::Null) => {}
        (Value::Object(a), Value::Object(b)) => {
            for k in a.keys().filter(|k| !b.contains_key(*k)) {
                errors.push(format!("{path}.{k}: documented, not in the output"));
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                errors.push(format!("{path}.{k}: in the output, not documented"));
            }
            for (k, v) in a {
                if let Some(w) = b.get(k) {
                    // Maps keyed by data (counts per state) are documented by example.
                    if k == "destinations" && v.is_object()
                        || ["deliveries", "events", "attempts_last_hour"].contains(&k.as_str())
                            && v.is_object()
                    {
                        continue;
                    }
                    same_shape(v, w, &format!("{path}.{k}"), errors);
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if let (Some(x), Some(y)) = (a.first(), b.first()) {
                same_shape(x, y, &format!("{path}[0]"), errors);
            }
        }
        (a, b) => {
            let kind = |v: &Value| match v {
                Value::Bool(_) => "bool",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
                Value::Null => "null",
            };
            if kind(a) != kind(b) {
                errors.push(format!(
                    "{path}: documented as {}, output is {}",
                    kind(a),
                    kind(b)
                ));
            }
        }
    }
}

/// The JSON example under each "### `parafed admin <command>`" heading of docs/admin.md.
fn doc_examples(text: &str) -> HashMap<String, (usize, usize)> {
    let mut out = HashMap::new();
    let mut current: Option<String> = None;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let start = pos;
        pos += line.len();
        if let Some(h) = line.strip_prefix("### `parafed admin ") {
            current = h.split('`').next().map(|c| {
                c.split_whitespace()
                    .take_while(|w| w.starts_with(|ch: char| ch.is_ascii_lowercase()))
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            });
        } else if line.starts_with("```json") {
            if let Some(c) = current.take() {
                let body_start = pos;
                let end = text[body_start..].find("```").map(|e| body_start + e);
                if let Some(end) = end {
                    out.insert(c, (body_start, end));
                }
            }
        }
        let _ = start;
    }
    out
}

fn check_docs(seen: &BTreeMap<String, Value>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/admin.md");
    let mut text = std::fs::read_to_string(path).expect("docs/admin.md");
    if std::env::var("PARAFED_TEST_BLESS_DOCS").is_ok() {
        let mut blocks: Vec<(usize, usize, String)> = doc_examples(&text)
            .into_iter()
            .filter_map(|(c, (s, e))| {
                seen.get(&c).map(|v| {
                    (
                        s,
                        e,
                        format!("{}\n", serde_json::to_string_pretty(v).unwrap()),
                    )
                })
            })
            .collect();
        blocks.sort_by_key(|b| std::cmp::Reverse(b.0));
        for (s, e, new) in blocks {
            text.replace_range(s..e, &new);
        }
        std::fs::write(path, &text).unwrap();
    }
    let examples = doc_examples(&text);
    let mut errors = Vec::new();
    for (command, real) in seen {
        let Some(&(s, e)) = examples.get(command) else {
            errors.push(format!(
                "`parafed admin {command}` has no JSON example in docs/admin.md"
            ));
            continue;
        };
        let doc: Value = match serde_json::from_str(&text[s..e]) {
            Ok(v) => v,
            Err(err) => {
                errors.push(format!("{command}: the example is not JSON: {err}"));
                continue;
            }
        };
        same_shape(&doc, real, command, &mut errors);
    }
    assert!(
        errors.is_empty(),
        "docs/admin.md disagrees with the output (PARAFED_TEST_BLESS_DOCS=1 rewrites the examples):\n{}",
        errors.join("\n")
    );
}
