//! What an answer to `POST /event` means for the event and for its destination.
//!
//! The rules are PROTOCOL.md's "What a sender must treat as what", one arm each:
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx (`inserted:false` too: a duplicate) | [`Outcome::Delivered`] |
//! | 409, first time | [`Outcome::Resign`]: an identical request was seen; sign afresh and send once more |
//! | 409 again | [`Outcome::Transient`] |
//! | 401, 408, 429, 5xx, connect / timeout / TLS / protocol errors | [`Outcome::Transient`], `Retry-After` kept |
//! | 3xx | [`Outcome::DestinationProblem`]: never kills an event (see below) |
//! | 403, the `forbidden_run`-th in a row | [`Outcome::DestinationProblem`]: our key or registration there is wrong |
//! | other 4xx (and a 403 before the run) | [`Outcome::Permanent`] for that event |
//!
//! **Redirects are not followed.** A signed request covers its path, and parafed sends to
//! the endpoint configured or discovered for the peer; a 3xx means that endpoint is
//! wrong or moved, which is the destination's problem, not the event's. The destination
//! backs off with the answer on its state (like a run of 403s) and its rows wait, so
//! nothing is lost once the operator fixes `[peers]` or the peer's `/.well-known`.
//! Following one would send our signature to wherever a peer points.
//!
//! `Retry-After` takes both forms of RFC 9110 §10.2.3 — delay-seconds and HTTP-date —
//! and is a floor on the next attempt (clamped to the backoff cap by [`super::backoff`]);
//! a malformed value is ignored, never an error.

use std::time::{Duration, SystemTime};

use http::StatusCode;

use super::attempt::excerpt;
use super::Policy;
use crate::remote::send::SendError;
use crate::remote::Response;

/// What one request's result means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The destination has the event.
    Delivered,
    /// 409: sign again with a fresh timestamp and send once more (not a failure).
    Resign,
    /// The destination refused this event for good: the row is dead, the reason kept.
    Permanent { reason: String },
    /// Try again later: the destination backs off; the row waits.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The destination is misconfigured for us (a redirect, a run of 403s): it backs off
    /// and shows the reason on its state; the row waits.
    DestinationProblem {
        reason: String,
        retry_after: Option<Duration>,
    },
}

impl Outcome {
    /// True for the outcomes that back the destination off.
    pub fn backs_off(&self) -> bool {
        matches!(
            self,
            Outcome::Transient { .. } | Outcome::DestinationProblem { .. }
        )
    }
}

/// What came before this request, as far as the rules care.
#[derive(Clone, Copy, Debug, Default)]
pub struct Previous {
    /// This request is the re-signed resend after a 409.
    pub resent: bool,
    /// 403s in a row from this destination before this request.
    pub forbidden_in_a_row: u32,
}

