//! Deferred fan-out: which of a room's events a drain writes outbound rows for when it
//! catches a destination's deferral up.
//!
//! A destination that is not healthy when an event of a room hosted here is fanned out
//! gets no row for it: fan-out leaves a deferral instead, "the events of this room after
//! `cursor` that this destination would receive have no row yet" (`store::deferrals`,
//! `store::outbound::WRITE_CTES`). A room with a thousand dead servers then costs each
//! fan-out a lookup per server, not a row per server and event, and the healthy servers'
//! deliveries do not wait behind a thousand rows of writes per event.
//!
//! The destination's drain, once it may send, reads the room's events after the cursor
//! in storage order and [`plan`]s them: the rows to write, and how far the cursor moves.
//! Rows after the cursor (an old event fanned out late gets a row at once when its
//! destination answers; for one that does not, the deferral moves back to start before
//! it) are held back until the cursor passed them, so the room's events still leave in
//! storage order.
//!
//! A deferral of a destination that answers ends once its drain caught it up (every
//! event of the room after the cursor decided): its later events get rows from fan-out
//! again. Ending races with fan-outs that saw the deferral and skipped the destination;
//! the fan-out statement touches the deferral row for each such pair and writes the row
//! itself if the deferral is gone, and the end only deletes an untouched deferral
//! (`store::deferrals::advance`): a skipped event either stops the end or gets its row.
//!
//! Why an unsettled event (not yet verified, or not yet fanned out) stops the
//! cursor: its fan-out, still to come, sees the deferral and skips the destination, so
//! only the drain can write its row — the cursor must not pass it. Unless it is older
//! than twice `dependency_wait`: fan-out never defers an event older than one
//! `dependency_wait` (`outbound::deferrable`), so such an event gets its row from its own
//! fan-out, and a stuck event (its origin's keys unreachable) does not stall the room
//! for the destination. The margin between the two ages covers clocks that differ
//! between workers by less than `dependency_wait`. A held event (a quarantined origin or
//! relayer) is passed over at once: released, it is never deferred, so its own fan-out
//! writes its rows.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// A destination's state as fan-out sees it (`destination_health`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reach {
    /// Cannot be reached: backing off after failures that got no HTTP answer (refused,
    /// timed out, no route), or healthy and new with its first request in flight (a
    /// peer that accepts connections and never answers is that for the whole request
    /// timeout). A peer that answers with errors (a 503), or one paused or held by an
    /// operator, is reachable: its deliveries stay rows an operator can list, retry or
    /// cancel one by one.
    pub unreachable: bool,
}

/// A destination's deferral in a room, as fan-out sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Open {
    pub from_seq: i64,
    pub until_seq: Option<i64>,
}

/// What fan-out does for one (destination, event) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// An outbound row now.
    Send,
    /// No row: the destination's deferral in the room covers the event (its drain writes
    /// the row, in order).
    Skip,
    /// No row, and a deferral starting just before the event (an open one that starts
    /// later is moved there: `outbound::input_ctes` keeps the lower start).
    Defer,
}

/// The fan-out rule for one (destination, event) pair: an event that is not
/// `deferrable` (`outbound::deferrable`) always gets a row; one that a deferral of the
/// room covers (open, and the event after its cursor) gets none; otherwise a destination
/// that cannot be reached ([`Reach::unreachable`]) gets a deferral — its open deferral
/// moved to start before the event, when the event is an earlier one fanned out after a
/// later one started it (fan-outs run concurrently) — and any other a row —
/// but a destination new to us (`reach` is `None`) gets a row for its first event of the
/// batch only (its probe: `probed` is false) and a deferral for the others, so a batch to
/// a room of a thousand new servers, most of them dead, is not a thousand rows per
/// event. A deferral of a destination that answers ends once it is caught up.
pub fn fan_out(
    deferrable: bool,
    seq: i64,
    reach: Option<Reach>,
    open: Option<Open>,
    probed: bool,
) -> How {
    if !deferrable {
        return How::Send;
    }
    match (open, reach) {
        (Some(o), _) if o.until_seq.is_none() && seq > o.from_seq => How::Skip,
        // An earlier event fanned out late (fan-outs run concurrently and finish out of
        // order): a destination that cannot be reached gets no row for it either, the
        // deferral starts lower instead (`outbound::input_ctes` keeps the lower start).
        (Some(o), Some(r)) if o.until_seq.is_none() && r.unreachable => How::Defer,
        (Some(_), _) => How::Send,
        (None, Some(r)) if r.unreachable => How::Defer,
        (None, Some(_)) => How::Send,
        (None, None) if probed => How::Defer,
        (None, None) => How::Send,
    }
}

