//! `parafed-worker`: one process of the worker fleet. Runs every queue, or the ones named
//! with `--queues` / `PARAFED_WORKER_QUEUES`, until SIGTERM, then lets in-flight jobs
//! finish. Stateless: run as many as the load needs, on as many machines.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use parafed::config::Config;
use parafed::queue::QueueName;

#[derive(Parser)]
#[command(name = "parafed-worker", version, about = "parafed's job worker")]
struct Cli {
    /// Configuration file (TOML); settings can be overridden as PARAFED_<SECTION>_<KEY>.
    #[arg(long, env = "PARAFED_CONFIG")]
    config: Option<PathBuf>,
    /// Queues to run, comma-separated (verify, fanout, deliver); default all.
    #[arg(long, value_delimiter = ',')]
    queues: Vec<String>,
}

async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> ExitCode {
    parafed::telemetry::init();
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let names = if cli.queues.is_empty() {
        cfg.worker.queues.clone()
    } else {
        cli.queues
    };
    let mut queues = Vec::new();
    for n in &names {
        match QueueName::parse(n.trim()) {
            Some(q) => queues.push(q),
            None => {
                eprintln!("error: unknown queue {n:?}; queues are verify, fanout, deliver");
                return ExitCode::from(2);
            }
        }
    }
    if queues.is_empty() {
        queues = QueueName::ALL.to_vec();
    }
    // Every delivery request in flight holds a connection: the worker asks for the hard
    // limit on open files, not the (often 1 024) soft one.
    let needed = cfg.worker_open_files(queues.contains(&QueueName::Deliver));
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < needed => {
            tracing::warn!(open_files = n, needed,
                "the open-file limit is below what this worker may need: worker.deliver_concurrency × delivery.window + worker.probe_concurrency connections, plus 1024; raise it (LimitNOFILE) or lower those settings");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    parafed::process::run_main(async move {
        let handle = parafed::telemetry::metrics::recorder();
        parafed::telemetry::metrics::describe(parafed::telemetry::metrics::Role::Worker);
        let listener = parafed::telemetry::metrics::bind(cfg.worker.metrics_listen).await?;
        tokio::spawn(parafed::telemetry::metrics::serve(listener, handle));
        let app = parafed::app::App::new(cfg)?;
        parafed_jobs::fleet::run(app, &queues, shutdown_signal()).await
    })
}
