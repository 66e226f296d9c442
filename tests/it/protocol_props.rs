//! Property tests of the protocol core: the wire body is a fixed point of
//! parse → serialise, sign → verify round-trips, and any change to a signed envelope
//! fails verification.

use parafed::protocol::envelope::{Envelope, SignatureError, Signatures, StateKey};
use parafed::protocol::transport::TransportHeaders;
use parafed::protocol::{EventId, EventType, KeyId, Keypair, RoomId, ServerName, UserId};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<u64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
        "[\\x00-\\x1f\"\\\\/\u{7f}\u{2028}é😀a-z]{0,12}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

prop_compose! {
    fn envelope()(
        local in "[a-zA-Z0-9_:👍]{1,24}",
        guild in "[0-9]{1,18}",
        user in "[a-z0-9_]{1,12}",
        host in "[a-z]{1,10}\\.test",
        event_type in "m\\.[a-z.]{1,16}",
        ts in any::<i64>(),
        depth in any::<i64>(),
        state_key in prop::option::of("[@a-z:.]{0,12}"),
        content in json_value(),
    ) -> Envelope {
        Envelope {
            event_id: EventId::parse(&format!("${local}:{host}")).unwrap(),
            room_id: RoomId::parse(&format!("!{guild}:{host}")).unwrap(),
            event_type: EventType::parse(&event_type).unwrap(),
            sender: UserId::parse(&format!("@{user}:{host}")).unwrap(),
            origin_server: ServerName::parse(&host).unwrap(),
            origin_ts: ts,
            content,
            depth,
            state_key: state_key.map(|s| StateKey::parse(&s).unwrap()),
            signatures: Signatures::default(),
        }
    }
}

fn key() -> Keypair {
    Keypair::from_seed(KeyId::parse("ed25519:prop").unwrap(), [42; 32])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn wire_body_is_a_fixed_point(mut env in envelope()) {
        env.sign(&key());
        let wire = env.to_wire();
        let parsed = Envelope::from_wire(&wire).unwrap();
        prop_assert_eq!(parsed.to_wire(), wire.clone());
        // And once more from the re-serialisation (what a relay would send on).
        let again = Envelope::from_wire(&parsed.to_wire()).unwrap();
        prop_assert_eq!(again.to_wire(), wire);
    }

    #[test]
    fn sign_then_verify(mut env in envelope()) {
        let k = key();
        env.sign(&k);
        let parsed = Envelope::from_wire(&env.to_wire()).unwrap();
        prop_assert_eq!(parsed.verify(|_| Some(k.public_key())), Ok(k.key_id().clone()));
        let other = Keypair::from_seed(KeyId::parse("ed25519:prop").unwrap(), [43; 32]);
        prop_assert_eq!(parsed.verify(|_| Some(other.public_key())), Err(SignatureError::Invalid));
    }

    #[test]
    fn any_field_change_breaks_the_signature(mut env in envelope(), which in 0usize..8, extra in json_leaf()) {
        let k = key();
        env.sign(&k);
        let mut m = env.clone();
        match which {
            0 => m.origin_ts = m.origin_ts.wrapping_add(1),
            1 => m.depth = m.depth.wrapping_sub(1),
            2 => m.event_id = EventId::parse(&format!("{}x", m.event_id.as_str().rsplit_once(':').unwrap().0.to_owned() + ":a.test")).unwrap(),
            3 => m.room_id = RoomId::parse("!0:other.test").unwrap(),
            4 => m.sender = UserId::parse(&format!("{}x", m.sender)).unwrap(),
            5 => m.event_type = EventType::parse(&format!("{}x", m.event_type)).unwrap(),
            6 => m.state_key = match m.state_key { None => Some(StateKey::parse("").unwrap()), Some(_) => None },
            _ => m.content = Value::Array(vec![m.content.clone(), extra]),
        }
        prop_assert_ne!(m.signing_bytes(), env.signing_bytes());
        prop_assert_eq!(m.verify(|_| Some(k.public_key())), Err(SignatureError::Invalid));
    }

    #[test]
    fn any_wire_byte_change_is_caught(mut env in envelope(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let k = key();
        env.sign(&k);
        let mut wire = env.to_wire();
        let i = pos.index(wire.len());
        wire[i] ^= 1 << bit;
        // Either the body no longer parses, or it says the same thing (a re-spelling),
        // or verification fails.
        if let Ok(m) = Envelope::from_wire(&wire) {
            if m.signing_bytes() != env.signing_bytes() {
                prop_assert!(m.verify(|_| Some(k.public_key())).is_err());
            }
        }
    }

    #[test]
    fn transport_sign_then_verify(path in "/[a-zA-Z0-9/$:%?=&!._-]{0,40}", ts in any::<i64>(), body in prop::collection::vec(any::<u8>(), 0..256), flip in any::<prop::sample::Index>()) {
        let k = key();
        let origin = ServerName::parse("a.test").unwrap();
        let h = TransportHeaders::sign(&k, &origin, "POST", &path, ts, &body);
        let [o, kid, t, s] = h.to_header_pairs();
        let parsed = TransportHeaders::parse(Some(&o.1), Some(&kid.1), Some(&t.1), Some(&s.1)).unwrap();
        prop_assert!(parsed.verify(&k.public_key(), "POST", &path, &body).is_ok());
        if !body.is_empty() {
            let mut b = body.clone();
            let j = flip.index(b.len());
            b[j] ^= 0x80;
            prop_assert!(parsed.verify(&k.public_key(), "POST", &path, &b).is_err());
        }
        prop_assert!(parsed.verify(&k.public_key(), "PUT", &path, &body).is_err());
    }
}
