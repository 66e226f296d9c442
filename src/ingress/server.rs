//! Accepting connections: HTTP/1.1 with header and body deadlines, optional TLS
//! (rustls), and a graceful shutdown that lets in-flight requests finish.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::app::App;

/// A client that has not sent its headers by then is disconnected (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0} holds no private key")]
    NoKey(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Loads a PEM certificate chain and key into an acceptor.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| TlsError::Read(p.display().to_string(), e));
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read(cert.display().to_string(), e))?;
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| TlsError::Read(key.display().to_string(), e))?
        .ok_or_else(|| TlsError::NoKey(key.display().to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves one connection (plain or TLS) until it ends or shutdown drains it; `permit`
/// is its slot among `http.max_connections`, given back when it ends.
async fn serve_connection<I>(
    app: Arc<super::Ingress>,
    io: I,
    watcher: hyper_util::server::graceful::Watcher,
    permit: OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| super::handle(app.clone(), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    drop(permit);
}

/// Serves until `shutdown` resolves, then stops accepting and drains.
///
/// At most `http.max_connections` connections are open at once; past that, new ones wait
/// in the kernel's accept backlog until one closes (an idle keep-alive connection is
/// closed after `HEADER_READ_TIMEOUT`).
/// Aborts a background task when the server stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(app.cfg.http.max_connections.max(1) as usize));
    // Trust changes made anywhere in the fleet reach this process within a tick.
    let trust_watch = tokio::spawn(crate::trust::Trust::watch(app.clone()));
    let _stop_watch = AbortOnDrop(trust_watch);
    let app = Arc::new(super::Ingress::new(app));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed
            },
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (app, watcher) = (app.clone(), graceful.watcher());
                match &tls {
                    None => {
                        tokio::spawn(serve_connection(app, stream, watcher, permit));
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls_stream)) => serve_connection(app, tls_stream, watcher, permit).await,
                                _ => tracing::debug!("TLS handshake failed or timed out"),
                            }
                        });
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still busy after the drain timeout");
    }
}
