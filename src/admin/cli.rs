//! `parafed admin …`: the command line over the admin API of a running ingress
//! (`--url` / `PARAFED_ADMIN_URL`, bearer token from `PARAFED_ADMIN_TOKEN`). It needs no
//! configuration file, database or Redis: each command is one API call, and the answer
//! is printed as a table (default) or, with `--output json`, as the API's own JSON
//! document on stdout — one shape for both, documented in `docs/admin.md`.
//!
//! Exit codes: 0 success; 1 the call failed (the server refused it, or could not be
//! reached); 2 usage (a bad argument, or a destructive command without `--yes`);
//! 3 not found. Destructive commands (cancel, purge, bulk retry and redrive, key
//! rotation, blocking a peer) require `--yes`; with `--dry-run` a bulk command only reports what it
//! would change, and needs no `--yes`.

use std::time::Duration;

use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};

use crate::remote::HttpClient;

/// Exit status of a successful command.
pub const EXIT_OK: u8 = 0;
/// The call failed.
pub const EXIT_FAILED: u8 = 1;
/// Bad usage, or a destructive command without `--yes`.
pub const EXIT_USAGE: u8 = 2;
/// The job, delivery, destination or event does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;

/// Largest admin answer read (a page of 1 000 items fits).
const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Base URL of a running `parafed serve`.
    #[arg(
        long,
        env = "PARAFED_ADMIN_URL",
        default_value = "http://127.0.0.1:8448"
    )]
    pub url: String,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Fleet overview: processes, queues, destinations, deliveries, dead letters.
    Status,
    /// The job queues (verify, fanout, deliver).
    #[command(subcommand)]
    Queues(QueuesCommand),
    /// Jobs in the queues and their dead streams.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Deliveries: one outbound row per (destination, event).
    #[command(subcommand)]
    Deliveries(DeliveriesCommand),
    /// Destinations: the peers we deliver to.
    #[command(subcommand)]
    Destinations(DestinationsCommand),
    /// Stored events and what happened to them.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Trust and safety: allow, block, quarantine, limits, the federation mode.
    #[command(subcommand)]
    Peers(PeersCommand),
    /// Our signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The audit trail of admin changes.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Args)]
