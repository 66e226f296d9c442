//! Nothing lost under failure: a 10 000-event run from alpha to beta and gamma, with one
//! failure injected in the middle of it — Redis FLUSHALL, a Redis restart, `kill -9` of a
//! worker process, `kill -9` of an ingress process, a Postgres restart, SIGTERM to a
//! worker. Every deployment here is real processes (`parafed serve`, `parafed-worker`) on
//! one throwaway Postgres and Redis. Afterwards every event is in every receiver's store
//! exactly once and every outbound row was delivered.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use parafed::devservers::spawn::{signal, spawn_tied};
use parafed::devservers::{Postgres, Redis};
use parafed::store::schema::{federation_events as fe, outbound_queue as oq};
use serde_json::json;
use support::wait_for;

const N: usize = 10_000;
const ROOM: &str = "!chaos:alpha.test";

fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_parafed")).with_file_name(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

struct Deployment {
    name: &'static str,
    port: u16,
    cfg: PathBuf,
    dir: PathBuf,
    pool: parafed::store::PgPool,
    serve: Option<Child>,
    workers: Vec<Child>,
}

impl Deployment {
    fn spawn(&self, args: &[&str], binary: &str, log: &str) -> Child {
        let log = std::fs::File::create(self.dir.join(log)).unwrap();
        let mut cmd = Command::new(bin(binary));
        cmd.args(args)
            .arg("--config")
            .arg(&self.cfg)
            .env("PARAFED_LOCAL_TOKEN", "chaos-local")
            .env("PARAFED_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        spawn_tied(cmd).unwrap()
    }

    fn start_serve(&mut self) {
        let n = self.dir.read_dir().map(|d| d.count()).unwrap_or(0);
        self.serve = Some(self.spawn(
            &["serve"],
            "parafed",
            &format!("{}-serve-{n}.log", self.name),
        ));
    }

    fn start_worker(&mut self) {
        let n = self.dir.read_dir().map(|d| d.count()).unwrap_or(0);
        let w = self.spawn(
            &[],
            "parafed-worker",
            &format!("{}-worker-{n}.log", self.name),
        );
        self.workers.push(w);
    }

    fn kill9_serve(&mut self) {
        if let Some(mut c) = self.serve.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    async fn wait_ready(&self) {
        let port = self.port;
        wait_for(
            &format!("{} to serve", self.name),
            Duration::from_secs(30),
            || async move {
                let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
                let ok = support::app::raw(
                    addr,
                    &support::app::request_bytes("GET", "/.well-known/paracord/server", &[], b""),
                )
                .await
                .is_ok_and(|r| r.status == 200);
                ok.then_some(())
            },
        )
        .await;
    }

    async fn accepted(&self) -> i64 {
        let Ok(mut c) = self.pool.get().await else {
            return -1;
        };
        fe::table
            .filter(fe::status.eq("accepted"))
            .count()
            .get_result(&mut *c)
            .await
            .unwrap_or(-1)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for c in self.serve.iter_mut().chain(self.workers.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct World {
    pg: Postgres,
    redis: Redis,
    alpha: Deployment,
    beta: Deployment,
    gamma: Deployment,
    _dir: tempfile::TempDir,
    /// Held for the whole scenario (dropped last).
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// One scenario at a time: each runs nine processes with their own Postgres and Redis,
/// and two at once on a 2-core machine take longer together than one after the other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn world() -> World {
    let serial = SERIAL.lock().await;
    let pg = Postgres::start().await.unwrap();
    let redis = Redis::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3)
        .map(|_| parafed::devservers::free_port().unwrap())
        .collect();
    let names = ["alpha.test", "beta.test", "gamma.test"];
    let mut deployments = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let short = &name[..name.find('.').unwrap()];
        let db = pg.create_db(short).await.unwrap();
        parafed::store::migrate::run_pending(&db).await.unwrap();
        let pool = parafed::store::pool(&db, 4).unwrap();
        parafed::store::keys::generate(&mut pool.get().await.unwrap(), None)
            .await
            .unwrap();
        let peers: String = names
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, n)| {
                format!(
                    "[peers.\"{n}\"]\nbase_url = \"http://127.0.0.1:{}\"\n",
                    ports[j]
                )
            })
            .collect();
        let metrics = parafed::devservers::free_port().unwrap();
        let cfg = format!(
            "server_name = \"{name}\"\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\
             [database]\nurl = \"{db}\"\npool_size = 16\n\
             [redis]\nurl = \"{redis}\"\nkey_prefix = \"{short}\"\n\
             [federation]\ndiscovery = false\nrate_limit_per_minute = 0\n\
             [worker]\nmetrics_listen = \"127.0.0.1:0\"\nconcurrency = 8\nscheduler_interval_ms = 50\n\
             reconcile_interval_ms = 500\nstale_after_ms = 3000\njob_timeout_ms = 5000\n\
             [delivery]\nbackoff_base_ms = 200\nbackoff_cap_ms = 2000\nrequest_timeout_ms = 2000\nconnect_timeout_ms = 500\n\
             {peers}",
            port = ports[i],
            redis = redis.url(),
        );
        let cfg_path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg_path, cfg).unwrap();
        deployments.push(Deployment {
            name,
            port: ports[i],
            cfg: cfg_path,
            dir: dir.path().to_owned(),
            pool,
            serve: None,
            workers: Vec::new(),
        });
    }
    let gamma = deployments.pop().unwrap();
    let beta = deployments.pop().unwrap();
    let alpha = deployments.pop().unwrap();
    let mut w = World {
        pg,
        redis,
        alpha,
        beta,
        gamma,
        _dir: dir,
        _serial: serial,
    };
    for d in [&mut w.alpha, &mut w.beta, &mut w.gamma] {
        d.start_serve();
        d.start_worker();
    }
    // alpha runs two workers: one may be killed while the other carries on.
    w.alpha.start_worker();
    for d in [&w.alpha, &w.beta, &w.gamma] {
        d.wait_ready().await;
    }
    // alpha hosts the room; beta and gamma are in it.
    let mut c = w.alpha.pool.get().await.unwrap();
    support::host_room(
        &mut c,
        ROOM,
        &[
            ("@b:beta.test", "beta.test"),
            ("@g:gamma.test", "gamma.test"),
        ],
    )
    .await;
    w
}

