//! What both binaries do around `main`: start the async runtime, run, and turn the
//! outcome into an exit status (0 success, 1 runtime failure; errors on stderr).

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

/// Runs `fut` on a multi-threaded runtime and reports its outcome.
pub fn run_main<F, E>(fut: F) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: Display,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
