//! One pooled HTTP client for every request parafed makes to peers.
//!
//! Keep-alive connections are pooled per destination by hyper's client; HTTPS uses
//! rustls with the webpki roots. Every request has a connect timeout and an overall
//! timeout, and response bodies are read up to a caller-given bound, so a slow or
//! malicious peer costs bounded time and memory.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Why a request produced no usable response. `class()` gives a bounded label for
/// metrics and the attempt log.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid request URL {0}")]
    Url(String),
    #[error("connecting failed: {0}")]
    Connect(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("response body larger than {0} bytes")]
    TooLarge(usize),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl HttpError {
    pub fn class(&self) -> &'static str {
        match self {
            HttpError::Url(_) => "url",
            HttpError::Connect(_) => "connect",
            HttpError::Timeout(_) => "timeout",
            HttpError::TooLarge(_) => "too_large",
            HttpError::Protocol(_) => "protocol",
        }
    }
}

/// A response, its body read in full (bounded).
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub latency: Duration,
}

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(connect_timeout: Duration, timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            // At least the delivery window (`[delivery] window`, at most this): a drain
            // keeps that many requests in flight to one peer, and every connection it
            // cannot park would be closed and opened again for the next batch.
            .pool_max_idle_per_host(crate::config::MAX_WINDOW as usize)
            .build(https);
        Self { inner, timeout }
    }

    /// Sends a request and reads at most `max_body` bytes of the answer.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
        max_body: usize,
    ) -> Result<Response, HttpError> {
        let uri: http::Uri = url.parse().map_err(|_| HttpError::Url(url.to_owned()))?;
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req = req.header("user-agent", concat!("parafed/", env!("CARGO_PKG_VERSION")));
        let req = req
            .body(Full::new(body))
            .map_err(|e| HttpError::Url(e.to_string()))?;
        let started = Instant::now();
        let fut = async {
            let resp = self.inner.request(req).await.map_err(|e| {
                if e.is_connect() {
                    HttpError::Connect(format!("{e:?}"))
                } else {
                    HttpError::Protocol(format!("{e:?}"))
                }
            })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        HttpError::TooLarge(max_body)
                    } else {
                        HttpError::Protocol(e.to_string())
                    }
                })?
                .to_bytes();
            Ok::<_, HttpError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| HttpError::Timeout(self.timeout))??;
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
            latency: started.elapsed(),
        })
    }
}