/// Submits N events to alpha's local API from 16 concurrent clients, each retrying (with
/// the same txn_id) until it gets 202 — as the Paracord app would through an outage.
/// Calls `chaos` once, when half the events were submitted.
async fn run_with(w: &mut World, chaos: impl AsyncFnOnce(&mut World)) {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], w.alpha.port).into();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (next, done) = (next.clone(), done.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= N {
                        return;
                    }
                    let body = json!({"txn_id": format!("c{i}"), "room_id": ROOM, "event_type": "m.message",
                        "sender": "@a:alpha.test", "content": {"n": i}}).to_string();
                    let headers = vec![
                        ("Authorization".to_owned(), "Bearer chaos-local".to_owned()),
                        ("Content-Type".to_owned(), "application/json".to_owned()),
                    ];
                    let deadline = Instant::now() + Duration::from_secs(120);
                    loop {
                        let r = support::app::raw(addr, &support::app::request_bytes("POST", "/_parafed/local/v1/events", &headers, body.as_bytes())).await;
                        match r {
                            Ok(r) if r.status == 202 => break,
                            // An outage answers 503 with Retry-After: never a hang or a 500.
                            Ok(r) if r.status == 503 => {
                                assert!(r.header("retry-after").is_some(), "503 without Retry-After");
                            }
                            Ok(r) => panic!("event {i}: {} {}", r.status, String::from_utf8_lossy(&r.body)),
                            Err(_) => {}
                        }
                        assert!(Instant::now() < deadline, "event {i} never accepted");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let d = done.clone();
    wait_for(
        "half the run submitted",
        Duration::from_secs(300),
        || async { (AtomicUsize::load(&d, Ordering::SeqCst) >= N / 2).then_some(()) },
    )
    .await;
    chaos(w).await;
    for c in clients {
        c.await.unwrap();
    }
    for d in [&w.beta, &w.gamma] {
        let deadline = Duration::from_secs(240);
        let t = Instant::now();
        loop {
            let n = d.accepted().await;
            if n == N as i64 {
                break;
            }
            if t.elapsed() > deadline {
                let diag = diagnose(w, d).await;
                panic!("{} has {n} of {N} events\n{diag}", d.name);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "{N} events to two peers, with the failure, in {:?}",
        started.elapsed()
    );
    // Exactly once at each receiver; every row delivered at alpha.
    for d in [&w.beta, &w.gamma] {
        let rows: i64 = fe::table
            .count()
            .get_result(&mut *d.pool.get().await.unwrap())
            .await
            .unwrap();
        assert_eq!(rows, N as i64, "{}: every event exactly once", d.name);
    }
    let mut c = w.alpha.pool.get().await.unwrap();
    let delivered: i64 = oq::table
        .filter(oq::status.eq("delivered"))
        .count()
        .get_result(&mut *c)
        .await
        .unwrap();
    assert_eq!(
        delivered,
        2 * N as i64,
        "every accepted event delivered to both peers"
    );
    let accepted: i64 = fe::table
        .filter(fe::status.eq("accepted"))
        .count()
        .get_result(&mut *c)
        .await
        .unwrap();
    assert_eq!(accepted, N as i64);
}

/// What a stuck run looks like, for the failure message.
async fn diagnose(w: &World, d: &Deployment) -> String {
    use diesel::dsl::count_star;
    let mut out = String::new();
    for dep in [&w.alpha, d] {
        let mut c = dep.pool.get().await.unwrap();
        let ev: Vec<(String, i64)> = fe::table
            .group_by(fe::status)
            .select((fe::status, count_star()))
            .load(&mut *c)
            .await
            .unwrap();
        let ob: Vec<(String, String, i64)> = oq::table
            .group_by((oq::destination, oq::status))
            .select((oq::destination, oq::status, count_star()))
            .load(&mut *c)
            .await
            .unwrap();
        let health = parafed::store::destinations::get(&mut c, d.name)
            .await
            .unwrap();
        let unfanned: i64 = fe::table
            .filter(fe::status.eq("accepted"))
            .filter(fe::fanned_out_at.is_null())
            .count()
            .get_result(&mut *c)
            .await
            .unwrap();
        out += &format!(
            "{}: events {ev:?} ({unfanned} accepted not fanned out); outbound {ob:?}; health of {}: {health:?}\n",
            dep.name, d.name
        );
        let short = &dep.name[..dep.name.find('.').unwrap()];
        for q in ["verify", "fanout", "deliver"] {
            let ask =
                |cmd: String| support::redis::command_line(w.redis.port, &cmd).unwrap_or_default();
            out += &format!(
                "  {short} {q}: XLEN {} · XPENDING {} · dead {}\n",
                ask(format!("XLEN {short}:q:{q}")),
                ask(format!("XPENDING {short}:q:{q} workers")).replace("\r\n", " "),
                ask(format!("XLEN {short}:dead:{q}")),
            );
        }
    }
    for entry in std::fs::read_dir(&d.dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        out += &format!(
            "--- {} (last lines)\n{}\n",
            entry.file_name().to_string_lossy(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushall_mid_run() {
    let mut w = world().await;
    run_with(&mut w, async |w: &mut World| {
        assert_eq!(
            support::redis::command_line(w.redis.port, "FLUSHALL").unwrap(),
            "+OK"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run() {
    let mut w = world().await;
    run_with(&mut w, async |w: &mut World| {
        w.redis.kill();
        tokio::time::sleep(Duration::from_millis(500)).await; // an outage, not a blip
        w.redis.start_again().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_kill9_mid_run() {
    let mut w = world().await;
    run_with(&mut w, async |w: &mut World| {
        let mut victim = w.alpha.workers.remove(0);
        signal(victim.id(), libc::SIGKILL);
        victim.wait().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_kill9_mid_run() {
    let mut w = world().await;
    run_with(&mut w, async |w: &mut World| {
        // beta's ingress dies; alpha's deliveries fail and back off; beta comes back.
        w.beta.kill9_serve();
        tokio::time::sleep(Duration::from_millis(500)).await;
        w.beta.start_serve();
        w.beta.wait_ready().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_run() {
    let mut w = world().await;
    run_with(&mut w, async |w: &mut World| {
        w.pg.stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        w.pg.start_again().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigterm_mid_run_loses_nothing() {
    let mut w = world().await;
    run_with(&mut w, async |w: &mut World| {
        let mut w0 = w.alpha.workers.remove(0);
        signal(w0.id(), libc::SIGTERM);
        let status = w0.wait().unwrap();
        assert!(
            status.success(),
            "a SIGTERMed worker exits cleanly: {status:?}"
        );
    })
    .await;
    // Nothing stuck: alpha's queues are empty of unacknowledged work.
    let mut c = w.alpha.pool.get().await.unwrap();
    let pending: i64 = oq::table
        .filter(oq::status.ne("delivered"))
        .count()
        .get_result(&mut *c)
        .await
        .unwrap();
    assert_eq!(pending, 0);
}
