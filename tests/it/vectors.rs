//! Byte-exact compatibility with Paracord v0.8.5, checked against the vectors in
//! `tests/vectors/` (copied from the interop capture; see its README).
//!
//! Each check compares parafed's output with bytes Paracord produced: envelope signing
//! bytes, envelope signatures, wire bodies, transport signing strings and signatures, and
//! events Paracord signed itself. Each test asserts how many vectors it checked, so a
//! vector file that silently shrank would fail too.

use parafed::protocol::envelope::{custom_event_id, Envelope, SignatureError};
use parafed::protocol::transport::{
    body_sha256_hex, signing_string, TransportHeaders, EMPTY_BODY_SHA256,
};
use parafed::protocol::{EventType, KeyId, Keypair, PublicKey, ServerName};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn load(name: &str) -> Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("field {k} missing in {v}"))
}

fn keypair(key: &Value) -> Keypair {
    Keypair::from_seed_hex(KeyId::parse(s(key, "key_id")).unwrap(), s(key, "seed_hex")).unwrap()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[test]
fn canonical_envelopes_are_byte_exact() {
    let doc = load("canonical.json");
    let key = keypair(&doc["key"]);
    assert_eq!(key.public_key_hex(), s(&doc["key"], "public_key_hex"));
    let mut checked = 0;
    for v in doc["vectors"].as_array().unwrap() {
        let name = s(v, "name");
        let canonical = s(v, "canonical_signing_bytes");
        let wire = s(v, "wire_body");

        // The wire body parses, re-serialises to itself, and carries the vector's map.
        let env = Envelope::from_wire(wire.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            String::from_utf8(env.to_wire()).unwrap(),
            wire,
            "{name}: wire body"
        );
        assert_eq!(
            sha256_hex(wire.as_bytes()),
            s(v, "wire_body_sha256"),
            "{name}"
        );
        assert_eq!(
            serde_json::to_value(&env.signatures).unwrap(),
            v["signatures"],
            "{name}: signatures map"
        );

        // Signing bytes, their length and hash.
        let bytes = env.signing_bytes();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            canonical,
            "{name}: signing bytes"
        );
        assert_eq!(
            bytes.len() as u64,
            v["canonical_signing_bytes_len"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            sha256_hex(&bytes),
            s(v, "canonical_signing_bytes_sha256"),
            "{name}"
        );

        // Deterministic ed25519: our signature is Paracord's, and it verifies.
        assert_eq!(
            key.sign_hex(&bytes),
            s(v, "signature_hex"),
            "{name}: signature"
        );
        assert_eq!(
            env.verify(|_| Some(key.public_key())).unwrap(),
            *key.key_id(),
            "{name}"
        );

        // The same envelope built from the unsigned form, and from the raw input text.
        let mut unsigned = v["envelope_unsigned"].clone();
        unsigned["signatures"] = serde_json::json!({});
        let mut from_unsigned: Envelope = serde_json::from_value(unsigned).unwrap();
        assert_eq!(
            from_unsigned.signing_bytes(),
            bytes,
            "{name}: from envelope_unsigned"
        );
        from_unsigned.sign(&key);
        assert_eq!(
            from_unsigned.to_wire(),
            wire.as_bytes(),
            "{name}: signing yields the wire body"
        );
        if let Some(input) = v.get("input_json").and_then(Value::as_str) {
            let from_input = Envelope::from_wire(input.as_bytes()).unwrap();
            assert_eq!(from_input.signing_bytes(), bytes, "{name}: from input_json");
        }
        checked += 1;
    }
    assert_eq!(checked, 14, "every canonical vector checked");
}

#[test]
fn custom_event_ids_match_paracord_builder() {
    let doc = load("canonical.json");
    let v = doc["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| s(v, "name") == "builder_custom_hash_id_with_state_key")
        .unwrap();
    let env = Envelope::from_wire(s(v, "wire_body").as_bytes()).unwrap();
    let id = custom_event_id(
        &EventType::parse("m.custom.thing").unwrap(),
        None,
        &env.content,
        env.origin_ts,
        "peer.test",
    )
    .unwrap();
    assert_eq!(id, env.event_id);
}

#[test]
fn verify_cases_are_at_least_as_strict_as_paracord() {
    let doc = load("canonical.json");
    let pk = PublicKey::from_hex(s(&doc["key"], "public_key_hex")).unwrap();
    let mut checked = 0;
    for c in doc["verify_cases"].as_array().unwrap() {
        let name = s(c, "name");
        let sig = s(c, "signature");
        let ok = parafed::protocol::hex::decode_exact::<64>(sig)
            .map(|b| pk.verify(s(c, "payload").as_bytes(), &b))
            .unwrap_or(false);
        let paracord_ok = c["paracord_signing_verify_ok"].as_bool().unwrap();
        // Stricter (PROTOCOL.md): one spelling per signature, so upper-case hex and "+X"
        // pairs, which Paracord's from_str_radix accepts, are refused.
        let expected = match name {
            "uppercase_hex" | "plus_sign_hex_pair" => false,
            _ => paracord_ok,
        };
        assert_eq!(ok, expected, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 6);
}

#[test]
fn transport_signatures_are_byte_exact() {
    let doc = load("requests.json");
    let key = keypair(&doc["key"]);
    assert_eq!(s(&doc, "empty_body_sha256"), EMPTY_BODY_SHA256);
    let origin = ServerName::parse(s(&doc["key"], "server_name")).unwrap();
    let mut checked = 0;
    for r in doc["requests"].as_array().unwrap() {
        let name = s(r, "name");
        let method = s(r, "method");
        let path = s(r, "path");
        let body = r["body"].as_str().unwrap_or("").as_bytes();
        let ts = r["timestamp_ms"].as_i64().unwrap();
        assert_eq!(
            body_sha256_hex(body),
            s(r, "body_sha256"),
            "{name}: body hash"
        );
        assert_eq!(
            signing_string(method, path, ts, body),
            s(r, "signing_string"),
            "{name}"
        );

        let signed = TransportHeaders::sign(&key, &origin, method, path, ts, body);
        assert_eq!(
            hex::encode(signed.signature),
            s(r, "signature_hex"),
            "{name}: signature"
        );
        for (h, value) in signed.to_header_pairs() {
            assert_eq!(value, s(&r["headers"], h), "{name}: header {h}");
        }

        // Paracord's headers parse and verify against the bytes as sent.
        let hdr = |h: &str| r["headers"][h].as_str();
        let parsed = TransportHeaders::parse(
            hdr("X-Paracord-Origin"),
            hdr("X-Paracord-Key-Id"),
            hdr("X-Paracord-Timestamp"),
            hdr("X-Paracord-Signature"),
        )
        .unwrap();
        parsed
            .verify(&key.public_key(), method, path, body)
            .unwrap();
        assert!(
            parsed
                .verify(&key.public_key(), method, &format!("{path}/"), body)
                .is_err(),
            "{name}: another path must fail"
        );
        if method == "POST" {
            // POST bodies are wire envelopes or invite/join/leave bodies: all JSON.
            serde_json::from_slice::<Value>(body).unwrap();
        }
        checked += 1;
    }
    assert_eq!(checked, 11, "every transport vector checked");
}

#[test]
fn paracord_signed_events_verify_and_break_on_any_content_change() {
    let doc = load("paracord-signed-events.json");
    let pk = PublicKey::from_hex(s(&doc["paracord_key"], "public_key_hex")).unwrap();
    let kid = KeyId::parse(s(&doc["paracord_key"], "key_id")).unwrap();
    let lookup = |k: &KeyId| (*k == kid).then_some(pk);
    let mut events = 0;
    let mut mutants = 0;
    for e in doc["events"].as_array().unwrap() {
        let env: Envelope = serde_json::from_value(e["envelope"].clone()).unwrap();
        assert_eq!(
            String::from_utf8(env.signing_bytes()).unwrap(),
            s(e, "canonical_signing_bytes")
        );
        assert_eq!(env.verify(lookup), Ok(kid.clone()), "{}", env.event_id);
        assert_eq!(
            String::from_utf8(env.to_wire()).unwrap(),
            s(e, "struct_order_wire_body")
        );

        // Flip one bit in every byte of the serialised content, one byte at a time. A
        // mutant that still parses and denotes different content must fail verification.
        let content = serde_json::to_vec(&env.content).unwrap();
        for i in 0..content.len() {
            for bit in [0x01u8, 0x20] {
                let mut m = content.clone();
                m[i] ^= bit;
                let Ok(mutated) = serde_json::from_slice::<Value>(&m) else {
                    continue;
                };
                let mut env2 = env.clone();
                env2.content = mutated;
                if env2.signing_bytes() == env.signing_bytes() {
                    continue; // same content in another spelling: not a change
                }
                assert_eq!(
                    env2.verify(lookup),
                    Err(SignatureError::Invalid),
                    "{}: byte {i} ^ {bit:#x} verified",
                    env.event_id
                );
                mutants += 1;
            }
        }
        events += 1;
    }
    assert_eq!(events, 6, "every Paracord-signed event checked");
    assert!(
        mutants > 1000,
        "only {mutants} content mutants were checked"
    );
}
