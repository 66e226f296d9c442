//! What the attempt log records about one request to a peer — one classification for
//! the deliver job and for the local API's outbound invite / join / leave.
//!
//! A request is recorded twice: when it starts (a row with no result, so a request cut
//! short by a crash still leaves a trace) and when it ends ([`AttemptResult`]). A row
//! still open when another worker takes over the destination is closed as
//! [`INTERRUPTED`].

use http::StatusCode;

use crate::remote::send::SendError;
use crate::remote::Response;

/// Longest response excerpt kept per attempt, in bytes (cut on a character boundary).
pub const EXCERPT_BYTES: usize = 512;

/// `error_class` of an attempt whose sender stopped (killed, or its lease lapsed) before
/// the answer was recorded: the peer may or may not have received it.
pub use crate::store::attempts::INTERRUPTED;

/// The end of one attempt, as the log keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptResult {
    /// The HTTP status, when there was an answer.
    pub status_code: Option<i32>,
    /// A bounded label: `http_3xx`, `http_4xx`, `http_5xx`, or the send error's class
    /// (`connect`, `timeout`, `protocol`, `too_large`, `url`, `address`, `discovery`); `None` for 2xx.
    pub error_class: Option<&'static str>,
    /// Milliseconds from send to the whole answer read.
    pub latency_ms: i32,
    /// The first [`EXCERPT_BYTES`] of the answer body, or the send error's text.
    pub response_excerpt: Option<String>,
}

/// The attempt-log label for an HTTP status: `None` for 2xx.
pub fn status_class(s: StatusCode) -> Option<&'static str> {
    match s.as_u16() {
        200..=299 => None,
        100..=199 => Some("http_1xx"),
        300..=399 => Some("http_3xx"),
        400..=499 => Some("http_4xx"),
        _ => Some("http_5xx"),
    }
}

/// Classifies one request's result for the attempt log.
pub fn result_of(
    result: Result<&Response, &SendError>,
    latency: std::time::Duration,
) -> AttemptResult {
    let latency_ms = latency.as_millis().min(i32::MAX as u128) as i32;
    match result {
        Ok(r) => AttemptResult {
            status_code: Some(i32::from(r.status.as_u16())),
            error_class: status_class(r.status),
            latency_ms,
            response_excerpt: Some(excerpt(&r.body)),
        },
        Err(e) => AttemptResult {
            status_code: None,
            error_class: Some(e.class()),
            latency_ms,
            response_excerpt: Some(excerpt(e.to_string().as_bytes())),
        },
    }
}

/// The first [`EXCERPT_BYTES`] of a body as text (lossy UTF-8, never split inside a
/// character).
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES + 4)]);
    let mut end = text.len().min(EXCERPT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::http::HttpError;
    use std::time::Duration;

    #[test]
    fn classes_of_statuses() {
        let table = [
            (200, None),
            (202, None),
            (301, Some("http_3xx")),
            (307, Some("http_3xx")),
            (308, Some("http_3xx")),
            (400, Some("http_4xx")),
            (403, Some("http_4xx")),
            (409, Some("http_4xx")),
            (429, Some("http_4xx")),
            (500, Some("http_5xx")),
            (503, Some("http_5xx")),
        ];
        for (s, want) in table {
            assert_eq!(status_class(StatusCode::from_u16(s).unwrap()), want, "{s}");
        }
    }

    #[test]
    fn results_and_excerpts() {
        let r = Response {
            status: StatusCode::TEMPORARY_REDIRECT,
            headers: Default::default(),
            body: bytes::Bytes::from(vec![b'a'; 2000]),
            latency: Duration::ZERO,
        };
        let a = result_of(Ok(&r), Duration::from_millis(12));
        assert_eq!(a.status_code, Some(307));
        assert_eq!(a.error_class, Some("http_3xx"));
        assert_eq!(a.latency_ms, 12);
        assert_eq!(
            a.response_excerpt.as_deref().map(str::len),
            Some(EXCERPT_BYTES)
        );
        let e = SendError::Http(HttpError::Connect("refused".into()));
        let a = result_of(Err(&e), Duration::from_millis(3));
        assert_eq!((a.status_code, a.error_class), (None, Some("connect")));
        // Never split a character.
        let s = "é".repeat(400);
        assert!(excerpt(s.as_bytes()).len() <= EXCERPT_BYTES);
        assert!(excerpt(s.as_bytes()).chars().all(|c| c == 'é'));
    }
}
