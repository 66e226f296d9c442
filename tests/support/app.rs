//! parafed instances and fake peers for tests, all real HTTP servers on 127.0.0.1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parafed::app::App;
use parafed::config::Config;
use parafed::protocol::{KeyId, Keypair, ServerName, TransportHeaders};
use tokio::net::TcpListener;

use super::redis::Redis;

/// A running parafed ingress with its own database and Redis.
pub struct TestServer {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub redis: Redis,
    pub db_url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Options for a test server.
pub struct Options {
    pub server_name: String,
    /// `(name, base_url)` peers.
    pub peers: Vec<(String, String)>,
    /// Extra TOML appended to the config (sections such as `[federation]`).
    pub extra_toml: String,
    pub local_token: Option<String>,
    pub admin_token: Option<String>,
    /// A listener bound in advance (so peers can be configured with its address).
    pub listener: Option<std::net::TcpListener>,
    /// Create a signing key before starting.
    pub signing_key: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            server_name: "paracord.test".into(),
            peers: Vec::new(),
            extra_toml: String::new(),
            local_token: Some("local-secret".into()),
            admin_token: Some("admin-secret".into()),
            listener: None,
            signing_key: false,
        }
    }
}

impl TestServer {
    pub async fn start(opts: Options) -> TestServer {
        let db_url = super::pg::migrated_db().await;
        let redis = Redis::start().await.expect("start a test Redis");
        let mut toml = format!(
            "server_name = \"{}\"\n{}\n[database]\nurl = \"{}\"\npool_size = 32\n[redis]\nurl = \"{}\"\n",
            opts.server_name,
            "",
            db_url,
            redis.url()
        );
        toml.push_str(&opts.extra_toml);
        if !opts.extra_toml.contains("[federation]") {
            toml.push_str("\n[federation]\ndiscovery = false\n");
        }
        for (name, base) in &opts.peers {
            toml.push_str(&format!("\n[peers.\"{name}\"]\nbase_url = \"{base}\"\n"));
        }
        let mut env = Vec::new();
        if let Some(t) = &opts.local_token {
            env.push(("PARAFED_LOCAL_TOKEN".to_owned(), t.clone()));
        }
        if let Some(t) = &opts.admin_token {
            env.push(("PARAFED_ADMIN_TOKEN".to_owned(), t.clone()));
        }
        let cfg = Config::from_toml_and_env(&toml, "test", env).expect("test config");
        if opts.signing_key {
            let pool = parafed::store::pool(&db_url, 1).unwrap();
            parafed::store::keys::generate(&mut pool.get().await.unwrap(), None)
                .await
                .unwrap();
        }
        Self::start_with(cfg, db_url, redis, opts.listener).await
    }

