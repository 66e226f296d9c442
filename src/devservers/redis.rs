//! A throwaway Redis server (append-only file on, so a clean restart keeps its data, as
//! a production Redis would).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::spawn::spawn_tied;
use super::{free_port, io, server_dir, wait_until, DevServerError};

pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Sends an inline command and returns the first reply (for probes and tests).
pub fn command_line(port: u16, cmd: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{cmd}\r\n").as_bytes())?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
}

impl Redis {
    pub async fn start() -> Result<Redis, DevServerError> {
        let mut r = Redis {
            port: free_port()?,
            dir: server_dir("redis")?,
            child: None,
        };
        r.start_again().await?;
        Ok(r)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts (again) on the same port and directory.
    pub async fn start_again(&mut self) -> Result<(), DevServerError> {
        if self.child.is_some() {
            return Ok(());
        }
        let bin =
            std::env::var("PARAFED_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
        ])
        .arg(&self.dir)
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        self.child = Some(
            spawn_tied(cmd)
                .map_err(io(format!("starting {bin} (apt-get install redis-server)")))?,
        );
        let port = self.port;
        wait_until(
            "redis to answer PING",
            Duration::from_secs(30),
            || async move {
                command_line(port, "PING")
                    .ok()
                    .filter(|r| r == "+PONG")
                    .map(|_| ())
            },
        )
        .await
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = command_line(self.port, "SHUTDOWN");
            let _ = c.wait();
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts it again with nothing kept: what a Redis restart
    /// without persistence does to parafed's queues.
    pub async fn restart_empty(&mut self) -> Result<(), DevServerError> {
        self.kill();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
        self.start_again().await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
