//! Prometheus metrics: every family parafed reports ([`FAMILIES`]), the process-wide
//! recorder, and the `/metrics` listener.
//!
//! Names carry the `parafed_` prefix and base units; histograms get explicit buckets (the
//! exporter would otherwise render summaries). Labels are bounded sets chosen in the
//! code (route, status class, reason, queue, state), never a peer's name: peers choose
//! their names, and one label value per peer is unbounded cardinality.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// Latency buckets of one request or job, seconds: 0.5 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// End-to-end delivery latency buckets, seconds: 5 ms to a day (a destination that was
/// down delivers its backlog hours late).
const DELIVERY_LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 21600.0, 86400.0,
];
/// Events per group commit.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Which process is describing its metrics: each registers the series it reports, at
/// zero, so a scrape shows every family from the start (alerts and dashboards never
/// look at a name that does not exist yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Ingress,
    Worker,
}

/// One metric family: name, type, help text, and the roles that report it.
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    pub roles: &'static [Role],
}

/// Prometheus metric types parafed uses (never summaries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

const I: &[Role] = &[Role::Ingress];
const W: &[Role] = &[Role::Worker];
const IW: &[Role] = &[Role::Ingress, Role::Worker];

/// Every metric parafed reports. docs/operations.md lists the same (a test compares both
/// with a live scrape).
pub const FAMILIES: &[Family] = &[
    Family { name: "parafed_build_info", kind: Kind::Gauge, help: "Always 1; the version label says which parafed runs.", labels: &["version"], roles: IW },
    Family { name: "parafed_http_requests_total", kind: Kind::Counter, help: "HTTP requests answered, by route and status class.", labels: &["route", "status"], roles: I },
    Family { name: "parafed_http_request_duration_seconds", kind: Kind::Histogram, help: "Time to answer an HTTP request, by route.", labels: &["route"], roles: I },
    Family { name: "parafed_ingress_refused_total", kind: Kind::Counter, help: "Federation requests refused before storing, by reason.", labels: &["reason"], roles: I },
    Family { name: "parafed_events_received_total", kind: Kind::Counter, help: "Events peers posted that were accepted for storage, by result (stored, duplicate).", labels: &["result"], roles: I },
    Family { name: "parafed_signature_verifications_total", kind: Kind::Counter, help: "Signature checks, by kind (transport, envelope) and result (valid, invalid).", labels: &["kind", "result"], roles: IW },
    Family { name: "parafed_intake_batch_size", kind: Kind::Histogram, help: "Inbound events stored per group commit.", labels: &[], roles: I },
    Family { name: "parafed_enqueue_failures_total", kind: Kind::Counter, help: "Jobs the ingress could not push to Redis (the reconciler pushes them later), by queue.", labels: &["queue"], roles: I },
    Family { name: "parafed_key_fetches_total", kind: Kind::Counter, help: "Fetches of peers' /keys.", labels: &[], roles: IW },
    Family { name: "parafed_jobs_total", kind: Kind::Counter, help: "Jobs finished, by queue and outcome (ok, error); jobs read together and run as one count one each.", labels: &["queue", "outcome"], roles: W },
    Family { name: "parafed_job_duration_seconds", kind: Kind::Histogram, help: "Time a run took, by queue (jobs read together run as one).", labels: &["queue"], roles: W },
    Family { name: "parafed_events_verified_total", kind: Kind::Counter, help: "Inbound events verified, by verdict (accepted, rejected).", labels: &["verdict"], roles: W },
    Family { name: "parafed_outbound_rows_total", kind: Kind::Counter, help: "Deliveries created by fan-out (one per event and destination).", labels: &[], roles: W },
    Family { name: "parafed_outbound_deferred_total", kind: Kind::Counter, help: "Deliveries fan-out left to a deferral (a destination that was not healthy): the drain writes them when it may send again.", labels: &[], roles: W },
    Family { name: "parafed_delivery_attempts_total", kind: Kind::Counter, help: "Requests sent to peers, by result (delivered, resign, permanent, transient, destination_problem).", labels: &["result"], roles: W },
    Family { name: "parafed_delivery_duration_seconds", kind: Kind::Histogram, help: "Time of one delivery request, send to answer read.", labels: &[], roles: W },
    Family { name: "parafed_deliveries_total", kind: Kind::Counter, help: "Deliveries finished, one per event and destination, by outcome (delivered, dead, cancelled).", labels: &["outcome"], roles: W },
    Family { name: "parafed_delivery_latency_seconds", kind: Kind::Histogram, help: "End to end: from the event stored here to delivered at the destination.", labels: &[], roles: W },
    Family { name: "parafed_destination_backoffs_total", kind: Kind::Counter, help: "Times a destination started or continued backing off.", labels: &[], roles: W },
    Family { name: "parafed_reconciled_jobs_total", kind: Kind::Counter, help: "Events whose verify or fanout job was pushed again because Redis lost it.", labels: &[], roles: W },
    Family { name: "parafed_queue_read_errors_total", kind: Kind::Counter, help: "Failed reads of a job stream (Redis errors; retried).", labels: &[], roles: W },
    Family { name: "parafed_queue_jobs", kind: Kind::Gauge, help: "Jobs in a queue, by queue and state (ready, in_flight, dead); fleet-wide, reported by every worker.", labels: &["queue", "state"], roles: W },
    Family { name: "parafed_queue_oldest_job_age_seconds", kind: Kind::Gauge, help: "Age of the oldest job still in a queue (ready or in flight), by queue; 0 when empty.", labels: &["queue"], roles: W },
    Family { name: "parafed_destinations", kind: Kind::Gauge, help: "Destinations by state (healthy, backing_off, held, paused, blocked); fleet-wide.", labels: &["state"], roles: W },
    Family { name: "parafed_deliveries_waiting", kind: Kind::Gauge, help: "Deliveries not yet settled (the backlog), all destinations; fleet-wide.", labels: &[], roles: W },
    Family { name: "parafed_outbound_deferrals", kind: Kind::Gauge, help: "Deferrals: (destination, room) pairs owed a room's events without a row per event, while the destination cannot be reached; fleet-wide.", labels: &[], roles: W },
    Family { name: "parafed_events_held", kind: Kind::Gauge, help: "Inbound events held from quarantined peers; fleet-wide.", labels: &[], roles: W },
    Family { name: "parafed_peers_quarantined", kind: Kind::Gauge, help: "Peers in quarantine, by how they got there (automatic: true, false); fleet-wide.", labels: &["automatic"], roles: W },
    Family { name: "parafed_delivery_requests_in_flight", kind: Kind::Gauge, help: "Delivery requests this worker's drains have out now, all destinations together; at worker.max_requests_in_flight, rounds wait for a share.", labels: &[], roles: W },
    Family { name: "parafed_worker_heartbeat_timestamp_seconds", kind: Kind::Gauge, help: "Unix time of this worker's last scheduler tick.", labels: &[], roles: W },
];

