//! `parafed-bench`: parafed's load tool. It builds a whole federation on this machine
//! from the real parts and measures it:
//!
//! * throwaway Postgres and Redis (`parafed::devservers`, never the machine's own);
//! * one parafed deployment, `alpha.test`: a `parafed serve` and a `parafed-worker`
//!   process (the binaries next to this one), hosting one room;
//! * in this process, on 127.0.0.1: the source peer (`source.test`, a room member whose
//!   signed events are posted to alpha) and K sink peers (`sinkN.test`, room members)
//!   that check alpha's transport signature and the source's envelope signature on
//!   every delivery, answer 202 with its receipt, and count what they receive.
//!
//! It reports (1) ingest: signed `POST /event` accepted per second at a stated
//! concurrency, with p50/p99 latency, and the generator's own CPU; (2) delivery: events
//! per second arriving at the K peers, from the first post to the last arrival; (3) end
//! to end latency, posted → received by a sink, p50/p99 (`--rate R` posts at a steady
//! R events/s); (4) with `--backlog`, the sinks answer 503 until every delivery waits
//! for them, then come back: the time from their first success to the last delivery;
//! (5) with `--isolation`, the same load without and with `--dead N` dead peers in the
//! room (half refusing connections, half never answering), four runs in the order
//! without, with, with, without: the healthy peers' rate as a share; (6) the peak RSS of each parafed process. Beside them, where the CPU went
//! (per process, per delivery; Postgres' also by kind of process) and what Postgres did
//! (`pg_stat_statements`: statements and commits per delivery, the costliest statements
//! in the JSON), the drain's rounds to the first sink, and the machine itself: an
//! ed25519 verification timed before the run, and the shares of its CPU time that were
//! busy and that the hypervisor stole, so that runs from different sessions can be told
//! apart.
//!
//! The events are signed before the clock starts; each request's transport signature
//! (which carries the time) is made when it is sent. `--ingest-alone` starts the worker
//! only once every event is posted, so ingest is measured without verify, fan-out and
//! delivery on the same cores; `--warm` first sends one event to every sink, so the run
//! starts with peers alpha has reached, as in a federation that has been running. Every
//! run also splits the time inside alpha by the rows' own times (stored → accepted →
//! first request sent → answered, p50/p99 for the first sink).
//!
//! Output: a markdown table on stdout, and with `--json FILE` the same figures as JSON.
//! `--small` is the CI smoke run: it checks counts — every event accepted, every sink
//! got every event exactly once, every signature valid — and exits 1 if not; it never
//! judges speed. Settings are parafed's defaults, except no rate limit, a high in-flight
//! cap (one generator is every request), and `backoff_cap_ms = 10000` (a backlog run
//! would otherwise wait up to an hour for the sinks' next probe; the figure is timed
//! from that probe either way). `PARAFED_*` variables reach the two parafed processes,
//! e.g. `PARAFED_DELIVERY_WINDOW=64`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use parafed::devservers::{self, spawn::spawn_tied, Postgres, Redis};
use parafed::protocol::envelope::Signatures;
use parafed::protocol::{
    Envelope, EventId, EventType, KeyId, Keypair, PublicKey, RoomId, ServerName, TransportHeaders,
    UserId,
};
use parafed::remote::HttpClient;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "parafed-bench",
    about = "Load tool: ingest and delivery through a real parafed"
)]
struct Cli {
    /// Events the source posts.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Requests the source has in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Sink peers in the room (each gets every event).
    #[arg(long, default_value_t = 1)]
    peers: u32,
    /// The backlog run: the sinks answer 503 while every event is posted (their
    /// deliveries pile up and the destinations back off), then come back; reports the
    /// time from the first successful delivery to the last.
    #[arg(long)]
    backlog: bool,
    /// Dead peers in the room besides the sinks: half refuse connections, half accept
    /// and never answer.
    #[arg(long, default_value_t = 0)]
    dead: u32,
    /// The isolation run: the same load four times, without dead peers and with `--dead`
    /// (1 000 if not given) of them, in the order without, with, with, without; reports
    /// the healthy peers' delivery rate with them as a share of the rate without.
    #[arg(long)]
    isolation: bool,
    /// The CI smoke run: 200 events, 2 peers; checks counts only.
    #[arg(long)]
    small: bool,
    /// Start the worker only once every event is posted: ingest measured alone, without
    /// verify, fan-out and delivery sharing the cores with it; delivery is then timed
    /// from the worker's start.
    #[arg(long)]
    ingest_alone: bool,
    /// Before the measured run, post one event and wait until every sink has it (then
    /// forget it; with `--backlog` the sinks go down after it): the
    /// sinks are then peers alpha knows and has reached, as in a federation that has been
    /// running (without it, the run includes the first contact, when a new peer's
    /// events go through a deferral until the room is quiet: `delivery::deferral`).
    #[arg(long, conflicts_with = "ingest_alone")]
    warm: bool,
    /// Post at this steady rate (events per second) instead of as fast as the
    /// concurrency allows: the end-to-end latency measurement.
    #[arg(long)]
    rate: Option<u64>,
    /// An extra Postgres setting (`name=value`, repeatable), for a profile: e.g.
    /// `--pg-setting shared_preload_libraries=pg_stat_statements,auto_explain
    /// --pg-setting auto_explain.log_min_duration=5ms`. The Postgres log is then kept in
    /// `$TMPDIR/parafed-bench-postgres.log`.
    #[arg(long)]
    pg_setting: Vec<String>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

const ROOM: &str = "!bench:alpha.test";

/// What the binaries were built for, as far as their figures depend on it: the
/// instruction sets compiled in. Built for a CPU with AVX-512 IFMA (`RUSTFLAGS='-C
/// target-cpu=native'` on one), curve25519-dalek inlines its fastest routines: about
/// 40 % off every ed25519 verification (docs/performance.md, eighth round;
/// docs/operations.md, "Building for the host CPU"). The load tool is built by the
/// same `cargo build` as the two parafed binaries, with the same flags.
const BUILD: &str = if cfg!(all(
    target_feature = "avx512ifma",
    target_feature = "avx512vl"
)) {
    "for CPUs with AVX-512 IFMA (e.g. `-C target-cpu=native` on one)"
} else if cfg!(target_feature = "avx2") {
    "for CPUs with AVX2"
} else {
    "portable (curve25519-dalek picks its AVX2 code at run time if the CPU has it)"
};

/// What the sinks saw.
#[derive(Default)]
struct Sinks {
    /// Per sink: event id → times received.
    received: Mutex<HashMap<String, HashMap<String, u32>>>,
    bad_signatures: AtomicU64,
    deliveries: AtomicU64,
    last_arrival: Mutex<Option<Instant>>,
    /// The backlog run: while set, the sinks answer 503 to every delivery.
    down: std::sync::atomic::AtomicBool,
    /// The first delivery a sink accepted (after coming back, in the backlog run).
    first_accepted: Mutex<Option<Instant>>,
    /// When the source posted each event (event id → instant).
    submitted: Mutex<HashMap<String, Instant>>,
    /// End-to-end latency of every delivery: posted to alpha → received by a sink (ms).
    end_to_end_ms: Mutex<Vec<f64>>,
}

impl Sinks {
    /// Forgets what the sinks received (after the warm-up).
    fn reset(&self) {
        fn clear<T: Default>(m: &Mutex<T>) {
            *m.lock().unwrap_or_else(|p| p.into_inner()) = T::default();
        }
        clear(&self.received);
        clear(&self.last_arrival);
        clear(&self.first_accepted);
        clear(&self.submitted);
        clear(&self.end_to_end_ms);
        self.deliveries.store(0, Ordering::Relaxed);
    }
}

/// The keys the sinks check with.
struct Keys {
    alpha: PublicKey,
    source: Keypair,
}

type Body = Full<Bytes>;

fn answer(status: u16, body: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// One request to the peers' server: `/source/…/keys`, or `/sinkN/…/event`.
async fn handle(
    sinks: Arc<Sinks>,
    keys: Arc<Keys>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let prefix = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned();
    if prefix == "source" && path.ends_with("/keys") {
        return Ok(answer(
            200,
            json!({
                "keys": [{"key_id": keys.source.key_id(), "public_key": keys.source.public_key_hex(),
                          "server_name": "source.test",
                          "valid_until": parafed::time::now_ms() + 86_400_000}],
                "server_name": "source.test",
            }),
        ));
    }
    if !prefix.starts_with("sink") || !path.ends_with("/event") {
        return Ok(answer(404, json!({"error": "not found"})));
    }
    if sinks.down.load(Ordering::Relaxed) {
        return Ok(answer(503, json!({"error": "down for the backlog run"})));
    }
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let headers = (
        h("x-paracord-origin"),
        h("x-paracord-key-id"),
        h("x-paracord-timestamp"),
        h("x-paracord-signature"),
    );
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Ok(answer(400, json!({"error": "body"})));
    };
    let transport_ok = TransportHeaders::parse(
        headers.0.as_deref(),
        headers.1.as_deref(),
        headers.2.as_deref(),
        headers.3.as_deref(),
    )
    .is_ok_and(|t| t.verify(&keys.alpha, "POST", &path, &body).is_ok());
    let envelope = Envelope::from_wire(&body).ok();
    let envelope_ok = envelope.as_ref().is_some_and(|e| {
        e.verify(|kid| (kid == keys.source.key_id()).then(|| keys.source.public_key()))
            .is_ok()
    });
    let Some(env) = envelope.filter(|_| transport_ok && envelope_ok) else {
        sinks.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return Ok(answer(403, json!({"error": "bad signature"})));
    };
    let id = env.event_id.to_string();
    *sinks
        .received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(prefix)
        .or_default()
        .entry(id.clone())
        .or_default() += 1;
    sinks.deliveries.fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    sinks
        .first_accepted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert(now);
    *sinks.last_arrival.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
    let posted = sinks
        .submitted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .copied();
    if let Some(t) = posted {
        sinks
            .end_to_end_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(now.duration_since(t).as_secs_f64() * 1000.0);
    }
    Ok(answer(202, json!({"event_id": id, "inserted": true})))
}

async fn serve_peers(listener: tokio::net::TcpListener, sinks: Arc<Sinks>, keys: Arc<Keys>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (sinks, keys) = (sinks.clone(), keys.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req| handle(sinks.clone(), keys.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to {}; build with `cargo build --release --workspace`",
            name,
            exe.display()
        );
    }
    Ok(p)
}

fn spawn(bin: &Path, args: &[&str], cfg: &Path, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(cfg)
        .args(args)
        // Warnings only, unless `PARAFED_LOG` says otherwise (for a profile: the logs
        // are in the run's directory, `$TMPDIR/parafed-dev-<pid>-bench-<n>/`).
        .env(
            "PARAFED_LOG",
            std::env::var("PARAFED_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    Ok(spawn_tied(cmd)?)
}

/// Peak resident memory of a process (`VmHWM`, kB).
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds a process has used (user + system), from `/proc/<pid>/stat`.
fn process_cpu_secs(pid: u32) -> f64 {
    proc_stat(pid).map_or(0.0, |s| s.own)
}

/// What `/proc/<pid>/stat` says of a process, read once: its parent, its CPU seconds
/// (user + system), and those of its children that exited and were waited for (cutime
/// + cstime). `None` once the process is gone.
struct ProcStat {
    ppid: Option<u32>,
    own: f64,
    children: f64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, so split after its ')').
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // `rest` starts at field 3: ppid is field 4; utime, stime, cutime and cstime are
    // fields 14 to 17.
    Some(ProcStat {
        ppid: f.get(1).and_then(|v| v.parse().ok()),
        own: (ticks(11) + ticks(12)) / hz,
        children: (ticks(13) + ticks(14)) / hz,
    })
}

/// Postgres' CPU seconds so far, by kind of process: the backends serving connections,
/// autovacuum's workers (and launcher), the other background processes (the postmaster,
/// WAL writer, checkpointer, background writer…), and the processes that exited (the
/// postmaster's waited-for children: mostly autovacuum workers, which live for one
/// table's vacuum or analyze — a reading of live processes alone misses them).
#[derive(Clone, Copy, Default)]
struct PostgresCpu {
    backends: f64,
    autovacuum: f64,
    background: f64,
    exited: f64,
}

impl PostgresCpu {
    fn total(&self) -> f64 {
        self.backends + self.autovacuum + self.background + self.exited
    }

    fn since(&self, start: &PostgresCpu) -> PostgresCpu {
        PostgresCpu {
            backends: self.backends - start.backends,
            autovacuum: self.autovacuum - start.autovacuum,
            background: self.background - start.background,
            exited: self.exited - start.exited,
        }
    }
}

/// [`PostgresCpu`] of the postmaster `root` and its live children, told apart by the
/// titles Postgres gives them (`/proc/<pid>/cmdline`: a backend's names its client's
/// address, `postgres: user db 127.0.0.1(port) idle`).
fn postgres_cpu(root: u32) -> PostgresCpu {
    let root_stat = proc_stat(root);
    let mut cpu = PostgresCpu {
        background: root_stat.as_ref().map_or(0.0, |s| s.own),
        exited: root_stat.as_ref().map_or(0.0, |s| s.children),
        ..PostgresCpu::default()
    };
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(stat) = proc_stat(pid).filter(|s| s.ppid == Some(root)) else {
                continue;
            };
            let title = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let secs = stat.own;
            if title.contains("autovacuum") {
                cpu.autovacuum += secs;
            } else if title.contains('(') || title.contains("[local]") {
                cpu.backends += secs;
            } else {
                cpu.background += secs;
            }
        }
    }
    cpu
}

