//! `parafed demo`: a two-server federation on this machine, built from the real parts.
//!
//! It starts a throwaway Postgres and Redis (from the installed server binaries), then
//! two parafed deployments — `alpha.test` and `beta.test`, each one `parafed serve` and
//! one `parafed-worker` process — configured as peers of each other. It hosts a room on
//! alpha, has a beta user join it through the federation API, exchanges every text
//! feature (messages both ways, an edit, a reaction added and removed, a delete, a leave)
//! and shows each arriving in the other server's inbound feed; then prints the operator's
//! view of one event (`parafed admin status`, `parafed admin events show`, real output).
//! Then it keeps running (until Ctrl-C) so the APIs can be explored; `--once` exits
//! instead.

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

/// Waits until `event_id` is in the inbound feed of the server on `port`, and prints it.
async fn show_arrival(
    client: &HttpClient,
    port: u16,
    name: &str,
    event_id: &str,
) -> Result<(), DemoError> {
    let ev = devservers::wait_until(
        &format!("{event_id} in {name}'s feed"),
        Duration::from_secs(30),
        || {
            let (c, id) = (client.clone(), event_id.to_owned());
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
    let content = &ev["event"]["content"];
    println!(
        "  {name}'s inbound feed, at {}: {} {} {}",
        ev["position"],
        ev["event"]["sender"].as_str().unwrap_or(""),
        ev["event"]["event_type"].as_str().unwrap_or(""),
        content
            .get("body")
            .or(content.get("emoji"))
            .or(content.get("message_id"))
            .map(|v| v.to_string())
            .unwrap_or_default(),
    );
    Ok(())
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

    // Every text feature: a message each way, an edit, reactions, a delete and a leave.
    let post = |port: u16, txn: &str, kind: &str, sender: &str, content: Value| {
        let client = client.clone();
        let body = json!({"txn_id": txn, "room_id": room, "event_type": kind,
                          "sender": sender, "content": content});
        async move {
            let r = call(
                &client,
                Method::POST,
                port,
                "/_parafed/local/v1/events",
                Some(body),
            )
            .await?;
            Ok::<String, DemoError>(r["event_id"].as_str().unwrap_or_default().to_owned())
        }
    };
    let alice = "@alice:alpha.test";
    let bob = "@bob:beta.test";
    let m1 = "demo-m1";
    let hello_a = post(
        ap,
        "demo-1",
        "m.message",
        alice,
        json!({"message_id": m1, "body": "hello from alpha"}),
    )
    .await?;
    show_arrival(&client, bp, "beta.test", &hello_a).await?;
    let hello_b = post(
        bp,
        "demo-2",
        "m.message",
        bob,
        json!({"message_id": "demo-m2", "body": "hello from beta"}),
    )
    .await?;
    show_arrival(&client, ap, "alpha.test", &hello_b).await?;
    let edit = post(
        ap,
        "demo-3",
        "m.message.edit",
        alice,
        json!({"message_id": m1, "body": "hello from alpha (edited)"}),
    )
    .await?;
    show_arrival(&client, bp, "beta.test", &edit).await?;
    let react = post(
        bp,
        "demo-4",
        "m.reaction.add",
        bob,
        json!({"message_id": m1, "emoji": "👋"}),
    )
    .await?;
    show_arrival(&client, ap, "alpha.test", &react).await?;
    let unreact = post(
        bp,
        "demo-5",
        "m.reaction.remove",
        bob,
        json!({"message_id": m1, "emoji": "👋"}),
    )
    .await?;
    show_arrival(&client, ap, "alpha.test", &unreact).await?;
    let delete = post(
        ap,
        "demo-6",
        "m.message.delete",
        alice,
        json!({"message_id": m1}),
    )
    .await?;
    show_arrival(&client, bp, "beta.test", &delete).await?;
    let left = call(
        &client,
        Method::POST,
        bp,
        "/_parafed/local/v1/leave",
        Some(json!({"room_id": room, "user_id": bob})),
    )
    .await?;
    println!(
        "  beta → alpha POST /leave (@bob:beta.test leaves): {}",
        left["response"]
    );

    // The operator's view of one event, with the commands to try.
    println!(
        "\nThe operator's view: `parafed admin` against alpha's admin API\n  \
         export PARAFED_ADMIN_URL=http://127.0.0.1:{ap} PARAFED_ADMIN_TOKEN={ADMIN_TOKEN}"
    );
    let url = format!("http://127.0.0.1:{ap}");
    for cmd in [
        crate::admin::cli::AdminCommand::Status,
        crate::admin::cli::AdminCommand::Events(crate::admin::cli::EventsCommand::Show {
            event_id: edit.clone(),
        }),
    ] {
        let shown = match &cmd {
            crate::admin::cli::AdminCommand::Status => "status".to_owned(),
            _ => format!("events show '{edit}'"),
        };
        let call = crate::admin::cli::call_for(&cmd).map_err(|u| step(u.0))?;
        let out = crate::admin::cli::run(&url, Some(ADMIN_TOKEN), &call).await;
        if out.code != crate::admin::cli::EXIT_OK {
            return Err(step(format!("parafed admin {shown}: {}", out.document)));
        }
        println!(
            "\n$ parafed admin {shown}\n{}",
            crate::admin::cli::render(&out.document)
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
        "\nStill running — try (with the export above):\n  \
         parafed admin status\n  \
         parafed admin events list --room '{room}'\n  \
         parafed admin destinations list\n  \
         parafed admin deliveries list --destination beta.test\n  \
         parafed admin queues list\n  \
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
