//! The `parafed` command: serve, migrate, keys, config, admin and demo.
//!
//! Data goes to stdout (`--output json` gives one JSON document), logs and errors to
//! stderr. Exit status 0 on success, 1 on a runtime failure, 2 on a usage or
//! configuration error, 3 when `parafed admin` is asked for something that does not
//! exist. Each command reads only the settings it uses: `migrate` and `keys` need only
//! the database (`PARAFED_DATABASE_URL`), `admin` only the admin API's URL and token.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use parafed::config::{Config, StoreSettings};
use parafed::store;

#[derive(Parser)]
#[command(
    name = "parafed",
    version,
    about = "Federation delivery for Paracord servers"
)]
struct Cli {
    /// Configuration file (TOML). Every setting can be overridden as PARAFED_<SECTION>_<KEY>.
    #[arg(long, global = true, env = "PARAFED_CONFIG")]
    config: Option<PathBuf>,
    /// Output format for command data.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable tables.
    #[value(alias = "text")]
    Table,
    /// One JSON document on stdout.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// A local two-server federation (alpha.test and beta.test) on throwaway Postgres and
    /// Redis, exchanging messages both ways.
    Demo {
        /// alpha's HTTP port; beta uses this + 2, metrics these + 1000.
        #[arg(long, default_value_t = 8448)]
        port: u16,
        /// Exit after the exchange instead of running until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Run the HTTP ingress: federation, local and admin APIs, and /metrics.
    Serve,
    /// Apply pending database migrations (a no-op when none are pending).
    Migrate,
    /// Manage our signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Operate a running fleet through its admin API (`PARAFED_ADMIN_URL`,
    /// `PARAFED_ADMIN_TOKEN`); see docs/admin.md.
    Admin(parafed::admin::cli::AdminArgs),
    /// Inspect configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create the first active signing key.
    Generate {
        /// Key id, `ed25519:<name>` (default: a random name).
        #[arg(long)]
        key_id: Option<String>,
    },
    /// Import a seed (64 hex characters, e.g. a Paracord key file) as the active key.
    Import {
        #[arg(long)]
        key_id: String,
        /// File holding the seed as 64 lowercase hex characters.
        #[arg(long)]
        seed_file: PathBuf,
    },
    /// List every key, active and retired.
    List,
    /// Retire the active key and create a new active one.
    Rotate {
        #[arg(long)]
        key_id: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and check the configuration; print the effective settings, secrets masked.
    Check,
}

fn main() -> ExitCode {
    parafed::telemetry::init();
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Demo { port, once } => {
            return parafed::process::run_main(parafed::demo::run(port, once))
        }
        Command::Admin(args) => return admin(args, cli.output),
        Command::Migrate | Command::Keys { .. } => {
            let settings = match StoreSettings::load(cli.config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            return parafed::process::run_main(database_command(cli.command, cli.output, settings));
        }
        other => other,
    };
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    parafed::process::run_main(run(command, cli.output, cfg))
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs `parafed admin …`: one admin API call, its answer on stdout.
fn admin(args: parafed::admin::cli::AdminArgs, output: Output) -> ExitCode {
    use parafed::admin::cli;
    let call = match cli::call_for(&args.command) {
        Ok(c) => c,
        Err(cli::Usage(m)) => {
            eprintln!("error: {m}");
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    let token = std::env::var("PARAFED_ADMIN_TOKEN").ok();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(cli::EXIT_FAILED);
        }
    };
    let outcome = rt.block_on(cli::run(&args.url, token.as_deref(), &call));
    if outcome.code == cli::EXIT_OK {
        if output == Output::Json {
            println!(
                "{}",
                serde_json::to_string_pretty(&outcome.document).unwrap_or_default()
            );
        } else {
            print!("{}", cli::render(&outcome.document));
        }
    } else {
        let message = outcome.document["message"]
            .as_str()
            .map_or_else(|| outcome.document.to_string(), str::to_owned);
        if output == Output::Json {
            println!(
                "{}",
                serde_json::to_string_pretty(&outcome.document).unwrap_or_default()
            );
        }
        eprintln!("error: {message}");
    }
    ExitCode::from(outcome.code)
}

/// `migrate` and `keys`: they need the database settings only.
async fn database_command(
    command: Command,
    output: Output,
    settings: StoreSettings,
) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let applied = store::migrate::run_pending(&settings.database.url).await?;
            if output == Output::Json {
                print_json(&serde_json::json!({ "applied": applied }))?;
            } else if applied.is_empty() {
                println!("database is up to date; nothing to apply");
            } else {
                for v in &applied {
                    println!("applied {v}");
                }
            }
        }
        Command::Keys { command } => keys(command, output, &settings).await?,
        _ => anyhow::bail!("not a database command"),
    }
    Ok(())
}

