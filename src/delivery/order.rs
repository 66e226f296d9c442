//! Which waiting events may be sent to a destination now: dependants after what they
//! depend on (PROTOCOL.md "What a sender must treat as what").
//!
//! The rule: no event is sent to a destination before the earlier events it depends on
//! are *settled* there (delivered, dead or cancelled). Within a room:
//!
//! * an edit, delete or reaction (any event whose content names a `message_id`) comes
//!   after every earlier event naming the same `message_id` — the message first, then
//!   its edits, reactions and delete in the order they were stored;
//! * member events (`m.member.join`, `m.member.leave`) come in order;
//! * a member's join (or leave) comes before that member's later events, and a leave
//!   after that member's earlier events (a host applying the leave first would refuse
//!   them).
//!
//! Unrelated events — other messages, other members — may be in flight together, up to
//! the window: one request at a time per room would cap a busy room at one event per
//! round trip. A dead event settles too, so it never blocks its dependants for ever.
//!
//! Each event gets two sets of keys: what it **provides** (later events may wait for
//! it) and what it **waits** for. An event waits while an earlier unsettled event (in
//! storage order, `federation_events.seq`) provides one of its wait keys. Keys are
//! 64-bit hashes of (room, kind, value): constant size whatever a peer puts in
//! `message_id`, and a collision only makes an event wait a little longer.

use sha2::{Digest, Sha256};

/// A hashed ordering key (room, kind, value).
pub type OrderKey = i64;

/// What an event provides and waits for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderKeys {
    pub provides: Vec<OrderKey>,
    pub waits: Vec<OrderKey>,
}

