//! The listener itself: metrics, TLS, graceful shutdown.

use crate::support;

use std::sync::Arc;

use support::app::{send, Options, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn metrics_count_requests_without_peer_names() {
    let handle = parafed::telemetry::metrics::recorder();
    let listener = parafed::telemetry::metrics::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let maddr = listener.local_addr().unwrap();
    tokio::spawn(parafed::telemetry::metrics::serve(listener, handle));
    let s = TestServer::start(Options::default()).await;
    // An unauthenticated event from a made-up peer: refused, and counted.
    let h = vec![
        (
            "X-Paracord-Origin".to_owned(),
            "evil-peer-name.test".to_owned(),
        ),
        ("Content-Type".to_owned(), "application/json".to_owned()),
    ];
    let r = send(s.addr, "POST", "/_paracord/federation/v1/event", &h, b"{}").await;
    assert_eq!(r.status, 401);
    let m = send(maddr, "GET", "/metrics", &[], b"").await;
    let text = String::from_utf8(m.body).unwrap();
    assert!(
        text.contains(r#"parafed_http_requests_total{route="fed_post_event",status="4xx"}"#),
        "{text}"
    );
    assert!(
        text.contains("parafed_http_request_duration_seconds_bucket"),
        "histograms, not summaries"
    );
    assert!(!text.contains("evil-peer-name"), "no peer names in labels");
}

#[tokio::test]
async fn serves_https_with_rustls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cp, kp) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cp, cert.cert.pem()).unwrap();
    std::fs::write(&kp, cert.signing_key.serialize_pem()).unwrap();
    let acceptor = parafed::ingress::server::tls_acceptor(&cp, &kp).unwrap();

    let base = TestServer::start(Options::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(parafed::ingress::server::serve(
        base.app.clone(),
        listener,
        Some(acceptor),
        std::future::pending(),
    ));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /.well-known/paracord/server HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"server_name\":\"paracord.test\""));
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_stops_accepting() {
    let mut s = TestServer::start(Options::default()).await;
    // A request whose body is still being sent when shutdown begins.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"PUT /_parafed/local/v1/rooms/!9:paracord.test HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer local-secret\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n{\"guild_name\":")
        .await
        .unwrap();
    let addr = s.addr;
    let stopping = tokio::spawn(async move {
        s.stop().await;
        s
    });
    // Shutdown has begun once the listener is closed; the request is still incomplete.
    support::wait_for(
        "the listener to close",
        std::time::Duration::from_secs(10),
        || async move {
            tokio::net::TcpStream::connect(addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    c.write_all(b" \"late\"}").await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "in-flight request answered: {text}"
    );
    let s = stopping.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    let hosted = parafed::store::rooms::hosted(&mut *s.db().await, "!9:paracord.test")
        .await
        .unwrap();
    assert_eq!(hosted.unwrap().guild_name, "late");
}

/// Past `http.max_connections`, a new connection waits (in the accept backlog) until one
/// of the open ones closes, and is then served.
#[tokio::test]
async fn connections_past_the_limit_wait_for_a_free_slot() {
    let s = TestServer::start(Options {
        extra_toml: "\n[http]\nmax_connections = 2\n".into(),
        ..Options::default()
    })
    .await;
    // Two idle connections take both slots.
    let first = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    third
        .write_all(
            b"GET /.well-known/paracord/server HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        third.read_to_end(&mut out),
    )
    .await;
    assert!(
        early.is_err(),
        "served past the limit: {:?}",
        String::from_utf8_lossy(&out)
    );
    drop(first);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        third.read_to_end(&mut out),
    )
    .await
    .expect("served once a slot is free")
    .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}
