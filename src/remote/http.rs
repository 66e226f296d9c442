//! One pooled HTTP client for every request parafed makes to peers.
//!
//! Keep-alive connections are pooled per destination by hyper's client; HTTPS uses
//! rustls with the webpki roots. Every request has a connect timeout and an overall
//! timeout, and response bodies are read up to a caller-given bound, so a slow or
//! malicious peer costs bounded time and memory.
//!
//! The federation client ([`HttpClient::for_federation`]) reaches only public
//! addresses, except at the origins the operator named (`[peers]` base URLs) or with
//! `federation.allow_private_addresses` (`remote::address` says why).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::address::{is_public, NotPublic, PublicResolver};

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
    /// The host is, or resolves only to, addresses that are not public, and it is not
    /// one the operator named (`remote::address`).
    #[error("{0}")]
    NotPublic(String),
}

impl HttpError {
    pub fn class(&self) -> &'static str {
        match self {
            HttpError::Url(_) => "url",
            HttpError::Connect(_) => "connect",
            HttpError::Timeout(_) => "timeout",
            HttpError::TooLarge(_) => "too_large",
            HttpError::Protocol(_) => "protocol",
            HttpError::NotPublic(_) => "address",
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

type AnyClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;
type PublicClient = Client<HttpsConnector<HttpConnector<PublicResolver>>, Full<Bytes>>;

#[derive(Clone)]
pub struct HttpClient {
    /// Any address: the operator's own hosts.
    inner: AnyClient,
    /// Public addresses only, for every other host; `None`: any address for all.
    public: Option<(PublicClient, Arc<HashSet<String>>)>,
    timeout: Duration,
}

/// hyper's client over `http` (HTTP/1, HTTPS with the webpki roots, or plain HTTP).
fn client<R>(
    mut http: HttpConnector<R>,
    connect_timeout: Duration,
) -> Client<HttpsConnector<HttpConnector<R>>, Full<Bytes>>
where
    HttpsConnector<HttpConnector<R>>:
        hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        // At least the delivery window (`[delivery] window`, at most this): a drain
        // keeps that many requests in flight to one peer, and every connection it
        // cannot park would be closed and opened again for the next batch.
        .pool_max_idle_per_host(crate::config::MAX_WINDOW as usize)
        .build(https)
}

impl HttpClient {
    /// A client for any address: the operator's own tools (the admin CLI, the demo)
    /// talking to servers they were pointed at.
    pub fn new(connect_timeout: Duration, timeout: Duration) -> Self {
        Self {
            inner: client(HttpConnector::new(), connect_timeout),
            public: None,
            timeout,
        }
    }

    /// The client for peers: URLs with the origin (RFC 6454: scheme, host, port) of one
    /// of the `own` base URLs (the `[peers]` ones, e.g. `http://127.0.0.1:8449`) are
    /// reached wherever they are; any other only on public addresses
    /// (`remote::address`), unless `allow_private` (`federation.allow_private_addresses`).
    /// A request refused for that fails with [`HttpError::NotPublic`] before anything is
    /// sent. A base URL that does not parse exempts nothing.
    pub fn for_federation(
        connect_timeout: Duration,
        timeout: Duration,
        own: impl IntoIterator<Item = String>,
        allow_private: bool,
    ) -> Self {
        let mut c = Self::new(connect_timeout, timeout);
        if !allow_private {
            let public = client(
                HttpConnector::new_with_resolver(PublicResolver::new()),
                connect_timeout,
            );
            let own = own
                .into_iter()
                .filter_map(|u| u.parse::<http::Uri>().ok())
                .filter_map(|u| origin(&u))
                .collect();
            c.public = Some((public, Arc::new(own)));
        }
        c
    }

