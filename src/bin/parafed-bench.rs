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
//! per second arriving at the K peers, from the first post to the last arrival; and the
//! peak RSS of each parafed process. Output: a markdown table on stdout, and with
//! `--json FILE` the same figures as JSON. `--small` is the CI smoke run: it checks
//! counts — every event accepted, every sink got every event exactly once, every
//! signature valid — and exits 1 if not; it never judges speed.
//!
//! Still to come (docs/performance.md): end-to-end latency at a steady rate, the
//! 100 000-delivery backlog, isolation from dead peers.

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
    /// The CI smoke run: 200 events, 2 peers; checks counts only.
    #[arg(long)]
    small: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

const ROOM: &str = "!bench:alpha.test";

/// What the sinks saw.
#[derive(Default)]
struct Sinks {
    /// Per sink: event id → times received.
    received: Mutex<HashMap<String, HashMap<String, u32>>>,
    bad_signatures: AtomicU64,
    deliveries: AtomicU64,
    last_arrival: Mutex<Option<Instant>>,
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
    *sinks.last_arrival.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
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
        .env("PARAFED_LOG", "warn")
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
    let mut e = Envelope {
        event_id: EventId::parse(&format!("$bench{n}:source.test"))?,
        room_id: RoomId::parse(ROOM)?,
        event_type: EventType::parse("m.message")?,
        sender: UserId::parse("@s:source.test")?,
        origin_server: ServerName::parse("source.test")?,
        origin_ts: parafed::time::now_ms(),
        content: json!({"body": format!("load {n}"), "message_id": format!("bench{n}")}),
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
    match run(&cli).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<bool> {
    let serve_bin = sibling("parafed")?;
    let worker_bin = sibling("parafed-worker")?;
    let pg = Postgres::start().await?;
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
         [peers.\"source.test\"]\nbase_url = \"{peers_base}/source\"\n",
        redis.url()
    );
    for k in 0..cli.peers {
        cfg.push_str(&format!(
            "[peers.\"sink{k}.test\"]\nbase_url = \"{peers_base}/sink{k}\"\n"
        ));
    }
    let cfg_path = dir.join("alpha.toml");
    std::fs::write(&cfg_path, cfg)?;
    let mut serve = spawn(&serve_bin, &["serve"], &cfg_path, &dir.join("serve.log"))?;
    let mut worker = spawn(&worker_bin, &[], &cfg_path, &dir.join("worker.log"))?;
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

    // (1) ingest, and the start of (2): every event posted at the stated concurrency.
    let path = "/_paracord/federation/v1/event";
    let name = ServerName::parse("source.test")?;
    let cpu_before = own_cpu_secs();
    let started = Instant::now();
    use futures::StreamExt;
    let results: Vec<(u16, f64)> = futures::stream::iter(0..cli.events)
        .map(|n| {
            let (client, source, name, url) = (
                client.clone(),
                source.clone(),
                name.clone(),
                format!("{alpha}{path}"),
            );
            async move {
                let Ok(body) = event(&source, n) else {
                    return (0, 0.0);
                };
                let t = TransportHeaders::sign(
                    &source,
                    &name,
                    "POST",
                    path,
                    parafed::time::now_ms(),
                    &body,
                );
                let mut headers: Vec<(&str, String)> = t.to_header_pairs().into_iter().collect();
                headers.push(("content-type", "application/json".into()));
                let sent = Instant::now();
                let status = client
                    .send(Method::POST, &url, &headers, Bytes::from(body), 4096)
                    .await
                    .map_or(0, |r| r.status.as_u16());
                (status, sent.elapsed().as_secs_f64() * 1000.0)
            }
        })
        .buffer_unordered(cli.concurrency.max(1))
        .collect()
        .await;
    let ingest_secs = started.elapsed().as_secs_f64();
    let generator_cpu = own_cpu_secs() - cpu_before;
    let accepted = results.iter().filter(|(s, _)| *s == 202).count() as u64;
    let mut latencies: Vec<f64> = results.iter().map(|(_, l)| *l).collect();
    latencies.sort_by(|a, b| a.total_cmp(b));

    // (2) delivery: until every sink has every event (or nothing arrives for a while).
    let want = accepted * u64::from(cli.peers);
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
    let delivery_secs = last.duration_since(started).as_secs_f64().max(1e-9);
    let delivered = sinks.deliveries.load(Ordering::Relaxed);
    let serve_rss = peak_rss_kb(serve.id());
    let worker_rss = peak_rss_kb(worker.id());
    for c in [&mut serve, &mut worker] {
        devservers::spawn::signal(c.id(), libc::SIGTERM);
        let _ = c.wait();
    }
    drop(redis);
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
        },
        "delivery": {
            "delivered": delivered,
            "expected": want,
            "seconds_from_first_post": delivery_secs,
            "deliveries_per_second": delivered as f64 / delivery_secs,
            "events_per_second_per_peer": delivered as f64 / delivery_secs / f64::from(cli.peers.max(1)),
            "bad_signatures": bad,
            "every_peer_got_every_event_once": exact,
        },
        "peak_rss_kb": { "serve": serve_rss, "worker": worker_rss },
    });
    println!("| measure | value |\n| --- | --- |");
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
        "| delivered to {} peer(s) | {delivered} of {want} in {delivery_secs:.2} s = {:.0} deliveries/s |",
        cli.peers,
        delivered as f64 / delivery_secs
    );
    println!("| bad signatures at the sinks | {bad} |");
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
    Ok(ok)
}