pub struct PageArgs {
    /// The `next_cursor` of the previous page.
    #[arg(long)]
    pub cursor: Option<String>,
    /// Items per page (1–1000).
    #[arg(long)]
    pub limit: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum QueuesCommand {
    /// Every queue: ready, in flight, dead, oldest age, paused.
    List,
    /// One queue.
    Stats { queue: String },
    /// Stop every worker of the fleet taking jobs from a queue (within a second).
    Pause { queue: String },
    /// Let workers take jobs from a paused queue again.
    Resume { queue: String },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Jobs by queue and state (ready, in_flight, dead), oldest first.
    List {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        state: Option<String>,
        /// Only jobs pushed more than this many seconds ago.
        #[arg(long)]
        older_than: Option<i64>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// One job, with its last error.
    Show { queue: String, id: String },
    /// Put one dead job back into its queue.
    Retry { queue: String, id: String },
    /// Remove one job (its work is re-queued by the reconciler if still unfinished).
    Cancel {
        queue: String,
        id: String,
        #[arg(long)]
        yes: bool,
    },
    /// Put every dead job (of one queue, or all) back into its queue.
    Redrive {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        yes: bool,
    },
    /// Delete every dead job (of one queue, or all).
    Purge {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub struct DeliveryFilterArgs {
    #[arg(long)]
    pub destination: Option<String>,
    /// pending, in_flight, delivered, dead or cancelled.
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub event: Option<String>,
    /// Only deliveries created more than this many seconds ago.
    #[arg(long)]
    pub older_than: Option<i64>,
}

impl DeliveryFilterArgs {
    fn is_empty(&self) -> bool {
        self.destination.is_none()
            && self.state.is_none()
            && self.event.is_none()
            && self.older_than.is_none()
    }
}

#[derive(Debug, Args)]
pub struct DeliveryChangeArgs {
    /// One delivery; without it, every delivery matching the filter.
    pub id: Option<i64>,
    #[command(flatten)]
    pub filter: DeliveryFilterArgs,
    /// Report what would change, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// Deliveries by destination, state, event and age, newest first.
    List {
        #[command(flatten)]
        filter: DeliveryFilterArgs,
        #[command(flatten)]
        page: PageArgs,
    },
    /// One delivery with every attempt.
    Show { id: i64 },
    /// Send dead or cancelled deliveries again, in order for their room.
    Retry(DeliveryChangeArgs),
    /// Cancel pending deliveries (kept, visible as cancelled).
    Cancel(DeliveryChangeArgs),
    /// Delete settled deliveries (dead, cancelled, delivered) and their attempts.
    Purge(DeliveryChangeArgs),
}

#[derive(Debug, Subcommand)]
pub enum DestinationsCommand {
    /// Destinations with state, backlog, oldest pending, last error, next attempt.
    List {
        /// healthy, backing_off, held or paused.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// One destination with its recent attempts.
    Show { name: String },
    /// Probe now instead of at the end of the backoff.
    RetryNow { name: String },
    /// Stop delivering to one destination (others continue).
    Pause {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deliver again; the backlog drains in order.
    Resume { name: String },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Events by room, origin and status, newest first.
    List {
        #[arg(long)]
        room: Option<String>,
        #[arg(long)]
        origin: Option<String>,
        /// pending, accepted, rejected or held.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Why an event was (not) delivered: verification, every destination and attempt,
    /// and what happens next.
    Show { event_id: String },
}

#[derive(Debug, Args)]
pub struct DecisionArgs {
    pub name: String,
    /// Why (kept with the decision and in the audit trail).
    #[arg(long)]
    pub reason: Option<String>,
    /// The decision lapses after this many seconds (default: until changed).
    #[arg(long)]
    pub for_secs: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum PeersCommand {
    /// Peers with a decision or limits of their own.
    List {
        /// allow, block, quarantine or none.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// A peer's standing, limits, offence counts, held events and audit trail.
    Show { name: String },
    /// Allow a peer (in allowlist mode, only allowed peers federate).
    Allow(DecisionArgs),
    /// Refuse a peer's requests and cancel its waiting deliveries.
    Block {
        #[command(flatten)]
        decision: DecisionArgs,
        #[arg(long)]
        yes: bool,
    },
    /// Hold a peer's events (stored, not processed) and deliveries to it.
    Quarantine(DecisionArgs),
    /// Lift a quarantine and process the peer's held events in order.
    Release { name: String },
    /// Delete a peer's held events.
    Purge {
        name: String,
        #[arg(long)]
        yes: bool,
    },
    /// Set a peer's own limits (without options: back to the defaults).
    RateLimit {
        name: String,
        /// Requests per minute across the fleet (0 = unlimited).
        #[arg(long)]
        per_minute: Option<u32>,
        /// Requests in flight at once per ingress process.
        #[arg(long)]
        in_flight: Option<u32>,
    },
    /// Show, or switch, the federation mode for the whole fleet (no restart).
    Mode {
        /// open or allowlist; absent: show it.
        mode: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Our signing keys, active and retired.
    List,
    /// Retire the active key and make a new one.
    Rotate {
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Admin changes, newest first.
    List {
        /// Only actions starting with this, e.g. `deliveries.`.
        #[arg(long)]
        action: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// One admin API call.
#[derive(Debug, PartialEq)]
pub struct Call {
    pub method: Method,
    /// Path after `/_parafed/admin/v1`, query included.
    pub path: String,
    /// JSON body of a POST.
    pub body: Option<Value>,
}

/// Why a command was refused before any call.
#[derive(Debug, PartialEq, Eq)]
pub struct Usage(pub String);

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// A GET of a list: its filters and the page asked for, as the query string.
fn list(path: &str, mut filters: Vec<(&'static str, Option<String>)>, p: &PageArgs) -> Call {
    filters.push(("cursor", p.cursor.clone()));
    filters.push(("limit", p.limit.map(|l| l.to_string())));
    get(format!("{path}{}", query(&filters)))
}

fn get(path: String) -> Call {
    Call {
        method: Method::GET,
        path,
        body: None,
    }
}

fn post(path: String, body: Value) -> Call {
    Call {
        method: Method::POST,
        path,
        body: Some(body),
    }
}

fn confirm(yes: bool, dry_run: bool, what: &str) -> Result<(), Usage> {
    if yes || dry_run {
        Ok(())
    } else {
        Err(Usage(format!(
            "{what} changes data: run it again with --yes (or --dry-run to see what it would change)"
        )))
    }
}

/// The API call a command makes; `Usage` when it must not be made as given.
pub fn call_for(cmd: &AdminCommand) -> Result<Call, Usage> {
    use AdminCommand as A;
    Ok(match cmd {
        A::Status => get("/status".into()),
        A::Queues(q) => match q {
            QueuesCommand::List => get("/queues".into()),
            QueuesCommand::Stats { queue } => get(format!("/queues/{}", enc(queue))),
            QueuesCommand::Pause { queue } => {
                post(format!("/queues/{}/pause", enc(queue)), json!({}))
            }
            QueuesCommand::Resume { queue } => {
                post(format!("/queues/{}/resume", enc(queue)), json!({}))
            }
        },
        A::Jobs(j) => match j {
            JobsCommand::List {
                queue,
                state,
                older_than,
                page: p,
            } => list(
                "/jobs",
                vec![
                    ("queue", queue.clone()),
                    ("state", state.clone()),
                    ("older_than_secs", older_than.map(|s| s.to_string())),
                ],
                p,
            ),
            JobsCommand::Show { queue, id } => get(format!("/jobs/{}/{}", enc(queue), enc(id))),
            JobsCommand::Retry { queue, id } => {
                post(format!("/jobs/{}/{}/retry", enc(queue), enc(id)), json!({}))
            }
            JobsCommand::Cancel { queue, id, yes } => {
                confirm(*yes, false, "jobs cancel")?;
                post(
                    format!("/jobs/{}/{}/cancel", enc(queue), enc(id)),
                    json!({}),
                )
            }
            JobsCommand::Redrive {
                queue,
                dry_run,
                yes,
            } => {
                confirm(*yes, *dry_run, "jobs redrive")?;
                post(
                    "/jobs/redrive".into(),
                    json!({ "queue": queue, "dry_run": dry_run }),
                )
            }
            JobsCommand::Purge {
                queue,
                dry_run,
                yes,
            } => {
                confirm(*yes, *dry_run, "jobs purge")?;
                post(
                    "/jobs/purge".into(),
                    json!({ "queue": queue, "dry_run": dry_run }),
                )
            }
        },
        A::Deliveries(d) => match d {
            DeliveriesCommand::List { filter, page: p } => list(
                "/deliveries",
                vec![
                    ("destination", filter.destination.clone()),
                    ("state", filter.state.clone()),
                    ("event_id", filter.event.clone()),
                    ("older_than_secs", filter.older_than.map(|s| s.to_string())),
                ],
                p,
            ),
            DeliveriesCommand::Show { id } => get(format!("/deliveries/{id}")),
            DeliveriesCommand::Retry(a) => delivery_change("retry", a, false)?,
            DeliveriesCommand::Cancel(a) => delivery_change("cancel", a, true)?,
            DeliveriesCommand::Purge(a) => delivery_change("purge", a, true)?,
        },
        A::Destinations(d) => match d {
            DestinationsCommand::List { state, page: p } => {
                list("/destinations", vec![("state", state.clone())], p)
            }
            DestinationsCommand::Show { name } => get(format!("/destinations/{}", enc(name))),
            DestinationsCommand::RetryNow { name } => {
                post(format!("/destinations/{}/retry-now", enc(name)), json!({}))
            }
            DestinationsCommand::Pause { name, reason } => post(
                format!("/destinations/{}/pause", enc(name)),
                json!({ "reason": reason }),
            ),
            DestinationsCommand::Resume { name } => {
                post(format!("/destinations/{}/resume", enc(name)), json!({}))
            }
        },
        A::Events(e) => match e {
            EventsCommand::List {
                room,
                origin,
                status,
                page: p,
            } => list(
                "/events",
                vec![
                    ("room_id", room.clone()),
                    ("origin", origin.clone()),
                    ("status", status.clone()),
                ],
                p,
            ),
            EventsCommand::Show { event_id } => get(format!("/events/{}", enc(event_id))),
        },
        A::Peers(p) => match p {
            PeersCommand::List { state, page: pg } => {
                list("/peers", vec![("state", state.clone())], pg)
            }
            PeersCommand::Show { name } => get(format!("/peers/{}", enc(name))),
            PeersCommand::Allow(d) => decision("allow", d),
            PeersCommand::Block { decision: d, yes } => {
                confirm(*yes, false, "peers block")?;
                decision("block", d)
            }
            PeersCommand::Quarantine(d) => decision("quarantine", d),
            PeersCommand::Release { name } => {
                post(format!("/peers/{}/release", enc(name)), json!({}))
            }
            PeersCommand::Purge { name, yes } => {
                confirm(*yes, false, "peers purge")?;
                post(format!("/peers/{}/purge", enc(name)), json!({}))
            }
            PeersCommand::RateLimit {
                name,
                per_minute,
                in_flight,
            } => post(
                format!("/peers/{}/rate-limit", enc(name)),
                json!({ "per_minute": per_minute, "in_flight": in_flight }),
            ),
            PeersCommand::Mode { mode: None } => get("/peers/mode".into()),
            PeersCommand::Mode { mode: Some(m) } => {
                post("/peers/mode".into(), json!({ "mode": m }))
            }
        },
        A::Keys(k) => match k {
            KeysCommand::List => get("/keys".into()),
            KeysCommand::Rotate { yes } => {
                confirm(*yes, false, "keys rotate")?;
                post("/keys/rotate".into(), json!({}))
            }
        },
        A::Audit(AuditCommand::List { action, page: p }) => {
            list("/audit", vec![("action", action.clone())], p)
        }
    })
}

fn decision(op: &str, d: &DecisionArgs) -> Call {
    post(
        format!("/peers/{}/{op}", enc(&d.name)),
        json!({ "reason": d.reason, "for_secs": d.for_secs }),
    )
}

fn delivery_change(op: &str, a: &DeliveryChangeArgs, destructive: bool) -> Result<Call, Usage> {
    if let Some(id) = a.id {
        if !a.filter.is_empty() || a.dry_run {
            return Err(Usage(format!(
                "deliveries {op} takes either a delivery id or filters (--destination, --state, --event, --older-than), not both; --dry-run is for filters"
            )));
        }
        if destructive {
            confirm(a.yes, false, &format!("deliveries {op}"))?;
        }
        return Ok(post(format!("/deliveries/{id}/{op}"), json!({})));
    }
    if a.filter.is_empty() {
        return Err(Usage(format!(
            "deliveries {op} needs a delivery id or at least one filter (--destination, --state, --event, --older-than)"
        )));
    }
    // Every bulk change is confirmed: it can touch thousands of rows.
    confirm(a.yes, a.dry_run, &format!("deliveries {op}"))?;
    Ok(post(
        format!("/deliveries/{op}"),
        json!({
            "destination": a.filter.destination,
            "state": a.filter.state,
            "event_id": a.filter.event,
            "older_than_secs": a.filter.older_than,
            "dry_run": a.dry_run,
        }),
    ))
}

/// What a command ended with: the exit code, and the document (or error) to print.
pub struct Outcome {
    pub code: u8,
    pub document: Value,
}

/// Makes the call. The token comes from `PARAFED_ADMIN_TOKEN`.
pub async fn run(url: &str, token: Option<&str>, call: &Call) -> Outcome {
    let failed = |code: u8, message: String| Outcome {
        code,
        document: json!({ "code": "CLIENT_ERROR", "message": message }),
    };
    let Some(token) = token else {
        return failed(
            EXIT_USAGE,
            "set PARAFED_ADMIN_TOKEN to the admin API's token".into(),
        );
    };
    let client = HttpClient::new(Duration::from_secs(5), Duration::from_secs(120));
    let full = format!(
        "{}/_parafed/admin/v1{}",
        url.trim_end_matches('/'),
        call.path
    );
    let body = call
        .body
        .as_ref()
        .map(|b| bytes::Bytes::from(b.to_string()))
        .unwrap_or_default();
    let mut headers = vec![("authorization", format!("Bearer {token}"))];
    if call.body.is_some() {
        headers.push(("content-type", "application/json".into()));
    }
    let resp = match client
        .send(call.method.clone(), &full, &headers, body, MAX_ANSWER_BYTES)
        .await
    {
        Ok(r) => r,
        Err(e) => return failed(EXIT_FAILED, format!("cannot reach {url}: {e}")),
    };
    let document: Value = serde_json::from_slice(&resp.body).unwrap_or_else(|_| {
        json!({
            "code": "BAD_ANSWER",
            "message": format!("{} answered {} with a body that is not JSON", url, resp.status),
        })
    });
    let code = match resp.status.as_u16() {
        200..=299 => EXIT_OK,
        404 => EXIT_NOT_FOUND,
        400 => EXIT_USAGE,
        _ => EXIT_FAILED,
    };
    Outcome { code, document }
}

/// Renders an answer as text tables: lists as columns, objects as `key: value` lines,
/// nested lists of objects as their own tables.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    render_into(&mut out, v, "");
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Object(m) if m.is_empty() => "-".into(),
        other => {
            let s = other.to_string();
            if s.chars().count() > 60 {
                format!("{}…", s.chars().take(59).collect::<String>())
            } else {
                s
            }
        }
    }
}

fn is_table(v: &Value) -> bool {
    matches!(v, Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_object))
}

/// Rows holding objects or lists of their own (an event's destinations, each with its
/// delivery and attempts) read better as one block per row than as a table.
fn is_nested(rows: &[Value]) -> bool {
    rows.iter().any(|r| {
        r.as_object().is_some_and(|m| {
            m.values()
                .any(|v| matches!(v, Value::Object(o) if !o.is_empty()) || is_table(v))
        })
    })
}

fn render_table(out: &mut String, rows: &[Value], indent: &str) {
    if is_nested(rows) {
        for (i, r) in rows.iter().enumerate() {
            out.push_str(&format!("{indent}[{}]\n", i + 1));
            render_into(out, r, &format!("{indent}  "));
        }
        return;
    }
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        if let Value::Object(m) = r {
            for (k, v) in m {
                if !is_table(v) && !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| scalar(r.get(c).unwrap_or(&Value::Null)).replace(['\n', '\t'], " "))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain(std::iter::once(c.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<&str>| -> String {
        let padded: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        format!("{indent}{}\n", padded.join("  ").trim_end())
    };
    out.push_str(&line(
        cols.iter()
            .map(|c| c.to_uppercase())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
}

fn render_into(out: &mut String, v: &Value, indent: &str) {
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                if k == "items" && val.is_array() {
                    if is_table(val) {
                        render_table(out, val.as_array().map_or(&[][..], |a| a), indent);
                    } else {
                        out.push_str(&format!("{indent}(none)\n"));
                    }
                } else if is_table(val) {
                    out.push_str(&format!("{indent}{k}:\n"));
                    render_table(
                        out,
                        val.as_array().map_or(&[][..], |a| a),
                        &format!("{indent}  "),
                    );
                } else if let Value::Object(inner) = val {
                    if inner.is_empty() {
                        out.push_str(&format!("{indent}{k}: -\n"));
                    } else {
                        out.push_str(&format!("{indent}{k}:\n"));
                        render_into(out, val, &format!("{indent}  "));
                    }
                } else {
                    out.push_str(&format!("{indent}{k}: {}\n", scalar(val)));
                }
            }
        }
        Value::Array(a) if is_table(v) => render_table(out, a, indent),
        other => out.push_str(&format!("{indent}{}\n", scalar(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_objects() {
        let v = json!({
            "items": [{"id": 1, "state": "dead"}, {"id": 22, "state": "pending"}],
            "next_cursor": null,
        });
        let t = render(&v);
        assert!(t.contains("ID  STATE"), "{t}");
        assert!(t.contains("22  pending"), "{t}");
        assert!(t.contains("next_cursor: -"), "{t}");
        let v = json!({"event": {"event_id": "$a:b"}, "destinations": [{"destination": "x"}]});
        let t = render(&v);
        assert!(t.contains("event:\n  event_id: $a:b"), "{t}");
        assert!(t.contains("destinations:\n  DESTINATION\n  x"), "{t}");
    }

    #[test]
    fn destructive_commands_need_yes_and_bulk_needs_a_filter() {
        let purge = |yes, dry_run| {
            AdminCommand::Deliveries(DeliveriesCommand::Purge(DeliveryChangeArgs {
                id: None,
                filter: DeliveryFilterArgs {
                    destination: Some("beta.test".into()),
                    state: Some("dead".into()),
                    event: None,
                    older_than: None,
                },
                dry_run,
                yes,
            }))
        };
        assert!(call_for(&purge(false, false)).is_err());
        let c = call_for(&purge(false, true)).unwrap();
        assert_eq!(c.path, "/deliveries/purge");
        assert_eq!(c.body.as_ref().unwrap()["dry_run"], true);
        assert!(call_for(&purge(true, false)).is_ok());
        let none = AdminCommand::Deliveries(DeliveriesCommand::Retry(DeliveryChangeArgs {
            id: None,
            filter: DeliveryFilterArgs {
                destination: None,
                state: None,
                event: None,
                older_than: None,
            },
            dry_run: false,
            yes: true,
        }));
        assert!(call_for(&none).is_err());
        let one = AdminCommand::Deliveries(DeliveriesCommand::Retry(DeliveryChangeArgs {
            id: Some(5),
            filter: DeliveryFilterArgs {
                destination: None,
                state: None,
                event: None,
                older_than: None,
            },
            dry_run: false,
            yes: false,
        }));
        assert_eq!(call_for(&one).unwrap().path, "/deliveries/5/retry");
    }

    /// Every `parafed admin …` command the alert runbooks and the README name parses.
    #[test]
    fn runbook_and_doc_commands_exist() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            admin: AdminArgs,
        }
        let rules = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/prometheus/rules/parafed.rules.yml"
        ));
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"));
        // Backticked in the runbooks; whole lines in the README's shell blocks.
        let commands = rules
            .split("`parafed admin ")
            .skip(1)
            .map(|c| c.split('`').next().unwrap_or(""))
            .chain(
                readme
                    .lines()
                    .filter_map(|l| l.strip_prefix("parafed admin ")),
            );
        let mut checked = 0;
        for cmd in commands {
            let line = cmd
                .replace("{{ $labels.queue }}", "deliver")
                .replace("<name>", "beta.test");
            let mut args = vec!["admin".to_owned()];
            args.extend(
                line.split_whitespace()
                    .map(|w| w.trim_matches('\'').to_owned()),
            );
            if let Err(e) = T::try_parse_from(&args) {
                panic!("`parafed admin {cmd}` does not parse: {e}");
            }
            checked += 1;
        }
        assert!(checked >= 10, "{checked}");
    }

    #[test]
    fn ids_are_percent_encoded() {
        let c = call_for(&AdminCommand::Events(EventsCommand::Show {
            event_id: "$m_message_edit:1:2:alpha.test".into(),
        }))
        .unwrap();
        assert_eq!(
            c.path,
            "/events/%24m%5Fmessage%5Fedit%3A1%3A2%3Aalpha%2Etest"
        );
    }
}
