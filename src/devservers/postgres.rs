//! A throwaway PostgreSQL server.
//!
//! Postgres refuses to run as root, and CI runs as root: there the server runs as the
//! `postgres` system user (created by Debian's package), owning its temp directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::spawn::{signal, spawn_tied};
use super::{free_port, io, server_dir, DevServerError};

/// The directory holding `initdb` and `postgres`: `PARAFED_TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<v>/bin`.
fn bin_dir() -> Result<PathBuf, DevServerError> {
    if let Ok(p) = std::env::var("PARAFED_TEST_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let missing = || {
        DevServerError::Setup(
            "no PostgreSQL server binaries under /usr/lib/postgresql/<version>/bin \
             (apt-get install postgresql, or set PARAFED_TEST_PG_BIN)"
                .into(),
        )
    };
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| missing())?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).ok_or_else(missing)
}

/// `(uid, gid)` to run Postgres as: the `postgres` user when we are root.
fn run_as() -> Result<Option<(u32, u32)>, DevServerError> {
    // SAFETY: plain libc calls; getpwnam's result is read immediately.
    unsafe {
        if libc::geteuid() != 0 {
            return Ok(None);
        }
        let pw = libc::getpwnam(c"postgres".as_ptr());
        if pw.is_null() {
            return Err(DevServerError::Setup(
                "running as root needs a 'postgres' system user (apt-get install postgresql)"
                    .into(),
            ));
        }
        Ok(Some(((*pw).pw_uid, (*pw).pw_gid)))
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: chown on a path this process created.
        unsafe {
            libc::chown(c.as_ptr(), uid, gid);
        }
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
    bin: PathBuf,
    user: Option<(u32, u32)>,
    child: Option<Child>,
    /// Extra `name=value` server settings, passed as `-c` on every start.
    settings: Vec<String>,
}

impl Postgres {
    /// initdb + start, waiting until it accepts connections.
    pub async fn start() -> Result<Postgres, DevServerError> {
        Self::start_with(&[]).await
    }

    /// [`Postgres::start`] with extra server settings (`name=value`, as `postgres -c`),
    /// e.g. `shared_preload_libraries=pg_stat_statements` for the load tool.
    pub async fn start_with(settings: &[&str]) -> Result<Postgres, DevServerError> {
        let dir = server_dir("pg")?;
        let bin = bin_dir()?;
        let user = run_as()?;
        if let Some((uid, gid)) = user {
            chown(&dir, uid, gid);
        }
        let out = command(&bin.join("initdb"), user)
            .arg("-D")
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
            .map_err(io("running initdb"))?;
        if !out.status.success() {
            return Err(DevServerError::Setup(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let mut pg = Postgres {
            port: free_port()?,
            dir,
            bin,
            user,
            child: None,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
        };
        pg.start_again().await?;
        Ok(pg)
    }

    /// Starts the server on its data directory and port (after `stop` or `kill`).
    ///
    /// After a `kill`, the killed postmaster's backends may still hold its shared memory
    /// for a moment (they exit when they notice it is gone, later on a loaded machine);
    /// a postmaster started then refuses to run and exits. So a server that exits while
    /// we wait for it is started again, until it accepts connections or the time is up.
    pub async fn start_again(&mut self) -> Result<(), DevServerError> {
        if self.child.is_some() {
            return Ok(());
        }
        self.child = Some(self.spawn()?);
        let url = self.url("postgres");
        let timeout = Duration::from_secs(60);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if AsyncPgConnection::establish(&url).await.is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                self.child = Some(self.spawn()?);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(DevServerError::Timeout(
                    timeout,
                    "postgres to accept connections".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Launches the postmaster on the data directory and port, logging to
    /// `postgres.log` (appended: the log of a failed start stays readable).
    fn spawn(&self) -> Result<Child, DevServerError> {
        let log_path = self.dir.join("postgres.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("opening the postgres log"))?;
        if let Some((uid, gid)) = self.user {
            chown(&log_path, uid, gid);
        }
        let mut cmd = command(&self.bin.join("postgres"), self.user);
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
                // As docs/operations.md recommends for parafed's database: a backlog
                // that forms in seconds is planned with fresh statistics.
                "-c",
                "autovacuum_naptime=10s",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for s in &self.settings {
            cmd.args(["-c", s]);
        }
        spawn_tied(cmd).map_err(io("starting postgres"))
    }

    /// The server's log (removed with the server).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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

    /// Creates an empty database and returns its URL.
    pub async fn create_db(&self, name: &str) -> Result<String, DevServerError> {
        let mut c = AsyncPgConnection::establish(&self.url("postgres"))
            .await
            .map_err(|e| DevServerError::Setup(format!("connecting to postgres: {e}")))?;
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut c)
            .await
            .map_err(|e| DevServerError::Setup(format!("creating database {name}: {e}")))?;
        Ok(self.url(name))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