/// Classifies one request's result (see the module table).
///
/// `now` is the clock an HTTP-date `Retry-After` is measured against.
pub fn classify(
    result: Result<&Response, &SendError>,
    previous: Previous,
    policy: &Policy,
    now: SystemTime,
) -> Outcome {
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Transient {
                reason: e.to_string(),
                retry_after: None,
            }
        }
    };
    let s = resp.status;
    let reason = || format!("HTTP {}: {}", s.as_u16(), excerpt(&resp.body));
    let retry_after = || {
        resp.headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now))
    };
    if s.is_success() {
        return Outcome::Delivered;
    }
    if s == StatusCode::CONFLICT {
        return if previous.resent {
            Outcome::Transient {
                reason: reason(),
                retry_after: retry_after(),
            }
        } else {
            Outcome::Resign
        };
    }
    if s.is_redirection() {
        let to = resp
            .headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|l| format!(" to {}", excerpt(l.as_bytes())))
            .unwrap_or_default();
        return Outcome::DestinationProblem {
            reason: format!(
                "HTTP {}: redirected{to}; parafed does not follow redirects: fix the peer's \
                 base_url in [peers] or its /.well-known/paracord/server",
                s.as_u16()
            ),
            retry_after: retry_after(),
        };
    }
    if s == StatusCode::FORBIDDEN {
        return if previous.forbidden_in_a_row + 1 >= policy.forbidden_run {
            Outcome::DestinationProblem {
                reason: format!(
                    "{} ({} 403s in a row: our key or trust registration there is wrong)",
                    reason(),
                    previous.forbidden_in_a_row + 1
                ),
                retry_after: retry_after(),
            }
        } else {
            Outcome::Permanent { reason: reason() }
        };
    }
    let transient = s.is_server_error()
        || matches!(
            s,
            StatusCode::UNAUTHORIZED | StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
        )
        // 1xx as a final answer: a broken peer, not a verdict on the event.
        || s.is_informational();
    if transient {
        Outcome::Transient {
            reason: reason(),
            retry_after: retry_after(),
        }
    } else {
        Outcome::Permanent { reason: reason() }
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delay-seconds, or an HTTP-date (any of the
/// three formats RFC 9110 §5.6.7 accepts) measured from `now` (a date in the past is a
/// zero delay). `None` for anything else.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // delay-seconds = 1*DIGIT; a value too large to hold is "very long" (the cap
        // applies later).
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::directory::DirectoryError;
    use crate::remote::http::HttpError;

    fn resp(status: u16, headers: &[(&str, &str)]) -> Response {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        Response {
            status: StatusCode::from_u16(status).unwrap(),
            headers: h,
            body: bytes::Bytes::from_static(b"{\"code\":\"X\"}"),
            latency: Duration::ZERO,
        }
    }

    fn now() -> SystemTime {
        // Sun, 06 Nov 1994 08:49:37 GMT: RFC 9110's example date.
        SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    /// Short names for the table.
    #[derive(Debug, PartialEq)]
    enum K {
        Delivered,
        Resign,
        Permanent,
        Transient(Option<u64>),
        Problem(Option<u64>),
    }

    fn kind(o: &Outcome) -> K {
        match o {
            Outcome::Delivered => K::Delivered,
            Outcome::Resign => K::Resign,
            Outcome::Permanent { .. } => K::Permanent,
            Outcome::Transient { retry_after, .. } => {
                K::Transient(retry_after.map(|d| d.as_secs()))
            }
            Outcome::DestinationProblem { retry_after, .. } => {
                K::Problem(retry_after.map(|d| d.as_secs()))
            }
        }
    }

    #[test]
    fn every_row_of_the_sender_rules() {
        let p = Policy::default();
        let first = Previous::default();
        let resent = Previous {
            resent: true,
            ..Previous::default()
        };
        let run = |n| Previous {
            forbidden_in_a_row: n,
            ..Previous::default()
        };
        let ra = |v: &'static str| vec![("retry-after", v)];
        type Row = (u16, Vec<(&'static str, &'static str)>, Previous, K);
        let table: Vec<Row> = vec![
            (200, vec![], first, K::Delivered),
            (201, vec![], first, K::Delivered),
            (202, vec![], first, K::Delivered),
            (204, vec![], first, K::Delivered),
            (409, vec![], first, K::Resign),
            (409, vec![], resent, K::Transient(None)),
            (409, ra("7"), resent, K::Transient(Some(7))),
            (401, vec![], first, K::Transient(None)),
            (408, vec![], first, K::Transient(None)),
            (429, vec![], first, K::Transient(None)),
            (429, ra("20"), first, K::Transient(Some(20))),
            (500, vec![], first, K::Transient(None)),
            (502, vec![], first, K::Transient(None)),
            (503, ra("5"), first, K::Transient(Some(5))),
            (504, vec![], first, K::Transient(None)),
            (599, vec![], first, K::Transient(None)),
            (400, vec![], first, K::Permanent),
            (404, vec![], first, K::Permanent),
            (405, vec![], first, K::Permanent),
            (410, vec![], first, K::Permanent),
            (413, vec![], first, K::Permanent),
            (415, vec![], first, K::Permanent),
            (422, vec![], first, K::Permanent),
            (403, vec![], run(0), K::Permanent),
            (403, vec![], run(1), K::Permanent),
            (403, vec![], run(2), K::Problem(None)),
            (403, vec![], run(9), K::Problem(None)),
            (300, vec![], first, K::Problem(None)),
            (
                301,
                vec![("location", "https://x.test/")],
                first,
                K::Problem(None),
            ),
            (302, vec![], first, K::Problem(None)),
            (303, vec![], first, K::Problem(None)),
            (304, vec![], first, K::Problem(None)),
            (305, vec![], first, K::Problem(None)),
            (306, vec![], first, K::Problem(None)),
            (
                307,
                vec![("location", "/elsewhere")],
                first,
                K::Problem(None),
            ),
            (308, ra("30"), first, K::Problem(Some(30))),
            (100, vec![], first, K::Transient(None)),
        ];
        for (status, headers, prev, want) in table {
            let r = resp(status, &headers);
            let got = classify(Ok(&r), prev, &p, now());
            assert_eq!(kind(&got), want, "HTTP {status} with {prev:?}");
        }
    }

    #[test]
    fn send_errors_are_transient() {
        let p = Policy::default();
        let errors = [
            SendError::Http(HttpError::Connect("refused".into())),
            SendError::Http(HttpError::Timeout(Duration::from_secs(30))),
            SendError::Http(HttpError::Protocol("reset".into())),
            SendError::Http(HttpError::TooLarge(65536)),
            SendError::Directory(DirectoryError::Unknown(
                crate::protocol::ServerName::parse("x.test").unwrap(),
            )),
        ];
        for e in &errors {
            assert_eq!(
                kind(&classify(Err(e), Previous::default(), &p, now())),
                K::Transient(None),
                "{e}"
            );
        }
    }

    #[test]
    fn retry_after_both_forms_and_garbage() {
        let n = now();
        let table: Vec<(&str, Option<u64>)> = vec![
            ("0", Some(0)),
            ("120", Some(120)),
            (" 5 ", Some(5)),
            ("99999999999999999999999", Some(u64::MAX)),
            // IMF-fixdate, RFC 850 and asctime, 20 s ahead of `now`.
            ("Sun, 06 Nov 1994 08:49:57 GMT", Some(20)),
            ("Sunday, 06-Nov-94 08:49:57 GMT", Some(20)),
            ("Sun Nov  6 08:49:57 1994", Some(20)),
            // In the past: no wait beyond the backoff.
            ("Sun, 06 Nov 1994 08:00:00 GMT", Some(0)),
            ("", None),
            ("-5", None),
            ("1.5", None),
            ("soon", None),
            ("Sun, 06 Nov 1994 25:61:00 GMT", None),
            ("5 s", None),
        ];
        for (v, want) in table {
            assert_eq!(
                parse_retry_after(v, n).map(|d| d.as_secs()),
                want,
                "Retry-After {v:?}"
            );
        }
    }

    #[test]
    fn an_http_date_retry_after_reaches_the_outcome() {
        let r = resp(429, &[("retry-after", "Sun, 06 Nov 1994 08:49:57 GMT")]);
        let o = classify(Ok(&r), Previous::default(), &Policy::default(), now());
        assert_eq!(kind(&o), K::Transient(Some(20)));
        let r = resp(429, &[("retry-after", "tomorrow-ish")]);
        let o = classify(Ok(&r), Previous::default(), &Policy::default(), now());
        assert_eq!(kind(&o), K::Transient(None));
    }
}
