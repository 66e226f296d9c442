//! Ten thousand hostile requests: random bytes, and valid signed requests with one thing
//! broken (a body byte, a truncation, a header, the content type, framing), plus bodies
//! that authenticate but are deeply nested, hold huge numbers, invalid UTF-8 or exceed
//! the size limit. parafed must answer none of them with a 5xx, never panic, and store
//! nothing. The generator is seeded, so a failure reproduces.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::app::{raw, request_bytes, FakePeers, KeysAnswer, Options, Peer, TestServer};

const EVENT: &str = "/_paracord/federation/v1/event";
const TOTAL: usize = 10_000;

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn valid_body(p: &Peer, n: usize) -> Vec<u8> {
    use parafed::protocol::envelope::Signatures;
    use parafed::protocol::{Envelope, EventId, EventType, RoomId, UserId};
    let mut e = Envelope {
        event_id: EventId::parse(&format!("$f{n}:peer.test")).unwrap(),
        room_id: RoomId::parse("!7010:peer.test").unwrap(),
        event_type: EventType::parse("m.message").unwrap(),
        sender: UserId::parse("@alice:peer.test").unwrap(),
        origin_server: p.name.clone(),
        origin_ts: 1,
        content: serde_json::json!({"body": "fuzz", "n": n}),
        depth: 1,
        state_key: None,
        signatures: Signatures::default(),
    };
    e.sign(&p.key);
    e.to_wire()
}

fn signed(p: &Peer, body: &[u8], ct: &str) -> Vec<(String, String)> {
    let mut h = p.sign("POST", EVENT, body);
    h.push(("Content-Type".into(), ct.into()));
    h
}

fn random_string(rng: &mut StdRng, max: usize) -> String {
    let n = rng.random_range(0..=max);
    (0..n)
        .map(|_| match rng.random_range(0..4) {
            0 => char::from(rng.random_range(0x20u8..0x7f)),
            1 => ['0', 'a', 'F', '+', '-', ' ', ':', '.', '%'][rng.random_range(0..9)],
            2 => char::from_u32(rng.random_range(0xa0..0x3000)).unwrap_or('x'),
            _ => char::from(rng.random_range(b'a'..=b'z')),
        })
        .collect()
}

