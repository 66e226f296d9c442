//! The `parafed` binary as an operator runs it: migrate, keys, config check.

use crate::support;

use std::process::{Command, Output};

use serde_json::Value;

fn parafed(db: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parafed"))
        .args(args)
        .env_clear()
        .env("PARAFED_SERVER_NAME", "alpha.test")
        .env("PARAFED_DATABASE_URL", db)
        .env("PARAFED_REDIS_URL", "redis://127.0.0.1:1/")
        .env("PARAFED_LOG", "warn")
        .output()
        .expect("run parafed")
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let db = support::pg::fresh_db().await;
    let first = json(&parafed(&db, &["migrate", "--output", "json"]));
    assert!(!first["applied"].as_array().unwrap().is_empty());
    let second = json(&parafed(&db, &["migrate", "--output", "json"]));
    assert_eq!(second["applied"], serde_json::json!([]));
}

/// `migrate` and `keys` read only the database settings: nothing else needs to be set.
#[tokio::test]
async fn migrate_and_keys_need_only_the_database_url() {
    let db = support::pg::fresh_db().await;
    let only_db = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_parafed"))
            .args(args)
            .env_clear()
            .env("PARAFED_DATABASE_URL", &db)
            .env("PARAFED_LOG", "warn")
            .output()
            .expect("run parafed")
    };
    let migrated = json(&only_db(&["migrate", "--output", "json"]));
    assert!(!migrated["applied"].as_array().unwrap().is_empty());
    let key = json(&only_db(&["keys", "generate", "--output", "json"]));
    assert_eq!(key["keys"][0]["status"], "active");
    // Without it, the error names the setting (exit 2).
    let none = Command::new(env!("CARGO_BIN_EXE_parafed"))
        .arg("migrate")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(err.contains("database"), "{err}");
    // `parafed admin` needs only its URL and token: without the token it says so.
    let admin = Command::new(env!("CARGO_BIN_EXE_parafed"))
        .args(["admin", "--url", "http://127.0.0.1:1", "status"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(admin.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&admin.stderr).contains("PARAFED_ADMIN_TOKEN"));
}

#[tokio::test]
async fn keys_generate_list_rotate() {
    let db = support::pg::migrated_db().await;
    let generated = json(&parafed(&db, &["keys", "generate", "--output", "json"]));
    let first_id = generated["keys"][0]["key_id"].as_str().unwrap().to_owned();
    assert!(first_id.starts_with("ed25519:"));

    let list = json(&parafed(&db, &["keys", "list", "--output", "json"]));
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["status"], "active");
    assert_eq!(keys[0]["algorithm"], "ed25519");
    assert_eq!(keys[0]["public_key"].as_str().unwrap().len(), 64);
    assert!(keys[0].get("seed").is_none(), "the secret is never printed");

    // A second generate is refused and changes nothing.
    let again = parafed(&db, &["keys", "generate"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("rotate"));

    json(&parafed(&db, &["keys", "rotate", "--output", "json"]));
    let list = json(&parafed(&db, &["keys", "list", "--output", "json"]));
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let active: Vec<_> = keys.iter().filter(|k| k["status"] == "active").collect();
    let retired: Vec<_> = keys.iter().filter(|k| k["status"] == "retired").collect();
    assert_eq!(active.len(), 1);
    assert_ne!(active[0]["key_id"], first_id.as_str());
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0]["key_id"], first_id.as_str());
    assert!(retired[0]["verify_until"].is_string());
}

#[test]
fn keys_import_reads_a_paracord_key_file() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(support::pg::migrated_db());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("signing.key");
    std::fs::write(
        &f,
        "6162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f80\n",
    )
    .unwrap();
    let out = json(&parafed(
        &db,
        &[
            "keys",
            "import",
            "--key-id",
            "ed25519:auto",
            "--seed-file",
            f.to_str().unwrap(),
            "--output",
            "json",
        ],
    ));
    // Paracord's own public key for this seed (tests/vectors/keys.json).
    assert_eq!(
        out["keys"][0]["public_key"],
        "882d0ea3b2864e7a587f3e698cea4459998312e655e05fa5e8b5119d8baac8cd"
    );
}

