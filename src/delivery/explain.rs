//! What happens next to an event, and when — the answer `parafed admin events show`
//! gives to "why was event X not delivered to Y". Pure: the caller reads the event's
//! status, each delivery's state and its destination's state, and these rules say what
//! the system will do with them (the same rules the deliver job follows: `destination`,
//! and the queue pause of `queue::admin`).

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::DestinationState;

/// The next step, in words, and when it is due (`None`: nothing is scheduled — it waits
/// for an operator, for a peer's answer, or it is finished).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Next {
    pub what: String,
    pub at: Option<DateTime<Utc>>,
}

fn next(what: impl Into<String>, at: Option<DateTime<Utc>>) -> Next {
    Next {
        what: what.into(),
        at,
    }
}

/// The next step for an event as a whole, from its status (`pending`, `accepted`,
/// `rejected`, `held`) and whether fan-out wrote its deliveries; `None` once its
/// deliveries decide (then see [`for_delivery`]).
pub fn for_event(status: &str, fanned_out: bool, reject_reason: Option<&str>) -> Option<Next> {
    match status {
        "pending" => Some(next(
            "waits for the verify job: signatures and the room's rules are checked, then it is accepted or rejected",
            None,
        )),
        "held" => Some(next(
            "held: its sender is quarantined; it is verified and relayed only when an operator releases the peer",
            None,
        )),
        "rejected" => Some(next(
            format!(
                "nothing: rejected ({}); a rejected event is never applied or relayed",
                reject_reason.unwrap_or("no reason recorded")
            ),
            None,
        )),
        "accepted" if !fanned_out => Some(next(
            "waits for the fanout job, which writes one delivery per server in the room",
            None,
        )),
        "accepted" => None,
        other => Some(next(format!("unknown status {other:?}"), None)),
    }
}

/// The next step for one delivery: its state (`pending`, `in_flight`, `delivered`,
/// `dead`, `cancelled`), its destination's state (`None`: the destination has no state
/// row yet, i.e. healthy) and whether the deliver queue is paused fleet-wide.
pub fn for_delivery(
    delivery_id: i64,
    state: &str,
    dead_reason: Option<&str>,
    destination: Option<&DestinationState>,
    deliver_paused: bool,
    now: DateTime<Utc>,
) -> Next {
    match state {
        "delivered" => return next("nothing: delivered", None),
        "dead" => {
            return next(
                format!(
                    "nothing: dead ({}); `parafed admin deliveries retry {delivery_id}` sends it again",
                    dead_reason.unwrap_or("no reason recorded")
                ),
                None,
            )
        }
        "cancelled" => {
            return next(
                format!(
                    "nothing: cancelled ({}); `parafed admin deliveries retry {delivery_id}` sends it again",
                    dead_reason.unwrap_or("no reason recorded")
                ),
                None,
            )
        }
        "in_flight" => return next("a request is open; the peer's answer decides", None),
        _ => {}
    }
    if deliver_paused {
        return next(
            "waits: the deliver queue is paused fleet-wide (`parafed admin queues resume deliver`)",
            None,
        );
    }
    match destination.unwrap_or(&DestinationState::Healthy) {
        DestinationState::Healthy => next(
            "sent by the destination's next drain, after any earlier event it depends on",
            Some(now),
        ),
        DestinationState::BackingOff { until, failures } => next(
            format!(
                "waits: the destination is backing off after {failures} failure(s); one probe is sent when the backoff ends (`destinations retry-now` sends it now)"
            ),
            Some((*until).max(now)),
        ),
        DestinationState::Held { reason, until } => next(
            format!("held: the destination is quarantined ({reason}); its standing is checked again"),
            Some((*until).max(now)),
        ),
        DestinationState::Paused { by, reason } => next(
            format!(
                "waits: the destination was paused by {by} ({reason}); `parafed admin destinations resume` sends its backlog in order"
            ),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn events_before_their_deliveries_decide() {
        let cases = [
            ("pending", false, None, Some("verify job")),
            ("held", false, None, Some("quarantined")),
            (
                "rejected",
                false,
                Some("bad signature"),
                Some("bad signature"),
            ),
            ("accepted", false, None, Some("fanout job")),
            ("accepted", true, None, None),
        ];
        for (status, fanned, reason, want) in cases {
            let got = for_event(status, fanned, reason);
            match want {
                Some(w) => assert!(got.unwrap().what.contains(w), "{status}"),
                None => assert!(got.is_none(), "{status}"),
            }
        }
    }

    #[test]
    fn each_delivery_state_and_destination_state() {
        let backing_off = DestinationState::BackingOff {
            until: t(60),
            failures: 3,
        };
        let overdue = DestinationState::BackingOff {
            until: t(-5),
            failures: 1,
        };
        let held = DestinationState::Held {
            reason: "quarantined".into(),
            until: t(30),
        };
        let paused = DestinationState::Paused {
            by: "ops".into(),
            reason: "maintenance".into(),
        };
        // (delivery state, destination state, deliver queue paused, words, due at)
        type Case<'a> = (
            &'a str,
            Option<&'a DestinationState>,
            bool,
            &'a str,
            Option<DateTime<Utc>>,
        );
        let cases: [Case; 10] = [
            ("delivered", None, false, "delivered", None),
            ("dead", None, false, "deliveries retry 7", None),
            ("cancelled", None, false, "cancelled", None),
            ("in_flight", None, true, "request is open", None),
            ("pending", None, true, "queue is paused", None),
            ("pending", None, false, "next drain", Some(t(0))),
            (
                "pending",
                Some(&backing_off),
                false,
                "3 failure(s)",
                Some(t(60)),
            ),
            ("pending", Some(&overdue), false, "backing off", Some(t(0))),
            ("pending", Some(&held), false, "quarantined", Some(t(30))),
            ("pending", Some(&paused), false, "paused by ops", None),
        ];
        for (state, dest, paused_q, want, at) in cases {
            let n = for_delivery(7, state, Some("r"), dest, paused_q, t(0));
            assert!(n.what.contains(want), "{state} {dest:?}: {}", n.what);
            assert_eq!(n.at, at, "{state} {dest:?}");
        }
    }
}
