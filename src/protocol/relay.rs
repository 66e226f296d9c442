//! Who may hand us an event that someone else signed: only the host of its room.
//!
//! PROTOCOL.md / DESIGN.md: rooms are hub and spoke — a server sends its own events for a
//! room to the host, and the host relays every accepted event to the room's other
//! servers. So in a room hosted here, the transport origin must be the envelope's
//! `origin_server` (nobody relays into our own rooms); in a room hosted elsewhere it is
//! the origin, or that room's host. Anything else is refused (403) before storing: a
//! member that could relay "for" another server could store a forged copy under an id
//! that server is about to use (Paracord event ids are predictable) and suppress the real
//! event.

use super::{RoomId, ServerName};

/// Why a transport origin may not hand us an event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelayRefusal {
    #[error(
        "{origin} may only send its own events into {room}, which is hosted here \
         (this event's origin_server is {claimed})"
    )]
    HostedHere {
        origin: String,
        room: String,
        claimed: String,
    },
    #[error(
        "only the host of {room} relays events of other servers; {origin} is not its host \
         (this event's origin_server is {claimed})"
    )]
    NotTheHost {
        origin: String,
        room: String,
        claimed: String,
    },
}

/// Checks that `transport_origin` may hand us an event of `room` signed by
/// `envelope_origin`. `transport_origin_domain` is the domain the transport origin uses
/// in its ids (`None` when unknown: then only its server name is compared with the
/// room's host); `our_domain` is ours.
pub fn check(
    transport_origin: &ServerName,
    transport_origin_domain: Option<&str>,
    envelope_origin: &ServerName,
    room: &RoomId,
    our_domain: &str,
) -> Result<(), RelayRefusal> {
    if transport_origin == envelope_origin {
        return Ok(());
    }
    let host = room.domain();
    if host.eq_ignore_ascii_case(our_domain) {
        return Err(RelayRefusal::HostedHere {
            origin: transport_origin.to_string(),
            room: room.to_string(),
            claimed: envelope_origin.to_string(),
        });
    }
    let is_host = transport_origin.as_str().eq_ignore_ascii_case(host)
        || transport_origin_domain.is_some_and(|d| d.eq_ignore_ascii_case(host));
    if is_host {
        Ok(())
    } else {
        Err(RelayRefusal::NotTheHost {
            origin: transport_origin.to_string(),
            room: room.to_string(),
            claimed: envelope_origin.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: &str) -> ServerName {
        ServerName::parse(n).unwrap()
    }

    #[test]
    fn only_the_host_relays() {
        // (transport origin, its domain, envelope origin, room, ours, allowed)
        let table = [
            (
                "peer.test",
                None,
                "peer.test",
                "!1:alpha.test",
                "alpha.test",
                true,
            ),
            (
                "peer.test",
                None,
                "relay.test",
                "!1:alpha.test",
                "alpha.test",
                false,
            ),
            (
                "host.test",
                None,
                "relay.test",
                "!1:host.test",
                "alpha.test",
                true,
            ),
            (
                "host.test",
                Some("chat.host.test"),
                "relay.test",
                "!1:chat.host.test",
                "alpha.test",
                true,
            ),
            (
                "peer.test",
                None,
                "relay.test",
                "!1:host.test",
                "alpha.test",
                false,
            ),
            (
                "peer.test",
                Some("peer.test"),
                "relay.test",
                "!1:host.test",
                "alpha.test",
                false,
            ),
            (
                "relay.test",
                None,
                "relay.test",
                "!1:host.test",
                "alpha.test",
                true,
            ),
        ];
        for (t, d, o, room, ours, allowed) in table {
            let r = check(&s(t), d, &s(o), &RoomId::parse(room).unwrap(), ours);
            assert_eq!(
                r.is_ok(),
                allowed,
                "{t} relaying {o}'s event in {room}: {r:?}"
            );
        }
    }
}
