//! A destination's delivery state, as a typed state machine.
//!
//! ```text
//!               Failed                       Failed
//!   Healthy ───────────────▶ BackingOff{n} ──────────▶ BackingOff{n+1}
//!      ▲  ◀─────────────────      │ Delivered
//!      │         Delivered        ▼
//!      │ Release            (probe with one row when `until` has passed)
//!   Held{reason, until} ◀── Hold (the peer is quarantined; from any state but Paused)
//!   Paused{by, reason}  ◀── Pause (an operator; from any state); Resume ──▶ Healthy
//! ```
//!
//! * **Healthy** — rows are sent, up to the window at a time.
//! * **BackingOff** — nothing is sent before `until`; then one row is sent as a probe,
//!   and success drains the rest. `failures` counts consecutive destination failures
//!   and sets the next delay ([`super::backoff`]).
//! * **Held** — the peer is quarantined (trust): nothing is sent, no failure is counted;
//!   trust is asked again at `until` ([`super::Policy::hold_recheck`]).
//! * **Paused** — an operator stopped sending; only [`DestinationEvent::Resume`] ends it.
//!   Outcomes of requests already in flight are recorded but do not move it.
//!
//! Every change goes through [`Destination::apply`]; `store::destinations` saves the
//! result in one place (with a version check, so an operator's pause is never
//! overwritten by a drain that loaded the row before it).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{backoff, Policy};
use crate::store::destinations::Health;

/// Where a destination stands.
#[derive(Clone, Debug, PartialEq)]
pub enum DestinationState {
    Healthy,
    BackingOff {
        until: DateTime<Utc>,
        failures: u32,
    },
    Held {
        reason: String,
        until: DateTime<Utc>,
    },
    Paused {
        by: String,
        reason: String,
    },
}

impl DestinationState {
    /// The name stored in `destination_health.state` and shown to operators.
    pub fn name(&self) -> &'static str {
        match self {
            DestinationState::Healthy => "healthy",
            DestinationState::BackingOff { .. } => "backing_off",
            DestinationState::Held { .. } => "held",
            DestinationState::Paused { .. } => "paused",
        }
    }
}

/// The last failure a destination reported.
#[derive(Clone, Debug, PartialEq)]
pub struct LastError {
    pub at: DateTime<Utc>,
    pub message: String,
    pub status: Option<i32>,
}

/// A destination and its state.
#[derive(Clone, Debug, PartialEq)]
pub struct Destination {
    pub name: String,
    pub state: DestinationState,
    /// 403s in a row (PROTOCOL.md: a run of them is the destination's problem).
    pub forbidden_in_a_row: u32,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<LastError>,
    /// Bumped by every save; a save of a stale copy is refused.
    pub version: i64,
}

/// What can happen to a destination.
#[derive(Clone, Debug, PartialEq)]
pub enum DestinationEvent {
    /// A request was delivered.
    Delivered { at: DateTime<Utc> },
    /// A request failed in a way that concerns the destination (transient, or a
    /// destination problem): it backs off. `jitter` in [0, 1] (see [`backoff::delay`]).
    Failed {
        at: DateTime<Utc>,
        reason: String,
        status: Option<i32>,
        retry_after: Option<Duration>,
        forbidden: bool,
        jitter: f64,
    },
    /// The destination refused one event for good (a permanent 4xx): noted, no backoff.
    EventRefused {
        at: DateTime<Utc>,
        reason: String,
        status: Option<i32>,
        forbidden: bool,
    },
    /// The peer is quarantined: hold until `until`, then ask trust again.
    Hold {
        reason: String,
        until: DateTime<Utc>,
    },
    /// Trust allows the peer again.
    Release,
    /// An operator pauses delivery.
    Pause { by: String, reason: String },
    /// An operator resumes delivery.
    Resume,
    /// An operator asks for a probe now instead of at the end of the backoff.
    RetryNow { at: DateTime<Utc> },
}

/// What the deliver job may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sending {
    /// Send up to the window.
    Window,
    /// Send one row: the backoff ended; success drains the rest.
    Probe,
    /// Send nothing now.
    Wait,
    /// Held and its recheck is due: ask trust, then `Release` or `Hold` again.
    Recheck,
}

fn add(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    at + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::hours(1))
}