/// A counter series a role registers at zero: name, labels, role.
type Zero = (&'static str, &'static [(&'static str, &'static str)], Role);

/// The label values each role reports from the start (counters at zero).
const ZEROS: &[Zero] = &[
    (
        "parafed_deliveries_total",
        &[("outcome", "delivered")],
        Role::Worker,
    ),
    (
        "parafed_deliveries_total",
        &[("outcome", "dead")],
        Role::Worker,
    ),
    (
        "parafed_deliveries_total",
        &[("outcome", "cancelled")],
        Role::Worker,
    ),
    (
        "parafed_delivery_attempts_total",
        &[("result", "delivered")],
        Role::Worker,
    ),
    (
        "parafed_delivery_attempts_total",
        &[("result", "resign")],
        Role::Worker,
    ),
    (
        "parafed_delivery_attempts_total",
        &[("result", "permanent")],
        Role::Worker,
    ),
    (
        "parafed_delivery_attempts_total",
        &[("result", "transient")],
        Role::Worker,
    ),
    (
        "parafed_delivery_attempts_total",
        &[("result", "destination_problem")],
        Role::Worker,
    ),
    (
        "parafed_events_verified_total",
        &[("verdict", "accepted")],
        Role::Worker,
    ),
    (
        "parafed_events_verified_total",
        &[("verdict", "rejected")],
        Role::Worker,
    ),
    ("parafed_destination_backoffs_total", &[], Role::Worker),
    ("parafed_reconciled_jobs_total", &[], Role::Worker),
    ("parafed_queue_read_errors_total", &[], Role::Worker),
    ("parafed_outbound_rows_total", &[], Role::Worker),
    ("parafed_outbound_deferred_total", &[], Role::Worker),
    ("parafed_key_fetches_total", &[], Role::Worker),
    ("parafed_key_fetches_total", &[], Role::Ingress),
    (
        "parafed_events_received_total",
        &[("result", "stored")],
        Role::Ingress,
    ),
    (
        "parafed_events_received_total",
        &[("result", "duplicate")],
        Role::Ingress,
    ),
    (
        "parafed_ingress_refused_total",
        &[("reason", "bad_signature")],
        Role::Ingress,
    ),
    (
        "parafed_enqueue_failures_total",
        &[("queue", "verify")],
        Role::Ingress,
    ),
    (
        "parafed_enqueue_failures_total",
        &[("queue", "fanout")],
        Role::Ingress,
    ),
    (
        "parafed_signature_verifications_total",
        &[("kind", "envelope"), ("result", "invalid")],
        Role::Worker,
    ),
    (
        "parafed_signature_verifications_total",
        &[("kind", "envelope"), ("result", "valid")],
        Role::Worker,
    ),
    (
        "parafed_signature_verifications_total",
        &[("kind", "transport"), ("result", "invalid")],
        Role::Ingress,
    ),
    (
        "parafed_signature_verifications_total",
        &[("kind", "transport"), ("result", "valid")],
        Role::Ingress,
    ),
];