/// What Postgres did for alpha's database, from `pg_stat_statements` and
/// `pg_stat_database`.
#[derive(Default)]
struct DbWork {
    statements: i64,
    commits: i64,
    /// The costliest statements, by execution and planning time together.
    top: Vec<Statement>,
}

#[derive(diesel::QueryableByName)]
struct Counts {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    statements: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    commits: i64,
}

#[derive(diesel::QueryableByName)]
struct Statement {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    calls: i64,
    /// Execution time over the run, ms.
    #[diesel(sql_type = diesel::sql_types::Double)]
    total_ms: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    mean_ms: f64,
    /// Plans made and the time they took, ms: zero unless the run sets
    /// `--pg-setting pg_stat_statements.track_planning=on`.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    plans: i64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    plan_ms: f64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    query: String,
}

/// Resets the statement statistics; returns the commit count so far.
async fn db_work_start(url: &str) -> anyhow::Result<i64> {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let mut c = diesel_async::AsyncPgConnection::establish(url).await?;
    diesel::sql_query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&mut c)
        .await?;
    diesel::sql_query("SELECT pg_stat_statements_reset()")
        .execute(&mut c)
        .await?;
    Ok(db_counts(&mut c).await?.commits)
}

async fn db_counts(c: &mut diesel_async::AsyncPgConnection) -> anyhow::Result<Counts> {
    use diesel_async::RunQueryDsl;
    Ok(diesel::sql_query(
        "SELECT (SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements s \
                  JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database()) \
                  AS statements, \
                (SELECT xact_commit FROM pg_stat_database \
                  WHERE datname = current_database()) AS commits",
    )
    .get_result(c)
    .await?)
}

