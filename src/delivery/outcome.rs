//! What an answer to `POST /event` means for the event and for its destination.
//!
//! The rules are PROTOCOL.md's "What a sender must treat as what", one arm each:
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx with `{"event_id","inserted"}` for this event (`inserted:false` too: a duplicate) | [`Outcome::Delivered`] |
//! | 2xx with any other body | [`Outcome::DestinationProblem`]: not a Paracord federation endpoint |
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

/// Classifies one request's result for `event_id` (see the module table).
///
/// `now` is the clock an HTTP-date `Retry-After` is measured against.
pub fn classify(
    result: Result<&Response, &SendError>,
    event_id: &str,
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
        return if acknowledges(&resp.body, event_id) {
            Outcome::Delivered
        } else {
            // A catch-all proxy or a wrong endpoint answering 200 must not swallow events.
            Outcome::DestinationProblem {
                reason: format!(
                    "HTTP {} without {{\"event_id\":\"{}\",\"inserted\":…}}: not a Paracord \
                     federation endpoint? check the peer's base_url: {}",
                    s.as_u16(),
                    excerpt(event_id.as_bytes()),
                    excerpt(&resp.body)
                ),
                retry_after: retry_after(),
            }
        };
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

/// True when a 2xx body is the receipt PROTOCOL.md names: a JSON object with this
/// `event_id` and a boolean `inserted`.
fn acknowledges(body: &[u8], event_id: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Receipt<'a> {
        #[serde(borrow)]
        event_id: std::borrow::Cow<'a, str>,
        /// Required, and a boolean: its presence is part of the check (`true` and
        /// `false` both mean the destination has the event).
        #[allow(dead_code)]
        inserted: bool,
    }
    serde_json::from_slice::<Receipt>(body).is_ok_and(|r| r.event_id == event_id)
}

/// Applies the 403 run across one batch, in row order: every request of a batch is
/// classified with the run as it stood before the batch, so a window of 403s would all
/// be `Permanent`. Counting on from `before`, once `forbidden_run` 403s in a row are
/// reached the rest are the destination's problem (their rows wait); any other answer
/// ends the run. `batch` gives each request's status (`None`: no answer) and outcome.
pub fn apply_forbidden_run<'a>(
    batch: impl IntoIterator<Item = (Option<u16>, &'a mut Outcome)>,
    before: u32,
    policy: &Policy,
) {
    let mut run = before;
    for (status, outcome) in batch {
        match status {
            Some(403) => {
                run = run.saturating_add(1);
                if run >= policy.forbidden_run {
                    if let Outcome::Permanent { reason } = outcome {
                        *outcome = Outcome::DestinationProblem {
                            reason: format!(
                                "{reason} ({run} 403s in a row: our key or trust registration there is wrong)"
                            ),
                            retry_after: None,
                        };
                    }
                }
            }
            Some(_) => run = 0,
            None => {}
        }
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

    const EVENT: &str = "$1:beta.test";

    fn resp(status: u16, headers: &[(&str, &str)]) -> Response {
        resp_with(
            status,
            headers,
            br#"{"event_id":"$1:beta.test","inserted":true}"#,
        )
    }

    fn resp_with(status: u16, headers: &[(&str, &str)], body: &'static [u8]) -> Response {
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
            body: bytes::Bytes::from_static(body),
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
            let got = classify(Ok(&r), EVENT, prev, &p, now());
            assert_eq!(kind(&got), want, "HTTP {status} with {prev:?}");
        }
    }

    #[test]
    fn a_2xx_must_be_this_events_receipt() {
        let p = Policy::default();
        let table: Vec<(u16, &'static [u8], K)> = vec![
            (
                202,
                br#"{"event_id":"$1:beta.test","inserted":true}"#,
                K::Delivered,
            ),
            (
                202,
                br#"{"event_id":"$1:beta.test","inserted":false}"#,
                K::Delivered,
            ),
            (
                200,
                br#"{"inserted":true,"event_id":"$1:beta.test","extra":1}"#,
                K::Delivered,
            ),
            (
                200,
                br#"{"event_id":"$2:beta.test","inserted":true}"#,
                K::Problem(None),
            ),
            (200, br#"{"event_id":"$1:beta.test"}"#, K::Problem(None)),
            (200, b"<html>welcome</html>", K::Problem(None)),
            (204, b"", K::Problem(None)),
        ];
        for (status, body, want) in table {
            let r = resp_with(status, &[], body);
            let got = classify(Ok(&r), EVENT, Previous::default(), &p, now());
            assert_eq!(
                kind(&got),
                want,
                "HTTP {status} {}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_run_of_403s_counts_across_one_batch() {
        let p = Policy::default();
        let permanent = || Outcome::Permanent {
            reason: "HTTP 403".into(),
        };
        // (statuses in row order, 403s before the batch, expected kinds)
        let table: Vec<(Vec<Option<u16>>, u32, Vec<K>)> = vec![
            (
                vec![Some(403); 5],
                0,
                vec![
                    K::Permanent,
                    K::Permanent,
                    K::Problem(None),
                    K::Problem(None),
                    K::Problem(None),
                ],
            ),
            (
                vec![Some(403), Some(403)],
                1,
                vec![K::Permanent, K::Problem(None)],
            ),
            (
                vec![Some(403), Some(400), Some(403), Some(403)],
                0,
                vec![K::Permanent, K::Permanent, K::Permanent, K::Permanent],
            ),
            (
                vec![Some(403), None, Some(403), Some(403)],
                0,
                vec![K::Permanent, K::Permanent, K::Permanent, K::Problem(None)],
            ),
        ];
        for (statuses, before, want) in table {
            let mut outcomes: Vec<Outcome> = statuses
                .iter()
                .map(|s| match s {
                    Some(403) | Some(400) => permanent(),
                    _ => Outcome::Transient {
                        reason: "timeout".into(),
                        retry_after: None,
                    },
                })
                .collect();
            apply_forbidden_run(
                statuses.iter().copied().zip(outcomes.iter_mut()),
                before,
                &p,
            );
            let got: Vec<K> = outcomes.iter().map(kind).collect();
            let want: Vec<K> = want
                .into_iter()
                .zip(&statuses)
                .map(|(k, s)| if s.is_none() { K::Transient(None) } else { k })
                .collect();
            assert_eq!(got, want, "{statuses:?} after {before}");
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
                kind(&classify(Err(e), EVENT, Previous::default(), &p, now())),
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
        let o = classify(
            Ok(&r),
            EVENT,
            Previous::default(),
            &Policy::default(),
            now(),
        );
        assert_eq!(kind(&o), K::Transient(Some(20)));
        let r = resp(429, &[("retry-after", "tomorrow-ish")]);
        let o = classify(
            Ok(&r),
            EVENT,
            Previous::default(),
            &Policy::default(),
            now(),
        );
        assert_eq!(kind(&o), K::Transient(None));
    }
}
