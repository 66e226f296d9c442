//! Monitoring against the real thing: a `parafed serve` and a `parafed-worker` process
//! (with their own Postgres and Redis) send to a peer that is down, a real Prometheus
//! (the installed binary, on a free loopback port, temp storage) scrapes both and
//! evaluates `prometheus/rules/parafed.rules.yml`. The unreachable-destination alert must
//! go pending and resolve when the peer returns; the live scrapes must pass
//! `promtool check metrics`; and every metric named by the rules, their tests, the
//! dashboard and docs/operations.md must exist in those scrapes (and the reverse for the
//! docs), so none of them can drift from the code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::support;
use support::app::{
    event_id_of, raw, request_bytes, reserve_listener, send, FakeAnswer, FakeRequest, FnPeer,
};
use support::wait_for;

const ROOM: &str = "!watch:alpha.test";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_parafed")).with_file_name(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// An installed tool (`prometheus`, `promtool`), or a failure saying how to get it.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| {
            panic!("{name} is not installed: apt-get install prometheus (bash .ci/setup does)")
        })
}

/// A free loopback port for a process to bind (see `devservers::free_port`).
fn free_port() -> u16 {
    parafed::devservers::free_port().expect("a free port")
}

/// A child process killed when the test ends.
struct Proc(Child);

impl Proc {
    fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let log = std::fs::File::create(log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        Proc(parafed::devservers::spawn::spawn_tied(cmd).unwrap())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    raw(addr, &request_bytes("GET", path, &[], b""))
        .await
        .ok()
        .map(|r| (r.status, r.body))
}

/// The state of alert `name` in Prometheus (`pending`, `firing`), if it is active.
async fn alert_state(prom: u16, name: &str) -> Option<String> {
    let (status, body) = get(prom, "/api/v1/alerts").await?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["data"]["alerts"]
        .as_array()?
        .iter()
        .find(|a| a["labels"]["alertname"] == name)
        .and_then(|a| a["state"].as_str().map(str::to_owned))
}

/// Metric family names in an exposition text (histogram series folded into their family).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .filter(|base| text.contains(&format!("# TYPE {base} histogram")))
                .unwrap_or(n)
                .to_owned()
        })
        .collect()
}