async fn db_work_end(url: &str, commits_before: i64) -> anyhow::Result<DbWork> {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let mut c = diesel_async::AsyncPgConnection::establish(url).await?;
    let counts = db_counts(&mut c).await?;
    let top: Vec<Statement> = diesel::sql_query(
        "SELECT calls, total_exec_time AS total_ms, mean_exec_time AS mean_ms, plans, \
                total_plan_time AS plan_ms, \
                left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query \
           FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
          WHERE d.datname = current_database() \
          ORDER BY total_exec_time + total_plan_time DESC LIMIT 40",
    )
    .load(&mut c)
    .await?;
    Ok(DbWork {
        statements: counts.statements,
        commits: counts.commits - commits_before,
        top,
    })
}

/// Deliveries owed to `destination` and not made: its waiting rows, and the events of
/// its deferrals' rooms after their cursors that are fanned out and have no row of it
/// yet (`store::deferrals`: a peer that is down is owed a room's events without a row
/// per event). Unlike fan-out, it does not leave out events the destination itself
/// sent: the sinks send none here.
async fn owed_to(
    conn: &mut diesel_async::AsyncPgConnection,
    destination: &str,
) -> anyhow::Result<i64> {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Owed {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let o: Owed = diesel::sql_query(
        "SELECT (SELECT count(*) FROM outbound_queue \
                  WHERE destination = $1 AND status = 'pending') \
              + (SELECT count(*) FROM outbound_deferrals f \
                   JOIN federation_events e ON e.room_id = f.room_id AND e.seq > f.from_seq \
                        AND (f.until_seq IS NULL OR e.seq <= f.until_seq) \
                  WHERE f.destination = $1 AND e.status = 'accepted' \
                    AND e.fanned_out_at IS NOT NULL \
                    AND NOT EXISTS (SELECT 1 FROM outbound_queue o \
                                     WHERE o.destination = $1 AND o.event_id = e.event_id)) \
                AS n",
    )
    .bind::<diesel::sql_types::Text, _>(destination)
    .get_result(conn)
    .await?;
    Ok(o.n)
}

/// Where an event's time went inside alpha, from the rows' own times: each field is
/// `[p50, p99]` in ms (`[0, 0]` without rows) over the run's events that had a first
/// attempt to the first sink (answered or not: in the backlog run, the 503s). Stored →
/// accepted (`received_at` → `verified_at`: the verify job's wait and run); accepted →
/// sent (→ the first attempt's `attempted_at`, written just before its request goes
/// out: fan-out, the destination's drain); sent → answered (→ its `finished_at`, when
/// the answer was recorded with its round's: the request, the sink's answer and the
/// round's other requests). With `--ingest-alone` the first two include the wait for
/// the worker.
#[derive(Default, diesel::QueryableByName)]
struct Stages {
    #[diesel(sql_type = diesel::sql_types::Array<diesel::sql_types::Double>)]
    accepted: Vec<f64>,
    #[diesel(sql_type = diesel::sql_types::Array<diesel::sql_types::Double>)]
    sent: Vec<f64>,
    #[diesel(sql_type = diesel::sql_types::Array<diesel::sql_types::Double>)]
    answered: Vec<f64>,
}

async fn stages(url: &str) -> anyhow::Result<Stages> {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let mut c = diesel_async::AsyncPgConnection::establish(url).await?;
    Ok(diesel::sql_query(
        "WITH t AS ( \
           SELECT extract(epoch FROM e.verified_at - e.received_at) * 1000 AS accepted, \
                  extract(epoch FROM a.attempted_at - e.verified_at) * 1000 AS sent, \
                  extract(epoch FROM a.finished_at - a.attempted_at) * 1000 AS answered \
             FROM federation_events e \
             JOIN delivery_attempts a ON a.event_id = e.event_id AND a.attempt = 1 \
            WHERE a.destination = 'sink0.test' AND a.request_kind = 'event' \
              AND e.event_id LIKE '$bench%') \
         SELECT coalesce(percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY accepted), \
                         ARRAY[0, 0]::float8[]) AS accepted, \
                coalesce(percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY sent), \
                         ARRAY[0, 0]::float8[]) AS sent, \
                coalesce(percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY answered), \
                         ARRAY[0, 0]::float8[]) AS answered \
           FROM t",
    )
    .get_result(&mut c)
    .await?)
}

/// How fast this machine is at the work that dominates a run, measured before the run
/// on one core: microseconds per strict ed25519 verification
/// (`protocol::PublicKey::verify`, what the ingress and the sinks do twice per request),
/// the median of five timings of 400. Figures from different sessions differ by up to
/// twofold on machines of the same kind (docs/performance.md, "Machine"); this one
/// says which kind of session a run came from.
fn verify_us() -> anyhow::Result<f64> {
    let key = Keypair::generate(KeyId::parse("ed25519:auto")?);
    let public = key.public_key();
    let msg = [7u8; 256];
    let sig = key.sign(&msg);
    let mut timings: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..400 {
                std::hint::black_box(public.verify(std::hint::black_box(&msg), &sig));
            }
            t.elapsed().as_secs_f64() * 1e6 / 400.0
        })
        .collect();
    timings.sort_by(|a, b| a.total_cmp(b));
    Ok(timings[2])
}