/// Where an event after a deferral's cursor stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Accepted and fanned out: the destination gets a row if it receives the event.
    Relayed,
    /// Rejected: nobody gets it.
    Rejected,
    /// Not yet verified, or accepted and not yet fanned out.
    Unsettled,
    /// Held (its origin or relayer quarantined): passed over at once. If it is released,
    /// its fan-out never defers it (`outbound::deferrable`), so its rows come from there;
    /// a peer whose events keep being held cannot stall the room behind them.
    Held,
}

/// One event of the room after the cursor, as [`plan`] needs it.
#[derive(Clone, Debug)]
pub struct Owed<'a> {
    /// Storage order (`federation_events.seq`).
    pub seq: i64,
    pub standing: Standing,
    pub received_at: DateTime<Utc>,
    /// The event's origin server: it is never sent its own events.
    pub origin: &'a str,
    /// The server that handed it to us: it is not sent it back.
    pub received_from: Option<&'a str>,
}

/// What the drain writes for one deferral.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Indices (into the events given) of the events that get a row, in order.
    pub rows: Vec<usize>,
    /// The new cursor: the last event decided (written, passed over, or not for the
    /// destination); unchanged when the first event stops it.
    pub cursor: i64,
    /// The deferral is finished and goes: the destination left the room and the cursor
    /// reached the event it left at (or nothing more is owed).
    pub done: bool,
    /// Every event after the old cursor was read and decided: the cursor is at the
    /// room's last event. A reachable destination's deferral may then end (its later
    /// events get rows again: `store::deferrals::advance`).
    pub caught_up: bool,
}

/// The deferral as stored, with the destination's membership now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deferral {
    pub cursor: i64,
    /// Set when the destination left the room: the last event owed.
    pub until: Option<i64>,
    /// Whether the destination is joined to the room now.
    pub joined: bool,
}