fn key(room: &str, kind: &str, value: &str) -> OrderKey {
    let mut h = Sha256::new();
    for part in [room, kind, value] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

/// The `message_id` an event's content names: a string, or a number's JSON text.
fn message_id(content: &serde_json::Value) -> Option<String> {
    match content.get("message_id")? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The ordering keys of an envelope: [`keys_for`] its room, type, sender and content.
pub fn keys_of(env: &crate::protocol::Envelope) -> OrderKeys {
    keys_for(
        env.room_id.as_str(),
        env.event_type.as_str(),
        env.sender.as_str(),
        &env.content,
    )
}

/// The ordering keys of an event (see the module rules).
pub fn keys_for(
    room_id: &str,
    event_type: &str,
    sender: &str,
    content: &serde_json::Value,
) -> OrderKeys {
    // `member`: the member's join or leave (their later events wait for it);
    // `activity`: any event of the member (their leave waits for all of them).
    let member = key(room_id, "member", sender);
    let activity = key(room_id, "activity", sender);
    match event_type {
        "m.member.join" => {
            let members = key(room_id, "members", "");
            OrderKeys {
                provides: vec![members, member],
                waits: vec![members],
            }
        }
        "m.member.leave" => {
            let members = key(room_id, "members", "");
            OrderKeys {
                provides: vec![members, member],
                waits: vec![members, activity],
            }
        }
        _ => match message_id(content) {
            Some(m) => {
                let msg = key(room_id, "message", &m);
                OrderKeys {
                    provides: vec![msg, activity],
                    waits: vec![msg, member],
                }
            }
            None => OrderKeys {
                provides: vec![activity],
                waits: vec![member],
            },
        },
    }
}

/// An unsettled event for one destination: a waiting row, or an earlier event that may
/// still get a row (stored but not yet verified or fanned out).
#[derive(Clone, Copy, Debug)]
pub struct Unsettled<'a> {
    /// Storage order of the event (`federation_events.seq`).
    pub seq: i64,
    pub keys: &'a OrderKeys,
}

/// Of `candidates` (waiting rows, oldest first by `seq`), the indexes that may be sent
/// now, at most `limit`, in order. Every candidate counts as unsettled for the ones
/// after it (sent now or not), and so does every event in `not_yet_fanned_out`.
///
/// `horizon`: when the list of events not yet fanned out was cut short (it is read with a
/// bound), events after its last one are unknown, so candidates stored after `horizon`
/// wait too.
pub fn sendable(
    candidates: &[Unsettled<'_>],
    not_yet_fanned_out: &[Unsettled<'_>],
    horizon: Option<i64>,
    limit: usize,
) -> Vec<usize> {
    let mut taken = Vec::new();
    let mut provided: std::collections::HashSet<OrderKey> = std::collections::HashSet::new();
    for (i, c) in candidates.iter().enumerate() {
        if taken.len() >= limit {
            break;
        }
        let blocked = horizon.is_some_and(|h| c.seq > h)
            || c.keys.waits.iter().any(|k| provided.contains(k))
            || not_yet_fanned_out
                .iter()
                .any(|p| p.seq < c.seq && p.keys.provides.iter().any(|k| c.keys.waits.contains(k)));
        if !blocked {
            taken.push(i);
        }
        provided.extend(c.keys.provides.iter().copied());
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ROOM: &str = "!1:alpha.test";

    fn ev(t: &str, sender: &str, content: serde_json::Value) -> OrderKeys {
        keys_for(ROOM, t, sender, &content)
    }

    fn msg(id: &str) -> OrderKeys {
        ev(
            "m.message",
            "@a:alpha.test",
            json!({"message_id": id, "body": "hi"}),
        )
    }

    fn plan(events: &[OrderKeys], pending: &[(i64, OrderKeys)], limit: usize) -> Vec<usize> {
        let c: Vec<Unsettled> = events
            .iter()
            .enumerate()
            .map(|(i, k)| Unsettled {
                seq: i as i64 * 10,
                keys: k,
            })
            .collect();
        let p: Vec<Unsettled> = pending
            .iter()
            .map(|(seq, k)| Unsettled { seq: *seq, keys: k })
            .collect();
        sendable(&c, &p, None, limit)
    }

    #[test]
    fn dependants_wait_for_what_they_refer_to() {
        let edit = |id: &str| ev("m.message.edit", "@a:alpha.test", json!({"message_id": id}));
        let react = |id: &str| {
            ev(
                "m.reaction.add",
                "@b:beta.test",
                json!({"message_id": id, "emoji": "+"}),
            )
        };
        let delete = |id: &str| {
            ev(
                "m.message.delete",
                "@a:alpha.test",
                json!({"message_id": id}),
            )
        };
        let join = |u: &str| ev("m.member.join", u, json!({"user_id": "5"}));
        let leave = |u: &str| ev("m.member.leave", u, json!({}));
        let from = |u: &str, id: &str| ev("m.message", u, json!({"message_id": id}));
        // (waiting rows oldest first, window, expected sendable indexes)
        let table: Vec<(Vec<OrderKeys>, usize, Vec<usize>)> = vec![
            // Unrelated messages go together, up to the window.
            (vec![msg("1"), msg("2"), msg("3")], 8, vec![0, 1, 2]),
            (vec![msg("1"), msg("2"), msg("3")], 2, vec![0, 1]),
            // An edit, reaction, delete wait for their message; others pass them.
            (vec![msg("1"), edit("1"), msg("2")], 8, vec![0, 2]),
            (vec![msg("1"), react("1"), delete("1")], 8, vec![0]),
            (vec![edit("1"), react("1"), delete("1")], 8, vec![0]),
            (vec![react("1"), react("2"), edit("1")], 8, vec![0, 1]),
            // Numbers and strings name the same message_id spelling only.
            (
                vec![
                    ev("m.message", "@a:alpha.test", json!({"message_id": 7})),
                    edit("7"),
                ],
                8,
                vec![0],
            ),
            // Member events in order; a member's join before their other events.
            (
                vec![join("@b:beta.test"), join("@c:gamma.test")],
                8,
                vec![0],
            ),
            (
                vec![
                    join("@b:beta.test"),
                    from("@b:beta.test", "9"),
                    from("@c:gamma.test", "8"),
                ],
                8,
                vec![0, 2],
            ),
            (
                vec![from("@b:beta.test", "9"), from("@b:beta.test", "10")],
                8,
                vec![0, 1],
            ),
            (
                vec![join("@b:beta.test"), leave("@b:beta.test")],
                8,
                vec![0],
            ),
            // Events without a message_id wait only for their sender's membership.
            (
                vec![
                    ev("m.room.topic", "@a:alpha.test", json!({"topic": "x"})),
                    ev("m.room.topic", "@a:alpha.test", json!({"topic": "y"})),
                ],
                8,
                vec![0, 1],
            ),
        ];
        for (events, limit, want) in table {
            assert_eq!(plan(&events, &[], limit), want, "{events:?}");
        }
    }

    #[test]
    fn events_not_yet_fanned_out_hold_back_later_dependants_only() {
        let edit = ev(
            "m.message.edit",
            "@a:alpha.test",
            json!({"message_id": "1"}),
        );
        let m1 = msg("1");
        // The message (seq 5) is still being verified; the edit (seq 10) waits for it, an
        // unrelated message does not.
        assert_eq!(
            plan(&[msg("2"), edit.clone()], &[(5, m1.clone())], 8),
            vec![0]
        );
        // An unfanned event stored *after* the edit does not hold it.
        assert_eq!(plan(std::slice::from_ref(&edit), &[(50, m1)], 8), vec![0]);
    }

    #[test]
    fn past_a_cut_list_of_unsettled_events_nothing_is_known() {
        let (a, b, c) = (msg("1"), msg("2"), msg("3"));
        let rows: Vec<Unsettled> = [(10, &a), (20, &b), (30, &c)]
            .into_iter()
            .map(|(seq, keys)| Unsettled { seq, keys })
            .collect();
        assert_eq!(sendable(&rows, &[], Some(20), 8), vec![0, 1]);
        assert_eq!(sendable(&rows, &[], Some(5), 8), Vec::<usize>::new());
    }

    #[test]
    fn keys_are_scoped_to_the_room() {
        let a = keys_for(
            "!1:alpha.test",
            "m.message",
            "@a:alpha.test",
            &json!({"message_id": "1"}),
        );
        let b = keys_for(
            "!2:alpha.test",
            "m.message.edit",
            "@a:alpha.test",
            &json!({"message_id": "1"}),
        );
        assert!(a.provides.iter().all(|k| !b.waits.contains(k)));
        let c: Vec<Unsettled> = [&a, &b]
            .iter()
            .enumerate()
            .map(|(i, k)| Unsettled {
                seq: i as i64,
                keys: k,
            })
            .collect();
        assert_eq!(sendable(&c, &[], None, 8), vec![0, 1]);
    }
}
