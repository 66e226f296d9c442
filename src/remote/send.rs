//! Sending a signed request to a peer: resolve where it is, sign method, path, a fresh
//! timestamp and the exact body bytes, send through the pooled client.

use bytes::Bytes;
use http::Method;

use super::directory::{DirectoryError, PeerDirectory};
use super::http::{HttpClient, HttpError, Response};
use crate::protocol::{Keypair, ServerName, TransportHeaders};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Http(#[from] HttpError),
}

impl SendError {
    /// A bounded label for metrics and the attempt log.
    pub fn class(&self) -> &'static str {
        match self {
            SendError::Directory(_) => "discovery",
            SendError::Http(e) => e.class(),
        }
    }
}

/// Largest response body read from a peer.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Signs and sends `body` to `destination`'s federation endpoint `suffix` (e.g. `/event`).
#[allow(clippy::too_many_arguments)]
pub async fn send_signed(
    client: &HttpClient,
    directory: &PeerDirectory,
    key: &Keypair,
    origin: &ServerName,
    destination: &ServerName,
    method: Method,
    suffix: &str,
    body: Bytes,
) -> Result<Response, SendError> {
    let endpoint = directory.resolve_trusted(destination).await?;
    let path = endpoint.signed_path(suffix);
    let t = TransportHeaders::sign(
        key,
        origin,
        method.as_str(),
        &path,
        crate::time::now_ms(),
        &body,
    );
    let mut headers: Vec<(&str, String)> = t.to_header_pairs().into_iter().collect();
    if method == Method::POST {
        headers.push(("content-type", "application/json".into()));
    }
    Ok(client
        .send(
            method,
            &endpoint.url(suffix),
            &headers,
            body,
            MAX_RESPONSE_BYTES,
        )
        .await?)
}
