//! Micro-benchmarks of the per-event hot paths (`cargo bench --bench hot_paths`):
//! transport signature verification, the canonical signing bytes of an envelope, its
//! wire body, signing an envelope, and the ingress's multi-row insert of a batch into a
//! throwaway Postgres. The whole-system figures come from `parafed-bench`
//! (docs/performance.md); these say what one step costs on its own.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use parafed::protocol::envelope::Signatures;
use parafed::protocol::{
    Envelope, EventId, EventType, KeyId, Keypair, RoomId, ServerName, TransportHeaders, UserId,
};
use serde_json::json;

fn envelope(n: u64, key: &Keypair) -> Envelope {
    let mut e = Envelope {
        event_id: EventId::parse(&format!("$hot{n}:source.test")).expect("event id"),
        room_id: RoomId::parse("!room:alpha.test").expect("room id"),
        event_type: EventType::parse("m.message").expect("type"),
        sender: UserId::parse("@s:source.test").expect("user"),
        origin_server: ServerName::parse("source.test").expect("server"),
        origin_ts: 1_764_000_000_000,
        content: json!({"body": format!("message number {n} with some text"), "message_id": format!("m{n}")}),
        depth: n as i64,
        state_key: None,
        signatures: Signatures::default(),
    };
    e.sign(key);
    e
}

fn protocol(c: &mut Criterion) {
    let key = Keypair::generate(KeyId::parse("ed25519:bench").expect("key id"));
    let origin = ServerName::parse("source.test").expect("server");
    let env = envelope(1, &key);
    let body = env.to_wire();
    let path = "/_paracord/federation/v1/event";
    let headers = TransportHeaders::sign(&key, &origin, "POST", path, 1_764_000_000_000, &body);
    let public = key.public_key();

    c.bench_function("transport verify (POST /event)", |b| {
        b.iter(|| {
            headers
                .verify(&public, "POST", path, black_box(&body))
                .expect("valid")
        })
    });
    c.bench_function("transport sign (POST /event)", |b| {
        b.iter(|| TransportHeaders::sign(&key, &origin, "POST", path, 1, black_box(&body)))
    });
    c.bench_function("envelope signing bytes (canonical JSON)", |b| {
        b.iter(|| black_box(&env).signing_bytes())
    });
    c.bench_function("envelope wire body", |b| {
        b.iter(|| black_box(&env).to_wire())
    });
    c.bench_function("envelope sign", |b| {
        b.iter_batched(
            || env.clone(),
            |mut e| {
                e.sign(&key);
                e
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("envelope verify", |b| {
        b.iter(|| black_box(&env).verify(|_| Some(public)).expect("valid"))
    });
    c.bench_function("envelope from wire (parse + limits)", |b| {
        b.iter(|| Envelope::from_wire(black_box(&body)).expect("parses"))
    });
}

/// The ingress's group commit: one multi-row insert of 256 new events.
fn insert_batch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (pg, pool) = rt.block_on(async {
        let pg = parafed::devservers::Postgres::start()
            .await
            .expect("a throwaway Postgres (see .ci/setup)");
        let url = pg.create_db("hot").await.expect("database");
        parafed::store::migrate::run_pending(&url)
            .await
            .expect("migrations");
        let pool = parafed::store::pool(&url, 2).expect("pool");
        (pg, pool)
    });
    let key = Keypair::generate(KeyId::parse("ed25519:bench").expect("key id"));
    let from = ServerName::parse("source.test").expect("server");
    const BATCH: u64 = 256;
    let mut next = 0u64;
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(20);
    group.bench_function("insert a batch of 256 events", |b| {
        b.iter_batched(
            || {
                let envs: Vec<Envelope> = (next..next + BATCH).map(|n| envelope(n, &key)).collect();
                next += BATCH;
                envs
            },
            |envs| {
                rt.block_on(async {
                    let rows: Vec<parafed::store::events::NewEvent> = envs
                        .iter()
                        .map(|e| parafed::store::events::NewEvent {
                            envelope: e,
                            received_from: Some(&from),
                            status: parafed::store::events::EventStatus::Pending,
                            signature_checked: true,
                        })
                        .collect();
                    let mut conn = pool.get().await.expect("connection");
                    parafed::store::events::insert(&mut conn, &rows)
                        .await
                        .expect("insert")
                })
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
    drop(pool);
    drop(pg);
}

criterion_group!(benches, protocol, insert_batch);
criterion_main!(benches);
