//! Throwaway Postgres and Redis servers, started from the installed server binaries on
//! free loopback ports in temporary directories. `parafed demo` and the test suite use
//! them; production never does.
//!
//! Servers are children of one long-lived spawner thread and carry `PR_SET_PDEATHSIG`,
//! so they die with the process that started them however it ends; their directories are
//! named after that process and swept by the next start if it was killed.

pub mod postgres;
pub mod redis;
pub mod spawn;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

pub use postgres::Postgres;
pub use redis::Redis;

/// Why a throwaway server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevServerError {
    let what = what.into();
    move |source| DevServerError::Io { what, source }
}

/// A free TCP port on 127.0.0.1 for a server process to bind next, never the same
/// twice in one process.
///
/// Chosen below the ephemeral range (Linux: 32 768 and up) and checked by binding it: a
/// port the kernel hands out for `127.0.0.1:0` and takes back can be handed out again —
/// to another listener, or as the local port of an outgoing connection — before the
/// server binds it, and the server would fail to start.
///
/// Errors: none free after 1 000 tries.
pub fn free_port() -> Result<u16, DevServerError> {
    static CHOSEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut chosen = CHOSEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let port = rand::random_range(20_000..32_000);
        if !chosen.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            chosen.push(port);
            return Ok(port);
        }
    }
    Err(DevServerError::Io {
        what: "finding a free port in 20000-31999 on 127.0.0.1".into(),
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

/// A fresh directory for one server, `parafed-dev-<pid>-<tag>-<n>` under the temp dir.
pub fn server_dir(tag: &str) -> Result<PathBuf, DevServerError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    sweep_stale_dirs();
    let dir = std::env::temp_dir().join(format!(
        "parafed-dev-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    Ok(dir)
}

/// Removes directories left by processes that no longer exist.
fn sweep_stale_dirs() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("parafed-dev-") else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
}

/// Polls `f` every 20 ms until it returns `Some`, or fails after `timeout`.
pub async fn wait_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut f: F,
) -> Result<T, DevServerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DevServerError::Timeout(timeout, what.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
