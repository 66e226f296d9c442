//! Spawns server processes from one thread that lives as long as the process.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, and callers
//! (test harness threads, async tasks) come and go; spawning from a dedicated thread ties
//! the servers' lifetime to the process instead.

use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Request = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<Request>> {
    static TX: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        let spawned = std::thread::Builder::new()
            .name("dev-server-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static, so the loop only ends with the process;
                // park regardless so the parent-death link can never fire early.
                loop {
                    std::thread::park();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the spawner thread");
        }
        Mutex::new(tx)
    })
}

/// Spawns `cmd` so that it is killed (SIGKILL) when this process ends.
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| std::io::Error::other("spawner lock poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread did not answer"))?
}

/// Sends `sig` to the process `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this process spawned.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}