/// Plans a deferral's next step over `events`, the room's events after `d.cursor` in
/// storage order (at most up to `d.until`), `complete` when they are all there are (the
/// read was not cut at its limit). `dependency_wait` is the policy's
/// (`Policy::dependency_wait`); see the module doc for the rules.
pub fn plan(
    dest: &str,
    d: Deferral,
    events: &[Owed<'_>],
    complete: bool,
    now: DateTime<Utc>,
    dependency_wait: Duration,
) -> Plan {
    // Not in the room and never marked as having left (its membership changed by a path
    // that keeps no end): nothing more is sent for the room.
    if !d.joined && d.until.is_none() {
        return Plan {
            rows: Vec::new(),
            cursor: d.cursor,
            done: true,
            caught_up: true,
        };
    }
    let pass_before = pass_before(now, dependency_wait);
    let mut rows = Vec::new();
    let mut cursor = d.cursor;
    let mut stopped = false;
    for (i, e) in events.iter().enumerate() {
        if d.until.is_some_and(|u| e.seq > u) {
            break;
        }
        match e.standing {
            Standing::Unsettled if e.received_at > pass_before => {
                stopped = true;
                break;
            }
            Standing::Unsettled | Standing::Rejected | Standing::Held => {}
            Standing::Relayed => {
                if receives(dest, e) {
                    rows.push(i);
                }
            }
        }
        cursor = e.seq;
    }
    let done = match d.until {
        Some(u) => !stopped && (cursor >= u || complete),
        None => false,
    };
    Plan {
        rows,
        cursor,
        done,
        caught_up: !stopped && complete,
    }
}

/// Unsettled events stored before this are passed over (twice `dependency_wait` before
/// `now`: see the module doc). The scheduler and the drain ask the same of the database
/// (`store::deferrals::has_work`).
pub fn pass_before(now: DateTime<Utc>, dependency_wait: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(dependency_wait * 2)
        .map(|w| now - w)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Whether `dest`, a server of the room, is sent `e`: not its own event, nor one it
/// handed to us (the same exclusions fan-out makes: `jobs/src/fanout.rs` `targets`).
pub fn receives(dest: &str, e: &Owed<'_>) -> bool {
    !e.origin.eq_ignore_ascii_case(dest)
        && !e
            .received_from
            .is_some_and(|f| f.eq_ignore_ascii_case(dest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(300);

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn ev(seq: i64, standing: Standing, age_s: i64, origin: &'static str) -> Owed<'static> {
        Owed {
            seq,
            standing,
            received_at: now() - chrono::Duration::seconds(age_s),
            origin,
            received_from: Some(origin),
        }
    }

    fn joined(cursor: i64) -> Deferral {
        Deferral {
            cursor,
            until: None,
            joined: true,
        }
    }

    #[test]
    fn fan_out_sends_skips_or_defers() {
        let up = Some(Reach { unreachable: false });
        let down = Some(Reach { unreachable: true });
        let open = Some(Open {
            from_seq: 10,
            until_seq: None,
        });
        let closed = Some(Open {
            from_seq: 10,
            until_seq: Some(20),
        });
        let table = [
            // (deferrable, seq, reach, open, probed, expected)
            (false, 11, down, open, false, How::Send),
            (false, 11, None, None, true, How::Send),
            (true, 11, up, None, false, How::Send),
            (true, 11, up, None, true, How::Send),
            (true, 11, None, None, false, How::Send),
            (true, 11, None, None, true, How::Defer),
            (true, 11, down, None, false, How::Defer),
            (true, 11, up, open, false, How::Skip),
            (true, 11, down, open, false, How::Skip),
            // Fanned out after a later event started the deferral.
            (true, 10, down, open, false, How::Defer),
            (true, 3, down, open, false, How::Defer),
            (true, 10, up, open, false, How::Send),
            (true, 10, None, open, false, How::Send),
            (true, 10, down, closed, false, How::Send),
            (true, 11, down, closed, false, How::Send),
        ];
        for (deferrable, seq, reach, o, probed, want) in table {
            assert_eq!(
                fan_out(deferrable, seq, reach, o, probed),
                want,
                "{deferrable} {seq} {reach:?} {o:?} {probed}"
            );
        }
    }

    #[test]
    fn relayed_events_get_rows_in_order_and_the_cursor_follows() {
        let events = [
            ev(11, Standing::Relayed, 5, "a.test"),
            ev(12, Standing::Rejected, 5, "a.test"),
            ev(14, Standing::Relayed, 5, "a.test"),
        ];
        let p = plan("dead.test", joined(10), &events, true, now(), WAIT);
        assert_eq!(p.rows, vec![0, 2]);
        assert_eq!(p.cursor, 14);
        assert!(
            !p.done,
            "an open deferral is not finished while the server is in the room"
        );
        assert!(p.caught_up, "every event after the cursor was decided");
        let p = plan("dead.test", joined(10), &events, false, now(), WAIT);
        assert!(!p.caught_up, "more events than were read");
    }

    #[test]
    fn a_young_unsettled_event_stops_the_cursor_before_it() {
        let events = [
            ev(11, Standing::Relayed, 5, "a.test"),
            ev(12, Standing::Unsettled, 5, "a.test"),
            ev(13, Standing::Relayed, 5, "a.test"),
        ];
        let p = plan("dead.test", joined(10), &events, true, now(), WAIT);
        assert!(!p.caught_up, "stopped before an unsettled event");
        assert_eq!((p.rows, p.cursor), (vec![0], 11));
        let first = plan("dead.test", joined(11), &events[1..], true, now(), WAIT);
        assert_eq!(
            (first.rows, first.cursor),
            (vec![], 11),
            "no progress past it"
        );
    }

    #[test]
    fn an_unsettled_event_older_than_twice_the_wait_is_passed_over() {
        // 601 s > 2 × 300 s: its own fan-out writes its row (it is not deferrable).
        let events = [
            ev(11, Standing::Unsettled, 601, "a.test"),
            ev(12, Standing::Relayed, 5, "a.test"),
        ];
        let p = plan("dead.test", joined(10), &events, true, now(), WAIT);
        assert_eq!((p.rows, p.cursor), (vec![1], 12));
        // Between one and two waits old it still stops the cursor.
        let events = [ev(11, Standing::Unsettled, 400, "a.test")];
        let p = plan("dead.test", joined(10), &events, true, now(), WAIT);
        assert_eq!((p.rows, p.cursor), (vec![], 10));
    }

    #[test]
    fn a_held_event_is_passed_over_at_once() {
        // Released later, it is never deferred: its own fan-out writes its rows.
        let events = [
            ev(11, Standing::Held, 1, "q.test"),
            ev(12, Standing::Relayed, 1, "a.test"),
        ];
        let p = plan("dead.test", joined(10), &events, true, now(), WAIT);
        assert_eq!((p.rows, p.cursor, p.caught_up), (vec![1], 12, true));
    }

    #[test]
    fn the_destination_is_not_sent_its_own_events_or_what_it_handed_us() {
        let mut relayed = ev(12, Standing::Relayed, 5, "a.test");
        relayed.received_from = Some("DEAD.test");
        let events = [ev(11, Standing::Relayed, 5, "dead.test"), relayed];
        let p = plan("dead.test", joined(10), &events, true, now(), WAIT);
        assert_eq!((p.rows, p.cursor), (vec![], 12));
    }

    #[test]
    fn a_server_that_left_is_caught_up_to_where_it_left_then_the_deferral_goes() {
        let left = Deferral {
            cursor: 10,
            until: Some(12),
            joined: false,
        };
        let events = [
            ev(11, Standing::Relayed, 5, "a.test"),
            ev(12, Standing::Relayed, 5, "a.test"),
            ev(13, Standing::Relayed, 5, "a.test"),
        ];
        let p = plan("dead.test", left, &events, false, now(), WAIT);
        assert_eq!((p.rows, p.cursor, p.done), (vec![0, 1], 12, true));
        // Cut short by an unsettled event: not done yet.
        let events = [
            ev(11, Standing::Relayed, 5, "a.test"),
            ev(12, Standing::Unsettled, 5, "a.test"),
        ];
        let p = plan("dead.test", left, &events, true, now(), WAIT);
        assert_eq!((p.rows, p.cursor, p.done), (vec![0], 11, false));
        // Everything up to `until` read and decided, even if `until` itself is gone.
        let p = plan("dead.test", left, &events[..1], true, now(), WAIT);
        assert_eq!((p.cursor, p.done), (11, true));
        // More to read: not done.
        let p = plan("dead.test", left, &events[..1], false, now(), WAIT);
        assert!(!p.done);
    }

    #[test]
    fn a_server_out_of_the_room_without_an_end_gets_nothing_more() {
        let out = Deferral {
            cursor: 10,
            until: None,
            joined: false,
        };
        let events = [ev(11, Standing::Relayed, 5, "a.test")];
        let p = plan("dead.test", out, &events, true, now(), WAIT);
        assert_eq!((p.rows, p.cursor, p.done), (vec![], 10, true));
    }
}