/// One hostile request, as raw bytes.
fn hostile(rng: &mut StdRng, p: &Peer, n: usize) -> Vec<u8> {
    let body = valid_body(p, n);
    match rng.random_range(0..14) {
        // Random bytes, not HTTP at all.
        0 => (0..rng.random_range(1..512))
            .map(|_| rng.random())
            .collect(),
        // A random request line and headers.
        1 => format!(
            "{} /{} HTTP/1.1\r\n{}: {}\r\nConnection: close\r\n\r\n",
            ["GET", "POST", "PUT", "BREW", ""][rng.random_range(0..5)],
            random_string(rng, 40),
            random_string(rng, 12),
            random_string(rng, 40)
        )
        .into_bytes(),
        // Flip one body byte.
        2 => {
            let mut b = body.clone();
            let i = rng.random_range(0..b.len());
            b[i] ^= rng.random_range(1..=255u8);
            request_bytes("POST", EVENT, &signed(p, &body, "application/json"), &b)
        }
        // Truncate the body.
        3 => {
            let cut = rng.random_range(0..body.len());
            request_bytes(
                "POST",
                EVENT,
                &signed(p, &body, "application/json"),
                &body[..cut],
            )
        }
        // Replace one transport header with junk.
        4 => {
            let mut h = signed(p, &body, "application/json");
            let i = rng.random_range(0..4);
            let junk = format!("{}x", random_string(rng, 140));
            h[i].1 = junk;
            request_bytes("POST", EVENT, &h, &body)
        }
        // Drop one transport header, or send one twice.
        5 => {
            let mut h = signed(p, &body, "application/json");
            let i = rng.random_range(0..4);
            if rng.random() {
                h.remove(i);
            } else {
                let dup = h[i].clone();
                h.push(dup);
            }
            request_bytes("POST", EVENT, &h, &body)
        }
        // Wrong content type.
        6 => {
            let ct = [
                "text/plain",
                "application/xml",
                "",
                "application/jsonx",
                "multipart/form-data",
            ][rng.random_range(0..5)];
            request_bytes("POST", EVENT, &signed(p, &body, ct), &body)
        }
        // Deep nesting, correctly signed: authenticates, then must fail parsing.
        7 => {
            let depth = rng.random_range(33..50_000);
            let b = format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
            request_bytes("POST", EVENT, &signed(p, &b, "application/json"), &b)
        }
        // Huge numbers in the envelope.
        8 => {
            let s = String::from_utf8(body.clone()).unwrap();
            let b = s
                .replacen(
                    "\"n\":",
                    &format!(
                        "\"n\":1{}e99999,\"m\":",
                        "9".repeat(rng.random_range(1..400))
                    ),
                    1,
                )
                .into_bytes();
            let b = if rng.random() {
                b
            } else {
                s.replacen(
                    "\"origin_ts\":1",
                    "\"origin_ts\":99999999999999999999999",
                    1,
                )
                .into_bytes()
            };
            request_bytes("POST", EVENT, &signed(p, &b, "application/json"), &b)
        }
        // Invalid UTF-8 inside a string.
        9 => {
            let mut b = body.clone();
            let i = body.windows(4).position(|w| w == b"fuzz").unwrap();
            b[i] = 0xff;
            b[i + 1] = 0xfe;
            request_bytes("POST", EVENT, &signed(p, &b, "application/json"), &b)
        }
        // Oversize (rarely: each is 2 MiB).
        10 if rng.random_range(0..20) == 0 => {
            let b = vec![b' '; 2 * 1024 * 1024 + rng.random_range(1..1024)];
            request_bytes("POST", EVENT, &signed(p, &b, "application/json"), &b)
        }
        // Content-Length and Transfer-Encoding together, or a bad Content-Length.
        11 => {
            let mut r = format!("POST {EVENT} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n");
            for (k, v) in p.sign("POST", EVENT, &body) {
                r.push_str(&format!("{k}: {v}\r\n"));
            }
            if rng.random() {
                r.push_str(&format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                    body.len(),
                    body.len()
                ));
                let mut bytes = r.into_bytes();
                bytes.extend_from_slice(&body);
                bytes.extend_from_slice(b"\r\n0\r\n\r\n");
                bytes
            } else {
                r.push_str(&format!(
                    "Content-Length: {}\r\n\r\n",
                    ["-1", "abc", "99999999999999999999", "1, 2"][rng.random_range(0..4)]
                ));
                let mut bytes = r.into_bytes();
                bytes.extend_from_slice(&body);
                bytes
            }
        }
        // Signed GETs of random ids and queries.
        12 => {
            let path = if rng.random() {
                format!(
                    "/_paracord/federation/v1/event/{}",
                    random_string(rng, 60).replace([' ', '\r', '\n', '?', '#'], "%20")
                )
            } else {
                format!(
                    "/_paracord/federation/v1/events?room_id={}&since_depth={}&limit={}",
                    random_string(rng, 30).replace([' ', '&', '#', '\r', '\n'], "%26"),
                    random_string(rng, 25).replace([' ', '&', '#', '\r', '\n'], "1"),
                    rng.random::<i64>()
                )
            };
            let h = p.sign("GET", &path, b"");
            request_bytes("GET", &path, &h, b"")
        }
        // Invite/join/leave bodies of random JSON, correctly signed.
        _ => {
            let which = ["invite", "join", "leave"][rng.random_range(0..3)];
            let path = format!("/_paracord/federation/v1/{which}");
            let b = serde_json::json!({
                "origin_server": if rng.random() { "peer.test".to_owned() } else { random_string(rng, 20) },
                "room_id": random_string(rng, 40),
                "user_id": random_string(rng, 40),
                "sender": random_string(rng, 40),
                "max_age_seconds": rng.random::<i64>(),
            }).to_string().into_bytes();
            let mut h = p.sign("POST", &path, &b);
            h.push(("Content-Type".into(), "application/json".into()));
            request_bytes("POST", &path, &h, &b)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_requests() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let p = Peer::new("peer.test", "ed25519:test", [1; 32]);
    let fakes = FakePeers::start(vec![("peer".into(), KeysAnswer::Keys(vec![p.clone()]))]).await;
    let s = TestServer::start(Options {
        peers: vec![("peer.test".into(), fakes.base_url("peer"))],
        extra_toml: "\n[federation]\ndiscovery = false\nrate_limit_per_minute = 0\n".into(),
        ..Options::default()
    })
    .await;
    // A room so that invite/join/leave reach their deepest checks.
    parafed::store::rooms::upsert_hosted(
        &mut *s.db().await,
        &parafed::store::rooms::HostedRoom {
            room_id: "!1:paracord.test".into(),
            guild_id: "1".into(),
            guild_name: "g".into(),
            default_channel_id: None,
        },
    )
    .await
    .unwrap();

    let mut rng = StdRng::seed_from_u64(0x9a4a_fed0);
    let requests: Vec<Vec<u8>> = (0..TOTAL).map(|n| hostile(&mut rng, &p, n)).collect();
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let five_xx = Arc::new(std::sync::Mutex::new(Vec::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (requests, next, five_xx, answered) = (
                requests.clone(),
                next.clone(),
                five_xx.clone(),
                answered.clone(),
            );
            let addr = s.addr;
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= requests.len() {
                        break;
                    }
                    // Some garbage makes the server close without an answer: that is fine.
                    if let Ok(r) = raw(addr, &requests[i]).await {
                        answered.fetch_add(1, Ordering::SeqCst);
                        if r.status >= 500 {
                            five_xx.lock().unwrap().push(format!(
                                "#{i}: {} {}",
                                r.status,
                                String::from_utf8_lossy(&r.body)
                            ));
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let five_xx = five_xx.lock().unwrap().clone();
    assert!(
        five_xx.is_empty(),
        "{} 5xx answers:\n{}",
        five_xx.len(),
        five_xx.join("\n")
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a request made parafed panic"
    );
    assert!(
        answered.load(Ordering::SeqCst) > TOTAL * 8 / 10,
        "most requests were answered"
    );
    assert_eq!(s.event_count().await, 0, "nothing stored");
    // Still serving.
    let wk = support::app::send(s.addr, "GET", "/.well-known/paracord/server", &[], b"").await;
    assert_eq!(wk.status, 200);
}