impl Destination {
    /// A destination never heard from.
    pub fn new(name: &str) -> Destination {
        Destination {
            name: name.to_owned(),
            state: DestinationState::Healthy,
            forbidden_in_a_row: 0,
            last_success_at: None,
            last_error: None,
            version: 0,
        }
    }

    /// The state after `event` (see the module diagram).
    pub fn apply(mut self, event: DestinationEvent, policy: &Policy) -> Destination {
        use DestinationEvent as E;
        use DestinationState as S;
        let paused = matches!(self.state, S::Paused { .. });
        let held = matches!(self.state, S::Held { .. });
        match event {
            E::Delivered { at } => {
                self.last_success_at = Some(at);
                self.forbidden_in_a_row = 0;
                if !paused && !held {
                    self.state = S::Healthy;
                }
            }
            E::Failed {
                at,
                reason,
                status,
                retry_after,
                forbidden,
                jitter,
            } => {
                self.note(at, reason, status, forbidden);
                if !paused && !held {
                    let failures = match self.state {
                        S::BackingOff { failures, .. } => failures.saturating_add(1),
                        _ => 1,
                    };
                    let delay = backoff::delay(policy, failures, retry_after, jitter);
                    self.state = S::BackingOff {
                        until: add(at, delay),
                        failures,
                    };
                }
            }
            E::EventRefused {
                at,
                reason,
                status,
                forbidden,
            } => self.note(at, reason, status, forbidden),
            E::Hold { reason, until } => {
                if !paused {
                    self.state = S::Held { reason, until };
                }
            }
            E::Release => {
                if held {
                    self.state = S::Healthy;
                }
            }
            E::Pause { by, reason } => self.state = S::Paused { by, reason },
            E::Resume => {
                if paused {
                    self.state = S::Healthy;
                }
            }
            E::RetryNow { at } => {
                if let S::BackingOff { failures, .. } = self.state {
                    self.state = S::BackingOff {
                        until: at,
                        failures,
                    };
                }
            }
        }
        self
    }

    fn note(&mut self, at: DateTime<Utc>, message: String, status: Option<i32>, forbidden: bool) {
        self.forbidden_in_a_row = if forbidden {
            self.forbidden_in_a_row.saturating_add(1)
        } else {
            0
        };
        self.last_error = Some(LastError {
            at,
            message,
            status,
        });
    }

    /// What may be sent at `now`. A destination that has never answered (no success,
    /// no error on record: a peer new to us) gets one request first, as after a
    /// backoff: a room full of peers that never answer must not cost a window of
    /// hanging connections each.
    pub fn sending(&self, now: DateTime<Utc>) -> Sending {
        match &self.state {
            DestinationState::Healthy
                if self.last_success_at.is_none() && self.last_error.is_none() =>
            {
                Sending::Probe
            }
            DestinationState::Healthy => Sending::Window,
            DestinationState::BackingOff { until, .. } if *until <= now => Sending::Probe,
            DestinationState::Held { until, .. } if *until <= now => Sending::Recheck,
            _ => Sending::Wait,
        }
    }

    /// Reads the stored row. Errors name what is wrong with it.
    pub fn from_row(h: Health) -> Result<Destination, String> {
        let until = || {
            h.backoff_until.ok_or_else(|| {
                format!(
                    "destination {}: {} without backoff_until",
                    h.destination, h.state
                )
            })
        };
        let state = match h.state.as_str() {
            "healthy" => DestinationState::Healthy,
            "backing_off" => DestinationState::BackingOff {
                until: until()?,
                failures: u32::try_from(h.consecutive_failures).unwrap_or(0).max(1),
            },
            "held" => DestinationState::Held {
                reason: h.paused_reason.clone().unwrap_or_default(),
                until: until()?,
            },
            "paused" => DestinationState::Paused {
                by: h.paused_by.clone().unwrap_or_default(),
                reason: h.paused_reason.clone().unwrap_or_default(),
            },
            other => {
                return Err(format!(
                    "destination {}: unknown state {other:?}",
                    h.destination
                ))
            }
        };
        let last_error = match (h.last_error_at, h.last_error) {
            (Some(at), Some(message)) => Some(LastError {
                at,
                message,
                status: h.last_status_code,
            }),
            _ => None,
        };
        Ok(Destination {
            name: h.destination,
            state,
            forbidden_in_a_row: u32::try_from(h.consecutive_forbidden).unwrap_or(0),
            last_success_at: h.last_success_at,
            last_error,
            version: h.version,
        })
    }