    pub async fn start_with(
        cfg: Config,
        db_url: String,
        redis: Redis,
        listener: Option<std::net::TcpListener>,
    ) -> TestServer {
        super::log_to_test_output();
        let app = App::new(cfg).expect("app");
        let listener = match listener {
            Some(l) => {
                l.set_nonblocking(true).unwrap();
                TcpListener::from_std(l).unwrap()
            }
            None => TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(parafed::ingress::server::serve(
            app.clone(),
            listener,
            None,
            async {
                let _ = rx.await;
            },
        ));
        TestServer {
            addr,
            app,
            redis,
            db_url,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and waits for in-flight requests.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// A pooled database connection.
    pub async fn db(&self) -> parafed::store::PgConn {
        self.app.pool.get().await.unwrap()
    }

    /// The delivery state of `destination` here, if it has one.
    pub async fn health(&self, destination: &str) -> Option<parafed::store::destinations::Health> {
        parafed::store::destinations::get(&mut *self.db().await, destination)
            .await
            .unwrap()
    }

    /// Rows in federation_events.
    pub async fn event_count(&self) -> i64 {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        use parafed::store::schema::federation_events as fe;
        fe::table
            .count()
            .get_result(&mut *self.db().await)
            .await
            .unwrap()
    }

    /// The event ids carried by the jobs in a queue's stream, in stream order (a verify
    /// or fanout job carries a batch of them).
    pub async fn queued_events(&self, q: parafed::queue::QueueName) -> Vec<String> {
        let mut c = self.app.queue.connection();
        type Entry = (String, Vec<(String, Vec<u8>)>);
        let entries: Vec<Entry> = redis::cmd("XRANGE")
            .arg(self.app.queue.keys().queue(q))
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .unwrap();
        entries
            .into_iter()
            .flat_map(|(_, fields)| fields)
            .filter(|(f, _)| f == parafed::queue::JOB_FIELD)
            .flat_map(|(_, payload)| {
                serde_json::from_slice::<parafed::queue::VerifyJob>(&payload)
                    .unwrap()
                    .event_ids
            })
            .collect()
    }
}

/// A worker fleet process, in-process, for one test server.
pub struct TestWorker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestWorker {
    /// Starts workers for every queue of `server`.
    pub fn start(server: &TestServer) -> TestWorker {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = server.app.clone();
        let task = tokio::spawn(async move {
            parafed_jobs::fleet::run(app, &parafed::queue::QueueName::ALL, async {
                let _ = rx.await;
            })
            .await
            .expect("worker fleet");
        });
        TestWorker {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// True while the fleet is running (it has not stopped or died).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// SIGTERM-like stop: in-flight jobs finish.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Settings that make delivery retries fast enough for tests.
pub const FAST_WORKER_TOML: &str = "\n[worker]\nscheduler_interval_ms = 10\nreconcile_interval_ms = 200\nstale_after_ms = 2000\njob_timeout_ms = 5000\nconcurrency = 8\n[delivery]\nbackoff_base_ms = 200\nbackoff_cap_ms = 5000\nrequest_timeout_ms = 5000\nconnect_timeout_ms = 1000\n";

/// Reserves a listener on a free loopback port.
pub fn reserve_listener() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The `/keys` document `p` publishes (its one key, valid for a day).
pub fn keys_document(p: &Peer) -> serde_json::Value {
    serde_json::json!({
        "keys": [{
            "key_id": p.key.key_id(),
            "public_key": p.key.public_key_hex(),
            "server_name": p.name,
            "valid_until": parafed::time::now_ms() + 86_400_000,
        }],
        "server_name": p.name,
    })
}

/// A peer's identity for tests.
#[derive(Clone)]
pub struct Peer {
    pub name: ServerName,
    pub key: Keypair,
}

impl Peer {
    pub fn new(name: &str, key_id: &str, seed: [u8; 32]) -> Peer {
        Peer {
            name: ServerName::parse(name).unwrap(),
            key: Keypair::from_seed(KeyId::parse(key_id).unwrap(), seed),
        }
    }

    pub fn from_seed_hex(name: &str, key_id: &str, seed_hex: &str) -> Peer {
        Peer {
            name: ServerName::parse(name).unwrap(),
            key: Keypair::from_seed_hex(KeyId::parse(key_id).unwrap(), seed_hex).unwrap(),
        }
    }

    /// Transport headers for a request signed now.
    pub fn sign(&self, method: &str, path: &str, body: &[u8]) -> Vec<(String, String)> {
        self.sign_at(method, path, body, parafed::time::now_ms())
    }

    pub fn sign_at(&self, method: &str, path: &str, body: &[u8], ts: i64) -> Vec<(String, String)> {
        TransportHeaders::sign(&self.key, &self.name, method, path, ts, body)
            .to_header_pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }
}

/// A request as a fake peer sees it.
pub struct FakeRequest {
    pub path: String,
    pub body: Bytes,
}

/// A fake peer's answer: status, extra headers, body.
pub struct FakeAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl FakeAnswer {
    /// `status` with an empty body.
    pub fn empty(status: u16) -> FakeAnswer {
        FakeAnswer {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    /// `status` with a JSON body.
    pub fn json(status: u16, body: serde_json::Value) -> FakeAnswer {
        FakeAnswer {
            status,
            headers: Vec::new(),
            body: body.to_string(),
        }
    }
}

/// Serves HTTP/1.1 on `listener`, answering each request with `handle`'s status and
/// body, until the returned task is aborted. The one accept loop every fake peer uses.
fn serve_fake<F, Fut>(listener: TcpListener, handle: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(FakeRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = (u16, String)> + Send + 'static,
{
    serve_fake_full(listener, move |r| {
        let f = handle(r);
        async move {
            let (status, body) = f.await;
            FakeAnswer {
                status,
                headers: Vec::new(),
                body,
            }
        }
    })
}

/// [`serve_fake`] with headers in the answer.
fn serve_fake_full<F, Fut>(listener: TcpListener, handle: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(FakeRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = FakeAnswer> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let handle = handle.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let path = req.uri().path().to_owned();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let a = handle(FakeRequest { path, body }).await;
                        let mut resp = http::Response::new(Full::new(Bytes::from(a.body)));
                        *resp.status_mut() = http::StatusCode::from_u16(a.status).unwrap();
                        for (k, v) in a.headers {
                            resp.headers_mut().insert(
                                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                                http::HeaderValue::from_str(&v).unwrap(),
                            );
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// A peer whose every answer comes from a function of the request (and may take its
/// time); for tests that need headers, delays or a record of arrival order.
pub struct FnPeer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FnPeer {
    pub async fn start<F, Fut>(listener: std::net::TcpListener, handle: F) -> FnPeer
    where
        F: Fn(FakeRequest) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = FakeAnswer> + Send + 'static,
    {
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        FnPeer {
            addr,
            task: serve_fake_full(listener, handle),
        }
    }
}

impl Drop for FnPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `event_id` of a JSON body, or "".
pub fn event_id_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["event_id"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A `parafed-worker` process for a test server (same database, Redis and peers), for
/// tests that must kill a worker the hard way.
pub struct WorkerProcess {
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl WorkerProcess {
    pub fn start(server: &TestServer) -> WorkerProcess {
        Self::start_with(server, |_| {})
    }

    /// As [`WorkerProcess::start`], with the server's configuration changed by `edit`.
    pub fn start_with(server: &TestServer, edit: impl FnOnce(&mut Config)) -> WorkerProcess {
        let mut cfg = server.app.cfg.clone();
        edit(&mut cfg);
        cfg.local.token = None;
        cfg.admin.token = None;
        cfg.worker.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        let bin =
            std::path::Path::new(env!("CARGO_BIN_EXE_parafed")).with_file_name("parafed-worker");
        assert!(
            bin.exists(),
            "{} missing: run `cargo build --workspace --bins` first",
            bin.display()
        );
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--config")
            .arg(&path)
            .env("PARAFED_LOG", "warn")
            .stdin(std::process::Stdio::null());
        let child = parafed::devservers::spawn::spawn_tied(cmd).unwrap();
        WorkerProcess {
            child: Some(child),
            _dir: dir,
        }
    }

    /// SIGKILL: no clean-up of any kind.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The first path segment: which of several fake peers on one server is meant.
fn prefix_of(path: &str) -> String {
    path.trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned()
}

/// What a fake peer serves at `/<prefix>/_paracord/federation/v1/keys`.
#[derive(Clone)]
pub enum KeysAnswer {
    Keys(Vec<Peer>),
    NotFound,
}

/// One HTTP server standing in for several peers, each under a path prefix, as the
/// interop capture's fake peer did. Counts `/keys` fetches per prefix.
pub struct FakePeers {
    pub addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakePeers {
    pub async fn start(peers: Vec<(String, KeysAnswer)>) -> FakePeers {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>> = Arc::new(Mutex::new(
            peers
                .iter()
                .map(|(p, _)| (p.clone(), Arc::new(AtomicU64::new(0))))
                .collect(),
        ));
        let table: Arc<HashMap<String, KeysAnswer>> = Arc::new(peers.into_iter().collect());
        let h = hits.clone();
        let task = serve_fake(listener, move |r: FakeRequest| {
            let (table, hits) = (table.clone(), h.clone());
            async move {
                if !r.path.ends_with("/_paracord/federation/v1/keys") {
                    return (404, String::new());
                }
                let prefix = prefix_of(&r.path);
                if let Some(c) = hits.lock().unwrap().get(&prefix) {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                let Some(KeysAnswer::Keys(ps)) = table.get(&prefix) else {
                    return (404, String::new());
                };
                let name = ps[0].name.to_string();
                let doc = serde_json::json!({
                    "keys": ps.iter().map(|p| serde_json::json!({
                        "key_id": p.key.key_id(),
                        "public_key": p.key.public_key_hex(),
                        "server_name": name,
                        "valid_until": parafed::time::now_ms() + 86_400_000,
                    })).collect::<Vec<_>>(),
                    "server_name": name,
                });
                (200, doc.to_string())
            }
        });
        FakePeers { addr, hits, task }
    }

    pub fn base_url(&self, prefix: &str) -> String {
        format!("http://{}/{prefix}", self.addr)
    }

    pub fn key_fetches(&self, prefix: &str) -> u64 {
        self.hits
            .lock()
            .unwrap()
            .get(prefix)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

impl Drop for FakePeers {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A raw HTTP response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends raw request bytes and reads the answer (the request should say
/// `Connection: close`). Used for requests no well-behaved client would build.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<RawResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(60), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("response timed out"))??;
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> std::io::Result<RawResponse> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "no response head in {:?}",
                String::from_utf8_lossy(buf)
            ))
        })?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..(i + 2 + n).min(b.len())]);
        b = &b[(i + 4 + n).min(b.len())..];
    }
    out
}

/// Builds request bytes: method, path, headers, body (Content-Length added).
pub fn request_bytes(
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends a well-formed request.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> RawResponse {
    raw(addr, &request_bytes(method, path, headers, body))
        .await
        .expect("request")
}

/// Headers for a JSON POST signed by `peer`.
pub fn json_signed(peer: &Peer, path: &str, body: &[u8]) -> Vec<(String, String)> {
    let mut h = peer.sign("POST", path, body);
    h.push(("Content-Type".into(), "application/json".into()));
    h
}

/// A peer that answers `POST …/event` from a script: the n-th request gets `script[n]`,
/// later ones `then`. Counts the requests it saw.
pub struct ScriptedPeer {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedPeer {
    pub async fn start(
        listener: std::net::TcpListener,
        script: Vec<u16>,
        then: u16,
    ) -> ScriptedPeer {
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let script = Arc::new(script);
        let h = hits.clone();
        let task = serve_fake(listener, move |r: FakeRequest| {
            let (hits, script) = (h.clone(), script.clone());
            async move {
                if !r.path.ends_with("/event") {
                    return (404, String::new());
                }
                let n = hits.fetch_add(1, Ordering::SeqCst) as usize;
                let status = script.get(n).copied().unwrap_or(then);
                let body = serde_json::json!({"event_id": event_id_of(&r.body), "inserted": true, "code": "SCRIPTED"});
                (status, body.to_string())
            }
        });
        ScriptedPeer { addr, hits, task }
    }
}

impl ScriptedPeer {
    /// Event requests seen so far.
    pub fn hits(&self) -> u64 {
        AtomicU64::load(&self.hits, Ordering::SeqCst)
    }
}

impl Drop for ScriptedPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A peer that accepts every event (202) and remembers each event id, counting any it
/// receives twice. Serves under any path prefix.
pub struct CountingPeer {
    pub seen: Arc<Mutex<std::collections::HashSet<String>>>,
    pub duplicates: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingPeer {
    pub async fn start(listener: std::net::TcpListener) -> CountingPeer {
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let seen: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
        let duplicates = Arc::new(AtomicU64::new(0));
        let (s, d) = (seen.clone(), duplicates.clone());
        let task = serve_fake(listener, move |r: FakeRequest| {
            let (seen, dups) = (s.clone(), d.clone());
            async move {
                let id = event_id_of(&r.body);
                if !seen.lock().unwrap().insert(id.clone()) {
                    dups.fetch_add(1, Ordering::SeqCst);
                }
                (
                    202,
                    serde_json::json!({"event_id": id, "inserted": true}).to_string(),
                )
            }
        });
        CountingPeer {
            seen,
            duplicates,
            task,
        }
    }

    pub fn received(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for CountingPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Peers that never answer: each request is held until the client gives up. Tracks, per
/// path prefix (one per peer), the requests in flight now and the most ever in flight.
pub struct Blackhole {
    pub addr: SocketAddr,
    pub max_in_flight: Arc<Mutex<HashMap<String, (u64, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

struct InFlight {
    key: String,
    table: Arc<Mutex<HashMap<String, (u64, u64)>>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(e) = self.table.lock().unwrap().get_mut(&self.key) {
            e.0 -= 1;
        }
    }
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
        let t = table.clone();
        let task = serve_fake(listener, move |r: FakeRequest| {
            let table = t.clone();
            async move {
                let key = prefix_of(&r.path);
                {
                    let mut t = table.lock().unwrap();
                    let e = t.entry(key.clone()).or_insert((0, 0));
                    e.0 += 1;
                    e.1 = e.1.max(e.0);
                }
                let _guard = InFlight { key, table };
                std::future::pending::<()>().await;
                (200, String::new())
            }
        });
        Blackhole {
            addr,
            max_in_flight: table,
            task,
        }
    }

    pub fn base_url(&self, prefix: &str) -> String {
        format!("http://{}/{prefix}", self.addr)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `parafed serve` process for a test server (same database, Redis and peers, its own
/// listener), for tests that drive the admin API of a running ingress.
pub struct ServeProcess {
    pub addr: SocketAddr,
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    /// Starts it and waits until it answers.
    pub async fn start(server: &TestServer, admin_token: &str) -> ServeProcess {
        let (listener, _) = reserve_listener();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut cfg = server.app.cfg.clone();
        cfg.local.token = None;
        cfg.admin.token = None;
        cfg.admin.token_name = "ops-test".into();
        cfg.http.listen = addr;
        cfg.http.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_parafed"));
        cmd.arg("--config")
            .arg(&path)
            .arg("serve")
            .env("PARAFED_LOG", "warn")
            .env("PARAFED_ADMIN_TOKEN", admin_token)
            .stdin(std::process::Stdio::null());
        let child = parafed::devservers::spawn::spawn_tied(cmd).unwrap();
        let p = ServeProcess {
            addr,
            child: Some(child),
            _dir: dir,
        };
        super::wait_for(
            "parafed serve answers",
            std::time::Duration::from_secs(30),
            || async { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) },
        )
        .await;
        p
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
