//! Reading a request safely: header sanity, content type, a bounded body read under a
//! deadline, and query strings. Nothing here trusts the peer.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::error::ApiError;
use crate::protocol::limits::MAX_BODY_BYTES;

/// The longest a client may take to send its body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers that must appear at most once: a duplicate is refused (400), never resolved
/// by "first wins", so two parsers can never disagree about which one counted.
const SINGLE_HEADERS: &[&str] = &[
    "x-paracord-origin",
    "x-paracord-key-id",
    "x-paracord-timestamp",
    "x-paracord-signature",
    "content-length",
    "content-type",
    "authorization",
];

pub fn check_headers(h: &HeaderMap) -> Result<(), ApiError> {
    for name in SINGLE_HEADERS {
        if h.get_all(*name).iter().count() > 1 {
            return Err(ApiError::bad_request(format!(
                "header {name} was sent more than once"
            )));
        }
    }
    if h.contains_key(http::header::CONTENT_LENGTH)
        && h.contains_key(http::header::TRANSFER_ENCODING)
    {
        return Err(ApiError::bad_request(
            "Content-Length and Transfer-Encoding must not be sent together",
        ));
    }
    Ok(())
}

/// The single value of a header as text (`None` when absent or not visible ASCII).
pub fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Requires `Content-Type: application/json` (parameters such as charset allowed).
pub fn require_json(h: &HeaderMap) -> Result<(), ApiError> {
    let ok = header(h, "content-type")
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(
            "send the body with Content-Type: application/json",
        ))
    }
}

fn too_large() -> ApiError {
    ApiError::payload_too_large(format!(
        "request body is larger than {MAX_BODY_BYTES} bytes"
    ))
}

/// Reads the whole body, at most `MAX_BODY_BYTES`, within `BODY_READ_TIMEOUT`.
///
/// Bodies must come with `Content-Length` and without `Transfer-Encoding`: every
/// Paracord sender sends a fixed length, and hyper resolves a request carrying both
/// headers by dropping `Content-Length` before we see it, so refusing
/// `Transfer-Encoding` outright is how "both together" is refused rather than resolved.
pub async fn read_body(h: &HeaderMap, body: Incoming) -> Result<Bytes, ApiError> {
    if h.contains_key(http::header::TRANSFER_ENCODING) {
        return Err(ApiError::bad_request(
            "Transfer-Encoding is not accepted; send the body with Content-Length",
        ));
    }
    if !h.contains_key(http::header::CONTENT_LENGTH) {
        return Err(ApiError::length_required(
            "send the body with Content-Length",
        ));
    }
    if let Some(len) = header(h, "content-length") {
        match len.trim().parse::<u64>() {
            Ok(n) if n > MAX_BODY_BYTES as u64 => return Err(too_large()),
            Ok(_) => {}
            Err(_) => return Err(ApiError::bad_request("Content-Length is not a number")),
        }
    }
    let collect = Limited::new(body, MAX_BODY_BYTES).collect();
    match tokio::time::timeout(BODY_READ_TIMEOUT, collect).await {
        Err(_) => Err(ApiError::request_timeout(
            "the request body was not received in time",
        )),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(too_large())
            } else {
                Err(ApiError::bad_request(format!(
                    "could not read the request body: {e}"
                )))
            }
        }
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Parses `a=b&c=d` (percent-decoded, `+` as space). Duplicated parameters are refused.
pub fn parse_query(q: &str) -> Result<Vec<(String, String)>, ApiError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ApiError::bad_request("query string is not valid UTF-8"))
        };
        let (k, v) = (dec(k)?, dec(v)?);
        if out.iter().any(|(x, _)| *x == k) {
            return Err(ApiError::bad_request(format!(
                "query parameter {k} given twice"
            )));
        }
        out.push((k, v));
    }
    Ok(out)
}

pub fn query_param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A bearer token from `Authorization: Bearer <token>`.
pub fn bearer(h: &HeaderMap) -> Option<&str> {
    header(h, "authorization")?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Compares secrets in constant time.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