/// Describes this role's metric families (HELP and TYPE lines) and registers their
/// counters at zero. Call once after [`recorder`].
pub fn describe(role: Role) {
    for f in FAMILIES.iter().filter(|f| f.roles.contains(&role)) {
        match f.kind {
            Kind::Counter => metrics::describe_counter!(f.name, f.help),
            Kind::Gauge => metrics::describe_gauge!(f.name, f.help),
            Kind::Histogram => metrics::describe_histogram!(f.name, f.help),
        }
    }
    metrics::gauge!("parafed_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Histograms without labels are registered empty, so they are rendered from the start.
    for f in FAMILIES
        .iter()
        .filter(|f| f.roles.contains(&role) && f.kind == Kind::Histogram && f.labels.is_empty())
    {
        let _ = metrics::histogram!(f.name);
    }
    for (name, labels, r) in ZEROS {
        if *r != role {
            continue;
        }
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, *v))
            .collect();
        metrics::counter!(*name, labels).increment(0);
    }
}

/// Counts one signature check (`kind`: `transport` or `envelope`).
pub fn signature_checked(kind: &'static str, valid: bool) {
    metrics::counter!(
        "parafed_signature_verifications_total",
        "kind" => kind,
        "result" => if valid { "valid" } else { "invalid" }
    )
    .increment(1);
}

/// Installs the recorder once per process and returns its handle.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                // Every histogram gets buckets: the exporter would otherwise render a
                // summary, which cannot be aggregated across processes.
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("parafed_delivery_latency_seconds".into()),
                        DELIVERY_LATENCY_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("parafed_intake_batch_size".into()),
                        BATCH_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => {
                    let upkeep = h.clone();
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        rt.spawn(async move {
                            loop {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                                upkeep.run_upkeep();
                            }
                        });
                    }
                    h
                }
                // Another recorder is installed (an embedding program): render ours empty.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        let mut r = Response::new(Full::new(Bytes::from(handle.render())));
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        r
                    } else {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"see /metrics\n")));
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        r
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