/// The machine's CPU time so far (all cores, `/proc/stat`'s first line, in clock
/// ticks): busy (user, nice, system, irq, softirq), idle (idle, iowait) and steal (time
/// the hypervisor gave this machine's virtual CPUs to others while they had work).
#[derive(Clone, Copy, Default)]
struct MachineTicks {
    busy: u64,
    idle: u64,
    steal: u64,
}

fn machine_ticks() -> MachineTicks {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return MachineTicks::default();
    };
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    MachineTicks {
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        idle: at(3) + at(4),
        steal: at(7),
    }
}

/// The shares (per cent) of the machine's CPU time between two readings that were busy
/// and stolen.
fn machine_shares(from: MachineTicks, to: MachineTicks) -> (f64, f64) {
    let busy = to.busy.saturating_sub(from.busy) as f64;
    let idle = to.idle.saturating_sub(from.idle) as f64;
    let steal = to.steal.saturating_sub(from.steal) as f64;
    let all = (busy + idle + steal).max(1.0);
    (100.0 * busy / all, 100.0 * steal / all)
}

/// The drain's rounds to the first sink, from the attempt rows: a round is the
/// attempts begun by one statement (one `attempted_at`), each with its request's own
/// latency (`latency_ms`, from just before its transport signature to its answer).
/// Medians over the rounds of at least two requests: the requests in a round, the
/// period (from its start to the next round's), its slowest request and its requests'
/// mean. `mean / period` is the share of a round a window slot has a request out: what
/// a window kept full (a request sent as each is answered) could at most gain on
/// (docs/performance.md, "Drain rounds that overlap").
#[derive(Default, diesel::QueryableByName)]
struct Rounds {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    rounds: i64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    requests: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    period_ms: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    slowest_ms: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    mean_ms: f64,
}

async fn rounds(url: &str) -> anyhow::Result<Rounds> {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let mut c = diesel_async::AsyncPgConnection::establish(url).await?;
    Ok(diesel::sql_query(
        "WITH r AS ( \
           SELECT attempted_at AS at, count(*) AS n, max(latency_ms) AS slowest, \
                  avg(latency_ms) AS mean \
             FROM delivery_attempts \
            WHERE destination = 'sink0.test' AND request_kind = 'event' \
              AND latency_ms IS NOT NULL \
            GROUP BY attempted_at), \
         p AS ( \
           SELECT n, slowest, mean, \
                  extract(epoch FROM lead(at) OVER (ORDER BY at) - at) * 1000 AS period \
             FROM r) \
         SELECT count(*) AS rounds, \
                coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY n), 0) AS requests, \
                coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY period), 0) AS period_ms, \
                coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY slowest), 0) AS slowest_ms, \
                coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY mean), 0)::float8 AS mean_ms \
           FROM p WHERE n >= 2 AND period IS NOT NULL",
    )
    .get_result(&mut c)
    .await?)
}

/// CPU seconds this process has used (user + system).
fn own_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn event(source: &Keypair, n: u64) -> anyhow::Result<Vec<u8>> {
    event_tagged(source, "bench", n)
}