    /// The row that stores this state.
    pub fn to_row(&self) -> Health {
        let (failures, until, reason, by) = match &self.state {
            DestinationState::Healthy => (0, None, None, None),
            DestinationState::BackingOff { until, failures } => {
                (*failures as i32, Some(*until), None, None)
            }
            DestinationState::Held { reason, until } => {
                (0, Some(*until), Some(reason.clone()), None)
            }
            DestinationState::Paused { by, reason } => {
                (0, None, Some(reason.clone()), Some(by.clone()))
            }
        };
        Health {
            destination: self.name.clone(),
            state: self.state.name().to_owned(),
            consecutive_failures: failures,
            consecutive_forbidden: self.forbidden_in_a_row.min(i32::MAX as u32) as i32,
            backoff_until: until,
            last_success_at: self.last_success_at,
            last_error_at: self.last_error.as_ref().map(|e| e.at),
            last_error: self.last_error.as_ref().map(|e| e.message.clone()),
            last_status_code: self.last_error.as_ref().and_then(|e| e.status),
            paused_reason: reason,
            paused_by: by,
            version: self.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn policy() -> Policy {
        Policy {
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(1000),
            ..Policy::default()
        }
    }

    fn with(state: DestinationState) -> Destination {
        Destination {
            state,
            ..Destination::new("beta.test")
        }
    }

    fn failed(at: i64) -> DestinationEvent {
        DestinationEvent::Failed {
            at: t(at),
            reason: "HTTP 503: down".into(),
            status: Some(503),
            retry_after: None,
            forbidden: false,
            jitter: 1.0,
        }
    }

    #[test]
    fn transitions() {
        use DestinationEvent as E;
        use DestinationState as S;
        let backing = |until: i64, failures| S::BackingOff {
            until: t(until),
            failures,
        };
        let held = |until: i64| S::Held {
            reason: "quarantined".into(),
            until: t(until),
        };
        let paused = || S::Paused {
            by: "ops".into(),
            reason: "maintenance".into(),
        };
        let hold = |until: i64| E::Hold {
            reason: "quarantined".into(),
            until: t(until),
        };
        let pause = || E::Pause {
            by: "ops".into(),
            reason: "maintenance".into(),
        };
        let refused = E::EventRefused {
            at: t(0),
            reason: "HTTP 400".into(),
            status: Some(400),
            forbidden: false,
        };
        let ok = E::Delivered { at: t(0) };
        // (state, event, expected state). Backoff: base 10 s, jitter 1.0, doubling.
        let table: Vec<(S, E, S)> = vec![
            (S::Healthy, ok.clone(), S::Healthy),
            (S::Healthy, failed(0), backing(10, 1)),
            (S::Healthy, refused.clone(), S::Healthy),
            (S::Healthy, hold(60), held(60)),
            (S::Healthy, E::Release, S::Healthy),
            (S::Healthy, pause(), paused()),
            (S::Healthy, E::Resume, S::Healthy),
            (S::Healthy, E::RetryNow { at: t(5) }, S::Healthy),
            (backing(10, 1), ok.clone(), S::Healthy),
            (backing(10, 1), failed(10), backing(30, 2)),
            (backing(30, 2), failed(30), backing(70, 3)),
            (backing(10, 1), refused.clone(), backing(10, 1)),
            (backing(10, 1), hold(60), held(60)),
            (backing(10, 1), E::Release, backing(10, 1)),
            (backing(10, 1), pause(), paused()),
            (backing(10, 1), E::Resume, backing(10, 1)),
            (backing(10, 1), E::RetryNow { at: t(2) }, backing(2, 1)),
            (held(60), ok.clone(), held(60)),
            (held(60), failed(0), held(60)),
            (held(60), refused.clone(), held(60)),
            (held(60), hold(120), held(120)),
            (held(60), E::Release, S::Healthy),
            (held(60), pause(), paused()),
            (held(60), E::Resume, held(60)),
            (held(60), E::RetryNow { at: t(2) }, held(60)),
            (paused(), ok, paused()),
            (paused(), failed(0), paused()),
            (paused(), refused, paused()),
            (paused(), hold(60), paused()),
            (paused(), E::Release, paused()),
            (paused(), pause(), paused()),
            (paused(), E::Resume, S::Healthy),
            (paused(), E::RetryNow { at: t(2) }, paused()),
        ];
        let p = policy();
        for (from, event, want) in table {
            let got = with(from.clone()).apply(event.clone(), &p).state;
            assert_eq!(got, want, "{from:?} + {event:?}");
        }
    }

    #[test]
    fn retry_after_and_the_cap_shape_the_backoff() {
        let p = policy();
        let e = DestinationEvent::Failed {
            at: t(0),
            reason: "HTTP 429".into(),
            status: Some(429),
            retry_after: Some(Duration::from_secs(20)),
            forbidden: false,
            jitter: 0.0,
        };
        let d = with(DestinationState::Healthy).apply(e, &p);
        assert_eq!(
            d.state,
            DestinationState::BackingOff {
                until: t(20),
                failures: 1
            }
        );
        let mut d = with(DestinationState::Healthy);
        for i in 0..40 {
            d = d.apply(failed(i), &p);
        }
        match d.state {
            DestinationState::BackingOff { until, failures } => {
                assert_eq!(failures, 40);
                assert_eq!(until, t(39 + 1000));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forbidden_runs_are_counted_and_reset() {
        let p = policy();
        let refused = |forbidden| DestinationEvent::EventRefused {
            at: t(0),
            reason: "HTTP 403".into(),
            status: Some(403),
            forbidden,
        };
        let mut d = with(DestinationState::Healthy);
        d = d.apply(refused(true), &p).apply(refused(true), &p);
        assert_eq!(d.forbidden_in_a_row, 2);
        assert_eq!(d.last_error.as_ref().and_then(|e| e.status), Some(403));
        d = d.apply(refused(false), &p);
        assert_eq!(d.forbidden_in_a_row, 0);
        d = d
            .apply(refused(true), &p)
            .apply(DestinationEvent::Delivered { at: t(1) }, &p);
        assert_eq!(d.forbidden_in_a_row, 0);
        assert_eq!(d.last_success_at, Some(t(1)));
    }

    #[test]
    fn what_may_be_sent() {
        let table = [
            (DestinationState::Healthy, Sending::Window),
            (
                DestinationState::BackingOff {
                    until: t(10),
                    failures: 1,
                },
                Sending::Wait,
            ),
            (
                DestinationState::BackingOff {
                    until: t(5),
                    failures: 1,
                },
                Sending::Probe,
            ),
            (
                DestinationState::Held {
                    reason: "q".into(),
                    until: t(10),
                },
                Sending::Wait,
            ),
            (
                DestinationState::Held {
                    reason: "q".into(),
                    until: t(5),
                },
                Sending::Recheck,
            ),
            (
                DestinationState::Paused {
                    by: "ops".into(),
                    reason: "r".into(),
                },
                Sending::Wait,
            ),
        ];
        for (state, want) in table {
            let mut d = with(state.clone());
            d.last_success_at = Some(t(0));
            assert_eq!(d.sending(t(5)), want, "{state:?}");
        }
        // A peer that never answered gets one request before a window; any answer
        // on record (a success, or an error) opens the window.
        let new = with(DestinationState::Healthy);
        assert_eq!(new.sending(t(5)), Sending::Probe);
        let delivered = new
            .clone()
            .apply(DestinationEvent::Delivered { at: t(1) }, &policy());
        assert_eq!(delivered.sending(t(5)), Sending::Window);
        let mut refused = new;
        refused.last_error = Some(LastError {
            at: t(1),
            message: "HTTP 400".into(),
            status: Some(400),
        });
        assert_eq!(refused.sending(t(5)), Sending::Window);
    }

    #[test]
    fn rows_round_trip() {
        let p = policy();
        let states = [
            with(DestinationState::Healthy),
            with(DestinationState::Healthy).apply(failed(0), &p),
            with(DestinationState::Healthy).apply(
                DestinationEvent::Hold {
                    reason: "q".into(),
                    until: t(9),
                },
                &p,
            ),
            with(DestinationState::Healthy).apply(
                DestinationEvent::Pause {
                    by: "ops".into(),
                    reason: "r".into(),
                },
                &p,
            ),
        ];
        for d in states {
            assert_eq!(Destination::from_row(d.to_row()).as_ref(), Ok(&d));
        }
        let mut bad = with(DestinationState::Healthy).to_row();
        bad.state = "backoff".into();
        assert!(Destination::from_row(bad).is_err());
    }
}