#[test]
fn config_check_masks_secrets_and_names_bad_keys() {
    let out = Command::new(env!("CARGO_BIN_EXE_parafed"))
        .args(["config", "check", "--output", "json"])
        .env_clear()
        .env("PARAFED_SERVER_NAME", "alpha.test")
        .env("PARAFED_DATABASE_URL", "postgres://u:hunter2@127.0.0.1/x")
        .env("PARAFED_REDIS_URL", "redis://127.0.0.1:6379/")
        .env("PARAFED_ADMIN_TOKEN", "t0psecret")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains("hunter2") && !text.contains("t0psecret"),
        "{text}"
    );
    let v = json(&out);
    assert_eq!(v["server_name"], "alpha.test");
    assert_eq!(v["admin"]["token"], "<set>");
    assert_eq!(v["federation"]["max_skew_ms"], 60000);

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("parafed.toml");
    std::fs::write(&f, "server_name = \"alpha.test\"\n[database]\nurl = \"postgres://x\"\n[redis]\nurl = \"redis://x\"\n[federation]\nmax_skew = 5\n").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_parafed"))
        .args(["--config", f.to_str().unwrap(), "config", "check"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("max_skew"), "{err}");
    assert!(bad.stdout.is_empty());
}

/// A base port whose demo ports (p, p+1000, p+1001, p+2, p+1002, p+1003) are all free.
fn demo_ports() -> u16 {
    for _ in 0..200 {
        let p: u16 = 20_000 + (rand::random::<u16>() % 20_000);
        let all = [p, p + 1000, p + 1001, p + 2, p + 1002, p + 1003];
        if all
            .iter()
            .all(|q| std::net::TcpListener::bind(("127.0.0.1", *q)).is_ok())
        {
            return p;
        }
    }
    panic!("no free port range for the demo");
}

#[test]
fn demo_federates_two_servers_with_the_real_binaries() {
    let port = demo_ports();
    let out = Command::new(env!("CARGO_BIN_EXE_parafed"))
        .args(["demo", "--once", "--port", &port.to_string()])
        .env("PARAFED_LOG", "warn")
        .output()
        .expect("run parafed demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("beta.test's inbound feed") && stdout.contains("hello from alpha"),
        "{stdout}"
    );
    assert!(
        stdout.contains("alpha.test's inbound feed") && stdout.contains("hello from beta"),
        "{stdout}"
    );
    // Every text feature crossed, and the operator's view of one event was printed.
    for want in [
        "m.message.edit",
        "m.reaction.add",
        "m.reaction.remove",
        "m.message.delete",
        "POST /leave",
        "$ parafed admin status",
        "$ parafed admin events show",
        "what: nothing: delivered",
    ] {
        assert!(
            stdout.contains(want),
            "demo output lacks {want:?}:\n{stdout}"
        );
    }
}

/// The load tool's CI mode: a whole federation (throwaway Postgres and Redis, `parafed
/// serve`, `parafed-worker`, a source peer and two sinks that check every signature),
/// 200 events; it checks counts, never speed.
#[test]
fn the_load_tool_small_mode_delivers_everything_exactly_once() {
    let (stdout, v) = small_load_run(&[]);
    assert!(stdout.contains("| ingest accepted |"), "{stdout}");
    // The table and the JSON say what the binaries were built for, the same way.
    let build = v["build"].as_str().unwrap_or_default();
    assert!(!build.is_empty(), "{v}");
    assert!(stdout.contains(&format!("| build | {build} |")), "{stdout}");
    assert_eq!(v["ingest"]["accepted"], 200);
    assert_eq!(v["delivery"]["delivered"], 400);
    assert_eq!(v["delivery"]["bad_signatures"], 0);
    assert_eq!(v["delivery"]["every_peer_got_every_event_once"], true);
}

/// Runs the load tool's small mode (200 events, 2 sinks) with `flags`; asserts it
/// succeeded and returns its table and its JSON figures.
fn small_load_run(flags: &[&str]) -> (String, Value) {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_parafed-bench"))
        .arg("--small")
        .args(flags)
        .args(["--json", json_path.to_str().unwrap()])
        .env("PARAFED_LOG", "warn")
        .output()
        .expect("run parafed-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{flags:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    (stdout, v)
}

/// The load tool's other starts count the same: `--warm` (one event to every sink first,
/// then forgotten) and `--ingest-alone` (the worker started after the last post) each
/// deliver exactly the 200 events of the run to both sinks, and the time inside alpha
/// is split by stage from the rows of those events.
#[test]
fn the_load_tool_counts_only_the_run_when_warm_or_ingesting_alone() {
    for flag in ["--warm", "--ingest-alone"] {
        let (_, v) = small_load_run(&[flag]);
        assert_eq!(v["ingest"]["accepted"], 200, "{flag}");
        assert_eq!(v["delivery"]["delivered"], 400, "{flag}");
        assert_eq!(
            v["delivery"]["every_peer_got_every_event_once"], true,
            "{flag}"
        );
        let stages = &v["end_to_end_ms"]["stages"];
        for stage in ["stored_to_accepted", "accepted_to_sent", "sent_to_answered"] {
            let p50 = stages[stage]["p50"].as_f64().unwrap_or(0.0);
            assert!(p50 > 0.0, "{flag}: {stage} {stages}");
        }
    }
}