    /// The public-only client when `uri` must reach a public address (not the origin of
    /// a `[peers]` base URL, private addresses not allowed), `None` when any address
    /// will do. An IP literal never reaches the resolver, so one that is not public is
    /// refused here, with [`HttpError::NotPublic`].
    fn restricted(&self, uri: &http::Uri) -> Result<Option<&PublicClient>, HttpError> {
        let Some((client, own)) = &self.public else {
            return Ok(None);
        };
        if origin(uri).is_some_and(|o| own.contains(&o)) {
            return Ok(None);
        }
        let host = uri.host().unwrap_or_default();
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        match literal.parse::<std::net::IpAddr>() {
            Ok(ip) if !is_public(ip) => {
                Err(HttpError::NotPublic(NotPublic::literal(host).to_string()))
            }
            _ => Ok(Some(client)),
        }
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
        let public = self.restricted(&uri)?;
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req = req.header("user-agent", concat!("parafed/", env!("CARGO_PKG_VERSION")));
        let started = Instant::now();
        let req = req
            .body(Full::new(body))
            .map_err(|e| HttpError::Url(e.to_string()))?;
        let fut = async {
            let sent = match public {
                Some(client) => client.request(req).await,
                None => self.inner.request(req).await,
            };
            let resp = sent.map_err(|e| {
                if let Some(refused) = not_public(&e) {
                    HttpError::NotPublic(refused)
                } else if e.is_connect() {
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

/// A URL's origin (RFC 6454 §4): `scheme://host:port`, the scheme and host in lower
/// case, a host's trailing dot dropped, the port made explicit (80 for `http`, 443 for
/// `https`); `None` without a host or with another scheme. Two URLs reach the same
/// service exactly when their origins are equal; userinfo is not part of it.
fn origin(uri: &http::Uri) -> Option<String> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let host = uri.host()?.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    Some(format!(
        "{scheme}://{host}:{}",
        uri.port_u16().unwrap_or(default)
    ))
}

/// The refusal inside a connect error, if the resolver refused the host
/// ([`PublicResolver`]): its text.
fn not_public(e: &hyper_util::client::legacy::Error) -> Option<String> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(n) = s.downcast_ref::<NotPublic>() {
            return Some(n.to_string());
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-request HTTP server on 127.0.0.1 answering 204; returns its authority.
    fn answer_once() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_federation_client_reaches_the_operators_hosts_and_only_public_others() {
        let own = answer_once();
        let other = answer_once();
        let c = HttpClient::for_federation(
            Duration::from_secs(2),
            Duration::from_secs(5),
            [format!("http://{own}")],
            false,
        );
        let get = |url: String| {
            let c = c.clone();
            async move { c.send(Method::GET, &url, &[], Bytes::new(), 1024).await }
        };
        let r = get(format!("http://{own}/keys")).await.unwrap();
        assert_eq!(
            r.status,
            StatusCode::NO_CONTENT,
            "a [peers] host is reached"
        );
        // The same host under another scheme, another host behind the operator's as
        // userinfo, or the operator's host in the numeric forms
        // getaddrinfo accepts (decimal, hex) is not the operator's: refused like any
        // other inward address.
        let own_port = own.rsplit_once(':').map(|(_, p)| p.to_owned()).unwrap();
        for url in [
            format!("http://{other}/keys"),
            format!("https://{own}/keys"),
            format!("http://{own}@169.254.169.254/keys"),
            format!("http://2130706433:{own_port}/keys"),
            format!("http://0x7f.1:{own_port}/keys"),
            "http://[::1]:1/keys".to_owned(),
            "http://169.254.169.254/latest/meta-data".to_owned(),
            "https://localhost/.well-known/paracord/server".to_owned(),
        ] {
            let e = get(url.clone()).await.unwrap_err();
            assert!(
                matches!(e, HttpError::NotPublic(_)),
                "{url}: {e:?} should be refused as not public"
            );
            assert_eq!(e.class(), "address");
            let text = e.to_string();
            assert!(
                text.contains("non-public address") && text.contains("[peers]"),
                "{text}"
            );
        }
        // The operator's origin however it is written: case, a trailing dot, the port.
        assert_eq!(
            origin(&"HTTP://Example.ORG./x".parse().unwrap()),
            origin(&"http://example.org:80".parse().unwrap())
        );
        assert_ne!(
            origin(&"https://example.org".parse().unwrap()),
            origin(&"http://example.org".parse().unwrap())
        );
        // With private addresses allowed, any host is reached.
        let open = HttpClient::for_federation(
            Duration::from_secs(2),
            Duration::from_secs(5),
            Vec::new(),
            true,
        );
        let r = open
            .send(
                Method::GET,
                &format!("http://{other}/keys"),
                &[],
                Bytes::new(),
                1024,
            )
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
}
