//! `parafed demo`: a two-server federation on this machine, built from the real parts.
//!
//! It starts a throwaway Postgres and Redis (from the installed server binaries), then
//! two parafed deployments — `alpha.test` and `beta.test`, each one `parafed serve` and
//! one `parafed-worker` process — configured as peers of each other. It hosts a room on
//! alpha, has a beta user join it through the federation API, exchanges messages both
//! ways, and shows each arriving in the other server's inbound feed. Then it keeps
//! running (until Ctrl-C) so the APIs can be explored; `--once` exits instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use crate::devservers::{self, spawn::spawn_tied, Postgres, Redis};
use crate::remote::HttpClient;

pub const LOCAL_TOKEN: &str = "demo-local-token";
pub const ADMIN_TOKEN: &str = "demo-admin-token";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    DevServer(#[from] devservers::DevServerError),
    #[error("{0}")]
    Step(String),
}

fn step(m: impl Into<String>) -> DemoError {
    DemoError::Step(m.into())
}

struct Server {
    name: &'static str,
    http: u16,
    children: Vec<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for c in &mut self.children {
            crate::devservers::spawn::signal(c.id(), libc::SIGTERM);
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

fn sibling(name: &str) -> Result<PathBuf, DemoError> {
    let exe = std::env::current_exe().map_err(|e| step(format!("locating parafed: {e}")))?;
    let p = exe.with_file_name(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(step(format!(
            "{} not found next to {}; build both binaries with `cargo build --release --workspace`",
            name,
            exe.display()
        )))
    }
}

fn config(name: &str, http: u16, db: &str, redis: &str, peer: &str, peer_port: u16) -> String {
    format!(
        "server_name = \"{name}\"\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\nmetrics_listen = \"127.0.0.1:{m}\"\n\
         [database]\nurl = \"{db}\"\n\
         [redis]\nurl = \"{redis}\"\nkey_prefix = \"{name}\"\n\
         [federation]\ndiscovery = false\n\
         [worker]\nmetrics_listen = \"127.0.0.1:{w}\"\nscheduler_interval_ms = 100\n\
         [delivery]\nbackoff_base_ms = 500\n\
         [peers.\"{peer}\"]\nbase_url = \"http://127.0.0.1:{peer_port}\"\n",
        m = http + 1000,
        w = http + 1001,
    )
}

fn spawn(bin: &Path, args: &[&str], cfg: &Path, log: &Path) -> Result<Child, DemoError> {
    let log =
        std::fs::File::create(log).map_err(|e| step(format!("creating {}: {e}", log.display())))?;
    let err = log.try_clone().map_err(|e| step(e.to_string()))?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .arg("--config")
        .arg(cfg)
        .env("PARAFED_LOCAL_TOKEN", LOCAL_TOKEN)
        .env("PARAFED_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    spawn_tied(cmd).map_err(|e| step(format!("starting {}: {e}", bin.display())))
}

async fn call(
    client: &HttpClient,
    method: Method,
    port: u16,
    path: &str,
    body: Option<Value>,
) -> Result<Value, DemoError> {
    let mut headers = vec![("authorization", format!("Bearer {LOCAL_TOKEN}"))];
    if body.is_some() {
        headers.push(("content-type", "application/json".into()));
    }
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let r = client
        .send(
            method,
            &format!("http://127.0.0.1:{port}{path}"),
            &headers,
            bytes,
            1 << 20,
        )
        .await
        .map_err(|e| step(format!("{path}: {e}")))?;
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    if !r.status.is_success() {
        return Err(step(format!("{path} answered {}: {v}", r.status)));
    }
    Ok(v)
}

/// Runs the demo. `base_port` is alpha's HTTP port; beta uses `base_port + 2`.
pub async fn run(base_port: u16, once: bool) -> Result<(), DemoError> {
    let serve_bin = std::env::current_exe().map_err(|e| step(e.to_string()))?;
    let worker_bin = sibling("parafed-worker")?;
    println!("Starting a throwaway Postgres and Redis …");
    let pg = Postgres::start().await?;
    let redis = Redis::start().await?;
    let dir = devservers::server_dir("demo")?;

    let (ap, bp) = (base_port, base_port + 2);
    let mut servers = Vec::new();
    for (name, port, peer, peer_port) in [
        ("alpha.test", ap, "beta.test", bp),
        ("beta.test", bp, "alpha.test", ap),
    ] {
        let db = pg.create_db(name.split('.').next().unwrap_or(name)).await?;
        crate::store::migrate::run_pending(&db)
            .await
            .map_err(|e| step(format!("migrating {name}: {e}")))?;
        let pool = crate::store::pool(&db, 1).map_err(|e| step(e.to_string()))?;
        let mut conn = pool.get().await.map_err(|e| step(e.to_string()))?;
        let key = crate::store::keys::generate(&mut conn, None)
            .await
            .map_err(|e| step(e.to_string()))?;
        let cfg_path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &cfg_path,
            config(name, port, &db, &redis.url(), peer, peer_port),
        )
        .map_err(|e| step(format!("writing {}: {e}", cfg_path.display())))?;
        let serve = spawn(
            &serve_bin,
            &["serve"],
            &cfg_path,
            &dir.join(format!("{name}.serve.log")),
        )?;
        let worker = spawn(
            &worker_bin,
            &[],
            &cfg_path,
            &dir.join(format!("{name}.worker.log")),
        )?;
        println!(
            "  {name}: http://127.0.0.1:{port}  signing key {}  (config {})",
            key.key_id,
            cfg_path.display()
        );
        servers.push(Server {
            name,
            http: port,
            children: vec![serve, worker],
        });
    }
    let client = HttpClient::new(Duration::from_secs(2), Duration::from_secs(10));
    for s in &servers {
        let port = s.http;
        let c = client.clone();
        devservers::wait_until(
            &format!("{} to answer", s.name),
            Duration::from_secs(30),
            || {
                let c = c.clone();
                async move {
                    c.send(
                        Method::GET,
                        &format!("http://127.0.0.1:{port}/.well-known/paracord/server"),
                        &[],
                        Bytes::new(),
                        4096,
                    )
                    .await
                    .ok()
                    .filter(|r| r.status.is_success())
                }
            },
        )
        .await?;
    }

    let room = "!lobby:alpha.test";
    println!("\nalpha.test hosts room {room}; @bob:beta.test joins it through the federation API:");
    call(
        &client,
        Method::PUT,
        ap,
        &format!("/_parafed/local/v1/rooms/{room}"),
        Some(json!({"guild_name": "Demo Lobby"})),
    )
    .await?;
    let joined = call(
        &client,
        Method::POST,
        bp,
        "/_parafed/local/v1/join",
        Some(json!({"room_id": room, "user_id": "@bob:beta.test"})),
    )
    .await?;
    println!("  beta → alpha POST /join: {}", joined["response"]);

    let hello_a = call(
        &client,
        Method::POST,
        ap,
        "/_parafed/local/v1/events",
        Some(json!({
        "txn_id": "demo-1", "room_id": room, "event_type": "m.message",
        "sender": "@alice:alpha.test", "content": {"body": "hello from alpha"}})),
    )
    .await?;
    let hello_b = call(
        &client,
        Method::POST,
        bp,
        "/_parafed/local/v1/events",
        Some(json!({
        "txn_id": "demo-2", "room_id": room, "event_type": "m.message",
        "sender": "@bob:beta.test", "content": {"body": "hello from beta"}})),
    )
    .await?;
    for (port, name, id) in [
        (bp, "beta.test", &hello_a["event_id"]),
        (ap, "alpha.test", &hello_b["event_id"]),
    ] {
        let id = id.as_str().unwrap_or_default().to_owned();
        let c = client.clone();
        let ev = devservers::wait_until(
            &format!("{id} in {name}'s feed"),
            Duration::from_secs(30),
            || {
                let (c, id) = (c.clone(), id.clone());
                async move {
                    let feed = call(
                        &c,
                        Method::GET,
                        port,
                        "/_parafed/local/v1/feed?since=0",
                        None,
                    )
                    .await
                    .ok()?;
                    feed["events"]
                        .as_array()?
                        .iter()
                        .find(|e| e["event"]["event_id"] == id.as_str())
                        .cloned()
                }
            },
        )
        .await?;
        println!(
            "  {name}'s inbound feed, at {}: {} says {:?} (signed by {})",
            ev["position"],
            ev["event"]["sender"],
            ev["event"]["content"]["body"].as_str().unwrap_or(""),
            ev["event"]["origin_server"]
        );
    }
    println!(
        "\nFederation works both ways. Logs and configs: {}",
        dir.display()
    );
    if once {
        return Ok(());
    }
    println!(
        "\nStill running — try:\n  curl -s -H 'Authorization: Bearer {ADMIN_TOKEN}' http://127.0.0.1:{ap}/_parafed/admin/v1/status\n  \
         curl -s -H 'Authorization: Bearer {LOCAL_TOKEN}' 'http://127.0.0.1:{bp}/_parafed/local/v1/feed?since=0'\n  \
         curl -s http://127.0.0.1:{}/metrics | grep parafed_\nPress Ctrl-C to stop.",
        ap + 1000
    );
    let _ = tokio::signal::ctrl_c().await;
    println!("stopping …");
    drop(servers);
    drop(redis);
    drop(pg);
    Ok(())
}