async fn run(command: Command, output: Output, cfg: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(cfg).await?,
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let shown = cfg.redacted();
            if output == Output::Json {
                print_json(&shown)?;
            } else {
                print!(
                    "{}",
                    toml::to_string(&shown).context("rendering configuration")?
                );
            }
        }
        _ => anyhow::bail!("this command runs without the full configuration"),
    }
    Ok(())
}

async fn keys(command: KeysCommand, output: Output, cfg: &StoreSettings) -> anyhow::Result<()> {
    use parafed::protocol::{KeyId, Keypair};
    use parafed::store::keys;

    let pool = store::pool(&cfg.database.url, 2)?;
    let mut conn = pool.get().await.context("connecting to the database")?;
    let parse_id = |s: Option<String>| -> anyhow::Result<Option<KeyId>> {
        s.map(|s| KeyId::parse(&s)).transpose().map_err(Into::into)
    };
    let shown: Vec<keys::KeyInfo> = match command {
        KeysCommand::Generate { key_id } => {
            vec![keys::generate(&mut conn, parse_id(key_id)?).await?]
        }
        KeysCommand::Import { key_id, seed_file } => {
            let seed = std::fs::read_to_string(&seed_file)
                .with_context(|| format!("reading {}", seed_file.display()))?;
            let kp = Keypair::from_seed_hex(KeyId::parse(&key_id)?, &seed)
                .with_context(|| format!("reading the seed in {}", seed_file.display()))?;
            vec![keys::import(&mut conn, &kp).await?]
        }
        KeysCommand::List => keys::list(&mut conn).await?,
        KeysCommand::Rotate { key_id } => {
            let retention = chrono::Duration::seconds(
                i64::try_from(cfg.keys.retired_key_retention_secs).unwrap_or(i64::MAX / 1000),
            );
            let (old, new) = keys::rotate(&mut conn, parse_id(key_id)?, retention).await?;
            old.into_iter().chain(std::iter::once(new)).collect()
        }
    };
    if output == Output::Json {
        print_json(&serde_json::json!({ "keys": shown }))?;
    } else {
        for k in &shown {
            println!(
                "{}\t{}\t{}\tcreated {}{}",
                k.key_id,
                k.status,
                k.public_key,
                k.created_at.to_rfc3339(),
                k.verify_until
                    .map(|t| format!("\tverifies until {}", t.to_rfc3339()))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    use parafed::ingress::server;
    use parafed::telemetry::metrics;
    let handle = metrics::recorder();
    metrics::describe(metrics::Role::Ingress);
    let tls = match (&cfg.http.tls_cert, &cfg.http.tls_key) {
        (Some(c), Some(k)) => Some(server::tls_acceptor(c, k)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("binding {}", cfg.http.listen))?;
    let metrics_listener = metrics::bind(cfg.http.metrics_listen)
        .await
        .with_context(|| format!("binding {}", cfg.http.metrics_listen))?;
    let listen = cfg.http.listen;
    let app = parafed::app::App::new(cfg)?;
    if let Err(e) = app.signing_key().await {
        tracing::warn!(error = %e, "no signing key yet: /keys is empty and local events are refused");
    }
    tokio::spawn(metrics::serve(metrics_listener, handle));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    tokio::spawn(parafed::queue::heartbeat::keep_beating(
        app.queue.clone(),
        "ingress",
        format!("{host}-{}-{listen}", std::process::id()),
        Vec::new(),
    ));
    tracing::info!(%listen, tls = tls.is_some(), "parafed serving");
    server::serve(app, listener, tls, shutdown_signal()).await;
    tracing::info!("parafed stopped");
    Ok(())
}