/// Every `parafed_…` name a file mentions (series suffixes folded as above).
fn names_in(path: &Path, known: &BTreeSet<String>) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("parafed_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        rest = &tail[end..];
        if name.len() <= "parafed_".len() {
            continue;
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(*b)))
            .unwrap_or(name);
        out.insert(base.to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_and_resolve_on_a_real_prometheus_and_every_name_is_live() {
    support::log_to_test_output();
    let dir = tempfile::tempdir().unwrap();
    let db = support::pg::migrated_db().await;
    {
        let pool = parafed::store::pool(&db, 1).unwrap();
        let mut c = pool.get().await.unwrap();
        parafed::store::keys::generate(&mut c, None).await.unwrap();
        support::host_room(&mut c, ROOM, &[("@b:beta.test", "beta.test")]).await;
    }
    let redis = support::redis::Redis::start().await.unwrap();

    // beta answers 503 until it is "back".
    let up = Arc::new(AtomicBool::new(false));
    let (lp, peer_url) = reserve_listener();
    let u = up.clone();
    let _peer = FnPeer::start(lp, move |r: FakeRequest| {
        let up = u.load(Ordering::SeqCst);
        async move {
            FakeAnswer::json(
                if up { 202 } else { 503 },
                json!({"event_id": event_id_of(&r.body), "inserted": true}),
            )
        }
    })
    .await;

    let (http, ingress_metrics, worker_metrics) = (free_port(), free_port(), free_port());
    let cfg = format!(
        "server_name = \"alpha.test\"\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\nmetrics_listen = \"127.0.0.1:{ingress_metrics}\"\n\
         [database]\nurl = \"{db}\"\npool_size = 8\n\
         [redis]\nurl = \"{redis}\"\n\
         [federation]\ndiscovery = false\nrate_limit_per_minute = 0\n\
         [worker]\nmetrics_listen = \"127.0.0.1:{worker_metrics}\"\nconcurrency = 4\n\
         scheduler_interval_ms = 50\ngauges_interval_ms = 300\njob_timeout_ms = 5000\n\
         [delivery]\nbackoff_base_ms = 200\nbackoff_cap_ms = 1000\nrequest_timeout_ms = 2000\n\
         connect_timeout_ms = 500\n\
         [peers.\"beta.test\"]\nbase_url = \"{peer_url}\"\n",
        redis = redis.url(),
    );
    let cfg_path = dir.path().join("alpha.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut serve = Command::new(bin("parafed"));
    serve
        .arg("--config")
        .arg(&cfg_path)
        .arg("serve")
        .env("PARAFED_LOCAL_TOKEN", "watch-local")
        .env("PARAFED_LOG", "warn");
    let _serve = Proc::spawn(serve, &dir.path().join("serve.log"));
    let mut worker = Command::new(bin("parafed-worker"));
    worker
        .arg("--config")
        .arg(&cfg_path)
        .env("PARAFED_LOG", "warn");
    let _worker = Proc::spawn(worker, &dir.path().join("worker.log"));
    wait_for("parafed serve", Duration::from_secs(30), || async {
        get(http, "/.well-known/paracord/server")
            .await
            .filter(|r| r.0 == 200)
    })
    .await;

    // Real traffic: local events, fanned out to beta, which is down.
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], http).into();
    let local = vec![
        ("Authorization".to_owned(), "Bearer watch-local".to_owned()),
        ("Content-Type".to_owned(), "application/json".to_owned()),
    ];
    for i in 0..5 {
        let body = json!({"txn_id": format!("w{i}"), "room_id": ROOM, "event_type": "m.message",
            "sender": "@a:alpha.test", "content": {"message_id": format!("{i}"), "body": "hi"}});
        let r = send(
            addr,
            "POST",
            "/_parafed/local/v1/events",
            &local,
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    }
    // And a refused federation request, so the ingress counts one.
    let json_only = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    let r = send(
        addr,
        "POST",
        "/_paracord/federation/v1/event",
        &json_only,
        b"{}",
    )
    .await;
    assert_eq!(r.status, 401);

    // A real Prometheus over both processes, with parafed's own rules.
    let prom_port = free_port();
    let prom_cfg = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules}\n\
         scrape_configs:\n\
         \x20 - job_name: parafed-ingress\n    static_configs:\n      - targets: [\"127.0.0.1:{ingress_metrics}\"]\n\
         \x20 - job_name: parafed-worker\n    static_configs:\n      - targets: [\"127.0.0.1:{worker_metrics}\"]\n",
        rules = repo("prometheus/rules/parafed.rules.yml").display(),
    );
    let prom_cfg_path = dir.path().join("prometheus.yml");
    std::fs::write(&prom_cfg_path, prom_cfg).unwrap();
    let mut prom = Command::new(tool("prometheus"));
    prom.arg(format!("--config.file={}", prom_cfg_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"));
    let _prom = Proc::spawn(prom, &dir.path().join("prometheus.log"));

    let state = wait_for(
        "the unreachable-destination alert to go pending",
        Duration::from_secs(90),
        || async { alert_state(prom_port, "ParafedDestinationsUnreachable").await },
    )
    .await;
    assert!(state == "pending" || state == "firing", "{state}");

    // beta returns: the backlog drains, the destination is healthy, the alert resolves.
    up.store(true, Ordering::SeqCst);
    wait_for("the alert to resolve", Duration::from_secs(90), || async {
        alert_state(prom_port, "ParafedDestinationsUnreachable")
            .await
            .is_none()
            .then_some(())
    })
    .await;

    // The live scrapes after that traffic.
    let mut live = BTreeSet::new();
    for (what, port) in [("ingress", ingress_metrics), ("worker", worker_metrics)] {
        let (status, body) = get(port, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        let mut check = Command::new(tool("promtool"))
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics on the {what}'s scrape:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        live.extend(families(&text));
    }
    let declared: BTreeSet<String> = parafed::telemetry::metrics::FAMILIES
        .iter()
        .map(|f| f.name.to_owned())
        .collect();
    assert_eq!(live, declared, "the live scrapes and FAMILIES disagree");
    for file in [
        "prometheus/rules/parafed.rules.yml",
        "prometheus/tests/parafed.test.yml",
        "prometheus/grafana/parafed.json",
    ] {
        let named = names_in(&repo(file), &live);
        let missing: Vec<_> = named.difference(&live).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics no process reports: {missing:?}"
        );
    }
    let documented = names_in(&repo("docs/operations.md"), &live);
    assert_eq!(
        documented, live,
        "docs/operations.md must list exactly the metrics parafed reports"
    );
}
