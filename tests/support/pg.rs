//! A throwaway PostgreSQL server.
//!
//! Postgres refuses to run as root, and CI runs as root: there the server runs as the
//! `postgres` system user (created by Debian's package), owning its temp directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tokio::sync::OnceCell;

use super::spawn::{signal, spawn_tied};
use super::{free_port, server_dir, wait_for};

/// The directory holding `initdb` and `postgres`: `PARAFED_TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<v>/bin`.
fn bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("PARAFED_TEST_PG_BIN") {
        return PathBuf::from(p);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)")
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .expect("no /usr/lib/postgresql/<version>/bin/postgres found")
}

/// `(uid, gid)` to run Postgres as: the `postgres` user when we are root.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: plain libc calls; getpwnam's result is read immediately.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let pw = libc::getpwnam(c"postgres".as_ptr());
        assert!(
            !pw.is_null(),
            "running as root needs a 'postgres' system user"
        );
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
    // SAFETY: chown on a path we created.
    unsafe {
        libc::chown(c.as_ptr(), uid, gid);
    }
}

fn command(bin: &Path, user: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(bin);
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
    }
    c.env_remove("PGDATA").env("LC_ALL", "C");
    c
}

pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

impl Postgres {
    /// initdb + start, waiting until it accepts connections.
    pub async fn start() -> Postgres {
        let dir = server_dir("pg");
        let user = run_as();
        if let Some((uid, gid)) = user {
            chown_tree(&dir, uid, gid);
        }
        let out = command(&bin_dir().join("initdb"), user)
            .args(["-D"])
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "-N",
            ])
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            port: free_port(),
            dir,
            user,
            child: None,
        };
        pg.start_again().await;
        pg
    }

    /// Starts the server on its data directory and port (after `stop` or `kill`).
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "postgres already running");
        let log = std::fs::File::create(self.dir.join("postgres.log")).expect("log file");
        if let Some((uid, gid)) = self.user {
            chown_tree(&self.dir.join("postgres.log"), uid, gid);
        }
        let mut cmd = command(&bin_dir().join("postgres"), self.user);
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=64MB",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(spawn_tied(cmd).expect("spawn postgres"));
        let url = self.url("postgres");
        wait_for(
            "postgres to accept connections",
            Duration::from_secs(60),
            || {
                let url = url.clone();
                async move { AsyncPgConnection::establish(&url).await.ok().map(|_| ()) }
            },
        )
        .await;
    }

    /// Fast shutdown (SIGINT) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGINT);
            let _ = c.wait();
        }
    }

    /// SIGKILL the postmaster, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a fresh, empty database and returns its URL.
    pub async fn create_db(&self, name: &str) -> String {
        let mut c = AsyncPgConnection::establish(&self.url("postgres"))
            .await
            .expect("connect to postgres db");
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut c)
            .await
            .expect("create database");
        self.url(name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Postgres shared by every test in this binary.
pub async fn shared() -> &'static Postgres {
    static PG: OnceCell<Postgres> = OnceCell::const_new();
    PG.get_or_init(Postgres::start).await
}

/// A fresh database on the shared server (unique name), not yet migrated.
pub async fn fresh_db() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    shared().await.create_db(&name).await
}

/// A fresh database with every migration applied.
pub async fn migrated_db() -> String {
    let url = fresh_db().await;
    parafed::store::migrate::run_pending(&url)
        .await
        .expect("migrations apply");
    url
}