/// The `n`th message of the source, with event id `${tag}{n}:source.test`.
fn event_tagged(source: &Keypair, tag: &str, n: u64) -> anyhow::Result<Vec<u8>> {
    let mut e = Envelope {
        event_id: EventId::parse(&format!("${tag}{n}:source.test"))?,
        room_id: RoomId::parse(ROOM)?,
        event_type: EventType::parse("m.message")?,
        sender: UserId::parse("@s:source.test")?,
        origin_server: ServerName::parse("source.test")?,
        origin_ts: parafed::time::now_ms(),
        content: json!({"body": format!("load {n}"), "message_id": format!("{tag}{n}")}),
        depth: n as i64,
        state_key: None,
        signatures: Signatures::default(),
    };
    e.sign(source);
    Ok(e.to_wire())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    parafed::telemetry::init();
    let mut cli = Cli::parse();
    if cli.small {
        cli.events = 200;
        cli.peers = 2;
        cli.concurrency = 8;
    }
    let outcome = if cli.isolation {
        isolation(&mut cli).await
    } else {
        run(&cli).await.map(|(ok, _)| ok)
    };
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// (5) isolation: the healthy peers' delivery rate with dead peers in the room, as a
/// share of the rate without them. Four runs, each on a fresh federation, in the order
/// without, with, with, without: on a shared machine the second of two runs in a row
/// can be several per cent slower whatever it runs (docs/performance.md, tenth round),
/// so each kind runs once first and once second, and the share is the rate with dead
/// peers summed over its runs against the rate without, summed the same way.
async fn isolation(cli: &mut Cli) -> anyhow::Result<bool> {
    let dead = if cli.dead == 0 { 1000 } else { cli.dead };
    let json = cli.json.take();
    let rate = |v: &serde_json::Value| {
        v["delivery"]["deliveries_per_second"]
            .as_f64()
            .unwrap_or(0.0)
    };
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut ok = true;
    for (i, with_dead) in [false, true, true, false].into_iter().enumerate() {
        cli.dead = if with_dead { dead } else { 0 };
        if with_dead {
            println!(
                "\n### run {} of 4: with {dead} dead peers (half refusing, half never answering)\n",
                i + 1
            );
        } else {
            println!("\n### run {} of 4: without dead peers\n", i + 1);
        }
        let (ok_run, figures) = run(cli).await?;
        ok &= ok_run;
        if with_dead {
            with.push(figures);
        } else {
            without.push(figures);
        }
    }
    let sum = |runs: &[serde_json::Value]| runs.iter().map(rate).sum::<f64>();
    let share = sum(&with) / sum(&without).max(1e-9);
    let list = |runs: &[serde_json::Value]| {
        runs.iter()
            .map(|v| format!("{:.0}", rate(v)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\n| isolation: healthy delivery rate with {dead} dead peers (runs 2, 3) / without (runs 1, 4) | {} / {} deliveries/s = {:.0} % |",
        list(&with),
        list(&without),
        share * 100.0
    );
    if let Some(path) = json {
        let all = json!({"without": without, "with_dead_peers": with, "dead_peers": dead,
                         "order": ["without", "with", "with", "without"], "share": share});
        std::fs::write(&path, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ok)
}

/// Dead peers' addresses: a port nothing listens on (connections refused), and a
/// listener that accepts connections and never reads or answers them.
async fn dead_peers() -> anyhow::Result<(String, String)> {
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = blackhole.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = blackhole.accept().await {
            held.push(stream);
        }
    });
    Ok((format!("http://{refused}"), format!("http://{addr}")))
}

/// Posts one event to alpha as the source, transport-signed; the answer's status (0 if
/// none came).
async fn post_signed(
    client: &HttpClient,
    source: &Keypair,
    name: &ServerName,
    url: &str,
    body: Bytes,
) -> u16 {
    let t = TransportHeaders::sign(
        source,
        name,
        "POST",
        "/_paracord/federation/v1/event",
        parafed::time::now_ms(),
        &body,
    );
    let mut headers: Vec<(&str, String)> = t.to_header_pairs().into_iter().collect();
    headers.push(("content-type", "application/json".into()));
    client
        .send(Method::POST, url, &headers, body, 4096)
        .await
        .map_or(0, |r| r.status.as_u16())
}

async fn run(cli: &Cli) -> anyhow::Result<(bool, serde_json::Value)> {
    // Before anything of the run starts: the machine's speed, on one core.
    let verify_us = verify_us()?;
    let serve_bin = sibling("parafed")?;
    let worker_bin = sibling("parafed-worker")?;
    // pg_stat_statements: statements per delivered event, and where the time goes.
    let extra = &cli.pg_setting;
    let mut settings = vec![
        "shared_preload_libraries=pg_stat_statements",
        // Top-level statements only: the foreign-key checks each inserted row runs would
        // count as statements of their own.
        "pg_stat_statements.track=top",
    ];
    settings.extend(extra.iter().map(String::as_str));
    let pg = Postgres::start_with(&settings).await?;
    let redis = Redis::start().await?;
    let dir = devservers::server_dir("bench")?;
    let db = pg.create_db("alpha").await?;
    parafed::store::migrate::run_pending(&db).await?;
    let pool = parafed::store::pool(&db, 2)?;
    let alpha_key = {
        let mut conn = pool.get().await?;
        let info = parafed::store::keys::generate(&mut conn, None).await?;
        use parafed::store::rooms;
        rooms::upsert_hosted(
            &mut conn,
            &rooms::HostedRoom {
                room_id: ROOM.into(),
                guild_id: "bench".into(),
                guild_name: "Bench".into(),
                default_channel_id: None,
            },
        )
        .await?;
        let mut members = vec![("@s:source.test".to_owned(), "source.test".to_owned())];
        for k in 0..cli.peers {
            members.push((format!("@u:sink{k}.test"), format!("sink{k}.test")));
        }
        for k in 0..cli.dead {
            members.push((format!("@u:dead{k}.test"), format!("dead{k}.test")));
        }
        for (user, server) in &members {
            rooms::set_member(
                &mut conn,
                ROOM,
                user,
                server,
                rooms::Membership::Joined,
                None,
            )
            .await?;
            rooms::refresh_room_server(&mut conn, ROOM, server).await?;
        }
        PublicKey::from_hex(&info.public_key)?
    };
    let source = Keypair::generate(KeyId::parse("ed25519:auto")?);
    let sinks = Arc::new(Sinks::default());
    let keys = Arc::new(Keys {
        alpha: alpha_key,
        source: source.clone(),
    });
    // With `--warm`, the sinks go down (the backlog run) after the warm-up.
    sinks
        .down
        .store(cli.backlog && !cli.warm, Ordering::Relaxed);
    let (refused_url, blackhole_url) = dead_peers().await?;
    let peers_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let peers_base = format!("http://{}", peers_listener.local_addr()?);
    tokio::spawn(serve_peers(peers_listener, sinks.clone(), keys.clone()));

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cfg = format!(
        "server_name = \"alpha.test\"\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"{db}\"\n\
         [redis]\nurl = \"{}\"\nkey_prefix = \"bench\"\n\
         [federation]\ndiscovery = false\nrate_limit_per_minute = 0\nmax_in_flight_per_peer = 100000\n\
         [worker]\nmetrics_listen = \"127.0.0.1:0\"\n\
         [delivery]\nbackoff_cap_ms = 10000\n\
         [peers.\"source.test\"]\nbase_url = \"{peers_base}/source\"\n",
        redis.url()
    );
    for k in 0..cli.peers {
        cfg.push_str(&format!(
            "[peers.\"sink{k}.test\"]\nbase_url = \"{peers_base}/sink{k}\"\n"
        ));
    }
    for k in 0..cli.dead {
        let url = if k % 2 == 0 {
            &refused_url
        } else {
            &blackhole_url
        };
        cfg.push_str(&format!("[peers.\"dead{k}.test\"]\nbase_url = \"{url}\"\n"));
    }
    let cfg_path = dir.join("alpha.toml");
    std::fs::write(&cfg_path, cfg)?;
    let mut serve = spawn(&serve_bin, &["serve"], &cfg_path, &dir.join("serve.log"))?;
    let start_worker = || spawn(&worker_bin, &[], &cfg_path, &dir.join("worker.log"));
    let worker = if cli.ingest_alone {
        None
    } else {
        Some(start_worker()?)
    };
    let alpha = format!("http://127.0.0.1:{port}");
    let client = HttpClient::new(Duration::from_secs(2), Duration::from_secs(30));
    {
        let c = client.clone();
        let url = format!("{alpha}/.well-known/paracord/server");
        devservers::wait_until("parafed serve to answer", Duration::from_secs(30), || {
            let (c, url) = (c.clone(), url.clone());
            async move {
                c.send(Method::GET, &url, &[], Bytes::new(), 4096)
                    .await
                    .ok()
                    .filter(|r| r.status.is_success())
            }
        })
        .await?;
    }

    // (1) ingest, and the start of (2): every event posted at the stated concurrency
    // (or at the stated steady rate).
    let url = format!("{alpha}/_paracord/federation/v1/event");
    let name = ServerName::parse("source.test")?;
    if cli.warm {
        let body = event_tagged(&source, "warm", 0)?;
        let status = post_signed(&client, &source, &name, &url, body.into()).await;
        if status != 202 {
            bail!("the warm-up event was answered {status}");
        }
        devservers::wait_until(
            "every sink to have the warm-up event",
            Duration::from_secs(120),
            || {
                let sinks = sinks.clone();
                async move {
                    let received = sinks.received.lock().unwrap_or_else(|p| p.into_inner());
                    (0..cli.peers)
                        .all(|k| {
                            received
                                .get(&format!("sink{k}"))
                                .is_some_and(|m| m.contains_key("$warm0:source.test"))
                        })
                        .then_some(())
                }
            },
        )
        .await?;
        sinks.reset();
        sinks.down.store(cli.backlog, Ordering::Relaxed);
    }
    let commits_before = db_work_start(&db).await?;
    let pg_pid = pg.pid().unwrap_or(0);
    let redis_pid = redis.pid().unwrap_or(0);
    let worker_cpu = |w: &Option<Child>| w.as_ref().map_or(0.0, |w| process_cpu_secs(w.id()));
    let pg_at_start = postgres_cpu(pg_pid);
    let cpu_at_start = [
        process_cpu_secs(serve.id()),
        worker_cpu(&worker),
        pg_at_start.total(),
        process_cpu_secs(redis_pid),
    ];
    // The events are signed before the clock starts (an envelope signature has no
    // freshness), so the generator's CPU in the run is its requests: their transport
    // signatures (which carry the time) and HTTP.
    let events: Arc<Vec<(String, Bytes)>> = Arc::new(
        (0..cli.events)
            .map(|n| Ok((format!("$bench{n}:source.test"), event(&source, n)?.into())))
            .collect::<anyhow::Result<_>>()?,
    );
    let cpu_before = own_cpu_secs();
    let machine_at_start = machine_ticks();
    let started = Instant::now();
    let post = |n: u64| {
        let (client, source, name, url, sinks, events) = (
            client.clone(),
            source.clone(),
            name.clone(),
            url.clone(),
            sinks.clone(),
            events.clone(),
        );
        async move {
            let Some((id, body)) = events.get(n as usize).cloned() else {
                return (0, 0.0);
            };
            let sent = Instant::now();
            sinks
                .submitted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, sent);
            let status = post_signed(&client, &source, &name, &url, body).await;
            (status, sent.elapsed().as_secs_f64() * 1000.0)
        }
    };
    use futures::StreamExt;
    let results: Vec<(u16, f64)> = match cli.rate {
        Some(rate) => {
            let mut ticker =
                tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
            let mut posts = Vec::with_capacity(cli.events as usize);
            for n in 0..cli.events {
                ticker.tick().await;
                posts.push(tokio::spawn(post(n)));
            }
            futures::future::join_all(posts)
                .await
                .into_iter()
                .map(|r| r.unwrap_or((0, 0.0)))
                .collect()
        }
        None => {
            futures::stream::iter(0..cli.events)
                .map(post)
                .buffer_unordered(cli.concurrency.max(1))
                .collect()
                .await
        }
    };
    let ingest_secs = started.elapsed().as_secs_f64();
    let generator_cpu = own_cpu_secs() - cpu_before;
    let accepted = results.iter().filter(|(s, _)| *s == 202).count() as u64;
    // Where the CPU went while posting, per accepted event.
    let ingest_cpu: Vec<f64> = [
        process_cpu_secs(serve.id()),
        worker_cpu(&worker),
        postgres_cpu(pg_pid).total(),
        process_cpu_secs(redis_pid),
    ]
    .iter()
    .zip(cpu_at_start)
    .map(|(e, s)| e - s)
    .chain([generator_cpu])
    .map(|s| s * 1000.0 / accepted.max(1) as f64)
    .collect();
    // With `--ingest-alone`, delivery starts now.
    let (mut worker, delivery_from) = match worker {
        Some(w) => (w, started),
        None => (start_worker()?, Instant::now()),
    };
    let mut latencies: Vec<f64> = results.iter().map(|(_, l)| *l).collect();
    latencies.sort_by(|a, b| a.total_cmp(b));

    // (4) backlog: every delivery is waiting for the sinks (posted, verified, fanned
    // out, owed to each sink as a row or through its deferral); then they come back,
    // and the drain is timed from their first success.
    let want = accepted * u64::from(cli.peers);
    if cli.backlog {
        let pool = parafed::store::pool(&db, 1)?;
        devservers::wait_until(
            "every delivery to wait for the sinks",
            Duration::from_secs(3600),
            || {
                let pool = pool.clone();
                async move {
                    // Counting 100 000 owed deliveries is not free: look twice a second.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let mut conn = pool.get().await.ok()?;
                    let mut owed = 0;
                    for k in 0..cli.peers {
                        match owed_to(&mut conn, &format!("sink{k}.test")).await {
                            Ok(n) => owed += n,
                            Err(e) => {
                                eprintln!("counting what the sinks are owed failed: {e:#}");
                                return None;
                            }
                        }
                    }
                    (owed as u64 >= want).then_some(())
                }
            },
        )
        .await?;
        sinks.down.store(false, Ordering::Relaxed);
    }
    let back_at = Instant::now();

    // (2) delivery: until every sink has every event (or nothing arrives for a while).
    let mut last_count = 0;
    let mut last_progress = Instant::now();
    loop {
        let n = sinks.deliveries.load(Ordering::Relaxed);
        if n >= want {
            break;
        }
        if n != last_count {
            last_count = n;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "delivery stalled at {n} of {want}; logs in {}",
                dir.display()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = sinks
        .last_arrival
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or(started);
    let delivery_secs = last
        .saturating_duration_since(delivery_from)
        .as_secs_f64()
        .max(1e-9);
    let delivered = sinks.deliveries.load(Ordering::Relaxed);
    // The backlog run: from the sinks' return to their first success (the destination's
    // backoff ending), and from then to the last delivery.
    let backlog = cli.backlog.then(|| {
        let first = sinks
            .first_accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(last);
        (
            first.saturating_duration_since(back_at).as_secs_f64(),
            last.saturating_duration_since(first).as_secs_f64(),
        )
    });
    let serve_rss = peak_rss_kb(serve.id());
    let worker_rss = peak_rss_kb(worker.id());
    let pg_at_end = postgres_cpu(pg_pid);
    let pg_cpu = pg_at_end.since(&pg_at_start);
    let cpu_at_end = [
        process_cpu_secs(serve.id()),
        process_cpu_secs(worker.id()),
        pg_at_end.total(),
        process_cpu_secs(redis_pid),
    ];
    let (machine_busy, machine_steal) = machine_shares(machine_at_start, machine_ticks());
    let cpu: Vec<f64> = cpu_at_end
        .iter()
        .zip(cpu_at_start)
        .map(|(e, s)| e - s)
        .collect();
    let work = match db_work_end(&db, commits_before).await {
        Ok(w) => w,
        Err(e) => {
            eprintln!("pg_stat_statements unreadable: {e:#}");
            DbWork::default()
        }
    };
    let stages = stages(&db).await.unwrap_or_else(|e| {
        eprintln!("the stage times are unreadable: {e:#}");
        Stages::default()
    });
    let rounds = rounds(&db).await.unwrap_or_else(|e| {
        eprintln!("the drain's rounds are unreadable: {e:#}");
        Rounds::default()
    });
    let stage = |v: &[f64]| {
        (
            v.first().copied().unwrap_or(0.0),
            v.get(1).copied().unwrap_or(0.0),
        )
    };
    let stage_figures = [
        ("stored_to_accepted", stage(&stages.accepted)),
        ("accepted_to_sent", stage(&stages.sent)),
        ("sent_to_answered", stage(&stages.answered)),
    ];
    let mut e2e = std::mem::take(
        &mut *sinks
            .end_to_end_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    e2e.sort_by(|a, b| a.total_cmp(b));
    for c in [&mut serve, &mut worker] {
        devservers::spawn::signal(c.id(), libc::SIGTERM);
        let _ = c.wait();
    }
    drop(redis);
    if !extra.is_empty() {
        let keep = std::env::temp_dir().join("parafed-bench-postgres.log");
        if std::fs::copy(pg.log_path(), &keep).is_ok() {
            eprintln!("the Postgres log is kept in {}", keep.display());
        }
    }
    drop(pg);

    // Every sink got every accepted event exactly once, with valid signatures.
    let received = sinks.received.lock().unwrap_or_else(|p| p.into_inner());
    let exact = (0..cli.peers).all(|k| {
        received
            .get(&format!("sink{k}"))
            .is_some_and(|m| m.len() as u64 == accepted && m.values().all(|&c| c == 1))
    });
    let bad = sinks.bad_signatures.load(Ordering::Relaxed);
    let ok = accepted == cli.events && exact && bad == 0;

    let figures = json!({
        "build": BUILD,
        "machine": {
            "ed25519_verify_us": verify_us,
            "busy_percent": machine_busy,
            "steal_percent": machine_steal,
        },
        "events": cli.events,
        "concurrency": cli.concurrency,
        "peers": cli.peers,
        "ingest": {
            "accepted": accepted,
            "seconds": ingest_secs,
            "events_per_second": accepted as f64 / ingest_secs,
            "latency_ms_p50": percentile(&latencies, 0.5),
            "latency_ms_p99": percentile(&latencies, 0.99),
            "generator_cpu_seconds": generator_cpu,
            "alone": cli.ingest_alone,
            "cpu_ms_per_event": {
                "serve": ingest_cpu[0], "worker": ingest_cpu[1], "postgres": ingest_cpu[2],
                "redis": ingest_cpu[3], "generator_and_sinks": ingest_cpu[4],
            },
        },
        "delivery": {
            "delivered": delivered,
            "expected": want,
            "seconds": delivery_secs,
            "timed_from": if cli.ingest_alone { "worker_start" } else { "first_post" },
            "deliveries_per_second": delivered as f64 / delivery_secs,
            "events_per_second_per_peer": delivered as f64 / delivery_secs / f64::from(cli.peers.max(1)),
            "bad_signatures": bad,
            "every_peer_got_every_event_once": exact,
        },
        "end_to_end_ms": {
            "rate_offered": cli.rate,
            "p50": percentile(&e2e, 0.5),
            "p99": percentile(&e2e, 0.99),
            "max": e2e.last().copied().unwrap_or(0.0),
            "stages": stage_figures.iter().map(|(name, (p50, p99))| (name.to_string(), json!({"p50": p50, "p99": p99}))).collect::<serde_json::Map<_, _>>(),
        },
        "backlog": backlog.as_ref().map(|(probe, drain)| json!({
            "deliveries": want,
            "seconds_to_first_success": probe,
            "seconds_from_first_success_to_last": drain,
            "deliveries_per_second": want as f64 / drain.max(1e-9),
        })),
        "rounds": {
            "rounds": rounds.rounds,
            "requests_p50": rounds.requests,
            "period_ms_p50": rounds.period_ms,
            "slowest_request_ms_p50": rounds.slowest_ms,
            "mean_request_ms_p50": rounds.mean_ms,
        },
        "dead_peers": cli.dead,
        "peak_rss_kb": { "serve": serve_rss, "worker": worker_rss },
        "cpu_seconds": {
            "serve": cpu[0], "worker": cpu[1], "postgres": cpu[2], "redis": cpu[3],
            "generator_and_sinks": own_cpu_secs() - cpu_before,
            "postgres_by_kind": {
                "backends": pg_cpu.backends, "autovacuum": pg_cpu.autovacuum,
                "background": pg_cpu.background, "exited": pg_cpu.exited,
            },
        },
        "postgres": {
            "statements": work.statements,
            "commits": work.commits,
            "statements_per_delivery": work.statements as f64 / delivered.max(1) as f64,
            "commits_per_delivery": work.commits as f64 / delivered.max(1) as f64,
            "top": work.top.iter().map(|s| json!({
                "calls": s.calls, "total_ms": s.total_ms, "mean_ms": s.mean_ms,
                "plans": s.plans, "plan_ms": s.plan_ms, "query": s.query,
            })).collect::<Vec<_>>(),
        },
    });
    println!("| measure | value |\n| --- | --- |");
    println!("| build | {BUILD} |");
    println!(
        "| machine: ed25519 verification (one core, before the run) / busy / stolen by the hypervisor (over the run) | {verify_us:.1} µs / {machine_busy:.0} % / {machine_steal:.0} % |"
    );
    println!(
        "| events posted (concurrency) | {} ({}) |",
        cli.events, cli.concurrency
    );
    println!(
        "| ingest accepted | {accepted} in {ingest_secs:.2} s = {:.0} events/s |",
        accepted as f64 / ingest_secs
    );
    println!(
        "| ingest latency p50 / p99 | {:.1} ms / {:.1} ms |",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!("| generator CPU | {generator_cpu:.2} s |");
    println!(
        "| ingest CPU ms per event{}: serve / worker / postgres / redis / generator and sinks | {:.3} / {:.3} / {:.3} / {:.3} / {:.3} |",
        if cli.ingest_alone { " (worker not started)" } else { "" },
        ingest_cpu[0],
        ingest_cpu[1],
        ingest_cpu[2],
        ingest_cpu[3],
        ingest_cpu[4]
    );
    println!(
        "| delivered to {} peer(s){} | {delivered} of {want} in {delivery_secs:.2} s = {:.0} deliveries/s |",
        cli.peers,
        if cli.ingest_alone { ", from the worker's start" } else { "" },
        delivered as f64 / delivery_secs
    );
    println!("| bad signatures at the sinks | {bad} |");
    if let Some((probe, drain)) = backlog {
        println!(
            "| backlog: {want} deliveries, from the first success to the last | {drain:.2} s = {:.0} deliveries/s (first success {probe:.1} s after the sinks came back) |",
            want as f64 / drain.max(1e-9)
        );
    }
    if cli.dead > 0 {
        println!("| dead peers in the room | {} |", cli.dead);
    }
    println!(
        "| end to end p50 / p99{} | {:.1} ms / {:.1} ms |",
        cli.rate
            .map_or(String::new(), |r| format!(" at {r} events/s")),
        percentile(&e2e, 0.5),
        percentile(&e2e, 0.99)
    );
    println!(
        "| inside alpha, p50 / p99 (first sink): stored → accepted / accepted → sent / sent → answered | {} |",
        stage_figures
            .iter()
            .map(|(_, (p50, p99))| format!("{p50:.1} / {p99:.1} ms"))
            .collect::<Vec<_>>()
            .join(" · ")
    );
    println!(
        "| the drain's rounds to the first sink, p50: requests / period / slowest request / mean request | {:.0} / {:.1} ms / {:.0} ms / {:.1} ms ({} rounds) |",
        rounds.requests, rounds.period_ms, rounds.slowest_ms, rounds.mean_ms, rounds.rounds
    );
    let per = |s: f64| s * 1000.0 / delivered.max(1) as f64;
    println!(
        "| CPU ms per delivery: serve / worker / postgres / redis | {:.2} / {:.2} / {:.2} / {:.2} |",
        per(cpu[0]),
        per(cpu[1]),
        per(cpu[2]),
        per(cpu[3])
    );
    println!(
        "| Postgres CPU ms per delivery: backends / autovacuum / other background / exited processes | {:.3} / {:.3} / {:.3} / {:.3} |",
        per(pg_cpu.backends),
        per(pg_cpu.autovacuum),
        per(pg_cpu.background),
        per(pg_cpu.exited)
    );
    println!(
        "| Postgres statements / commits per delivery | {:.1} / {:.2} |",
        work.statements as f64 / delivered.max(1) as f64,
        work.commits as f64 / delivered.max(1) as f64
    );
    println!(
        "| peak RSS serve / worker | {} kB / {} kB |",
        serve_rss.map_or("?".into(), |v| v.to_string()),
        worker_rss.map_or("?".into(), |v| v.to_string())
    );
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !ok {
        eprintln!(
            "counts do not add up: {accepted} of {} accepted, every peer got every event once: {exact}, bad signatures: {bad}",
            cli.events
        );
    }
    Ok((ok, figures))
}
