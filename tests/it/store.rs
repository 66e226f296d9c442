//! Migrations and schema against a real, empty Postgres database.

use crate::support;

use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use parafed::store::schema::{self, TABLES};

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

async fn names(conn: &mut AsyncPgConnection, sql: &str) -> Vec<String> {
    let rows: Vec<Name> = diesel::sql_query(sql).load(conn).await.unwrap();
    rows.into_iter().map(|r| r.name).collect()
}

/// Every index the migration files leave: `CREATE [UNIQUE] INDEX <name>` less
/// `DROP INDEX <name>` of later migrations.
fn indexes_in_migrations() -> Vec<String> {
    let dir = format!("{}/migrations", env!("CARGO_MANIFEST_DIR"));
    let mut dirs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    let mut out: Vec<String> = Vec::new();
    for d in dirs {
        let up = std::fs::read_to_string(d.join("up.sql")).unwrap();
        for line in up.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["CREATE", "INDEX", name, ..] | ["CREATE", "UNIQUE", "INDEX", name, ..] => {
                    out.push((*name).to_owned())
                }
                ["DROP", "INDEX", name, ..] => {
                    let name = name.trim_end_matches(';');
                    assert!(
                        out.iter().any(|i| i == name),
                        "{name} dropped before it was created"
                    );
                    out.retain(|i| i != name);
                }
                _ => {}
            }
        }
    }
    out
}

#[tokio::test]
async fn migrations_apply_once_and_create_everything() {
    let url = support::pg::fresh_db().await;
    let applied = parafed::store::migrate::run_pending(&url).await.unwrap();
    assert!(
        !applied.is_empty(),
        "an empty database gets every migration"
    );
    let again = parafed::store::migrate::run_pending(&url).await.unwrap();
    assert!(again.is_empty(), "second run is a no-op, applied {again:?}");

    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    let tables = names(
        &mut c,
        "SELECT tablename AS name FROM pg_tables WHERE schemaname = 'public'",
    )
    .await;
    for t in TABLES {
        assert!(
            tables.iter().any(|x| x == t),
            "table {t} missing; have {tables:?}"
        );
    }
    let indexes = names(
        &mut c,
        "SELECT indexname AS name FROM pg_indexes WHERE schemaname = 'public'",
    )
    .await;
    let expected = indexes_in_migrations();
    assert!(
        expected.len() >= 20,
        "found only {} indexes in migrations",
        expected.len()
    );
    for i in &expected {
        assert!(indexes.iter().any(|x| x == i), "index {i} missing");
    }

    check_diesel_columns(&mut c).await;
}

/// Loads zero rows of every table through Diesel's typed schema; a column Diesel knows
/// but the database lacks (or of another type) fails here.
async fn check_diesel_columns(c: &mut AsyncPgConnection) {
    use schema::*;
    macro_rules! probe {
        ($($t:ident),* $(,)?) => {$(
            $t::table
                .select($t::all_columns)
                .limit(0)
                .execute(c)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", stringify!($t)));
        )*};
    }
    probe!(
        federation_events,
        federation_server_keys,
        local_signing_keys,
        peers,
        peer_trust,
        hosted_rooms,
        room_servers,
        room_members,
        outbound_queue,
        delivery_attempts,
        destination_health,
        inbound_feed,
        local_transactions,
    );
}

#[tokio::test]
async fn one_active_key_and_rotation_keeps_the_old() {
    use parafed::store::keys;
    let url = support::pg::migrated_db().await;
    let pool = parafed::store::pool(&url, 2).unwrap();
    let mut c = pool.get().await.unwrap();
    assert!(keys::active(&mut c).await.unwrap().is_none());
    let first = keys::generate(&mut c, None).await.unwrap();
    let err = keys::generate(&mut c, None).await.unwrap_err();
    assert!(err.to_string().contains("rotate"), "{err}");
    let (old, new) = keys::rotate(&mut c, None, chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(old.unwrap().key_id, first.key_id);
    let active = keys::active(&mut c).await.unwrap().unwrap();
    assert_eq!(active.key_id().as_str(), new.key_id);
    let published = keys::published(&mut c, chrono::Utc::now()).await.unwrap();
    assert_eq!(
        published.len(),
        2,
        "retired key still published within retention"
    );
    let later = chrono::Utc::now() + chrono::Duration::hours(2);
    assert_eq!(keys::published(&mut c, later).await.unwrap().len(), 1);
}

#[tokio::test]
async fn prune_deletes_only_history_past_retention() {
    use diesel_async::SimpleAsyncConnection;
    let url = support::pg::migrated_db().await;
    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    c.batch_execute(
        "INSERT INTO federation_events (event_id, room_id, event_type, sender, origin_server, origin_ts, content, depth, signatures) \
           VALUES ('$e:a.test', '!r:a.test', 'm.message', '@u:a.test', 'a.test', 1, '{}', 1, '{}'); \
         INSERT INTO outbound_queue (destination, event_id, status, updated_at) VALUES \
           ('old.test', '$e:a.test', 'delivered', now() - interval '10 days'), \
           ('new.test', '$e:a.test', 'delivered', now()), \
           ('wait.test', '$e:a.test', 'pending', now() - interval '10 days'); \
         INSERT INTO delivery_attempts (destination, request_kind, attempt, latency_ms, attempted_at) VALUES \
           ('x.test', 'event', 1, 1, now() - interval '10 days'), ('x.test', 'event', 1, 1, now());",
    )
    .await
    .unwrap();
    let cutoff = chrono::Utc::now() - chrono::Duration::days(7);
    let (attempts, rows, txns) = parafed::store::retention::prune(&mut c, cutoff)
        .await
        .unwrap();
    assert_eq!((attempts, rows, txns), (1, 1, 0));
    let left = names(
        &mut c,
        "SELECT destination AS name FROM outbound_queue ORDER BY destination",
    )
    .await;
    assert_eq!(
        left,
        ["new.test", "wait.test"],
        "pending rows are never pruned"
    );
}

/// The feed never hands out a position past an entry that commits later: entries of a
/// transaction still open hold back every entry written after it started, and once it
/// commits they all come, in commit-safe order.
#[tokio::test]
async fn feed_pages_never_skip_an_entry_that_commits_late() {
    use diesel_async::SimpleAsyncConnection;
    use parafed::store::feed::{self, Position};
    let url = support::pg::migrated_db().await;
    let mut setup = AsyncPgConnection::establish(&url).await.unwrap();
    setup
        .batch_execute(
            "INSERT INTO federation_events (event_id, room_id, event_type, sender, origin_server, origin_ts, content, depth, signatures, status) VALUES \
               ('$early:a.test', '!r:a.test', 'm.message', '@u:a.test', 'a.test', 1, '{}', 1, '{}', 'accepted'), \
               ('$late:a.test', '!r:a.test', 'm.message', '@u:a.test', 'a.test', 2, '{}', 2, '{}', 'accepted')",
        )
        .await
        .unwrap();
    // `slow` starts first and takes the lower seq, then stays open.
    let mut slow = AsyncPgConnection::establish(&url).await.unwrap();
    slow.batch_execute("BEGIN").await.unwrap();
    feed::append(&mut slow, &[("$early:a.test", "!r:a.test")])
        .await
        .unwrap();
    // `fast` appends after it and commits first.
    let mut fast = AsyncPgConnection::establish(&url).await.unwrap();
    fast.transaction::<_, parafed::store::StoreError, _>(async |c| {
        feed::append(c, &[("$late:a.test", "!r:a.test")]).await
    })
    .await
    .unwrap();
    let mut reader = AsyncPgConnection::establish(&url).await.unwrap();
    let ids = |page: Vec<(Position, parafed::store::events::StoredEvent)>| {
        page.into_iter()
            .map(|(_, e)| e.envelope.event_id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(feed::page(&mut reader, Position::START, 100).await.unwrap()),
        Vec::<String>::new(),
        "the committed later entry waits for the open transaction"
    );
    slow.batch_execute("COMMIT").await.unwrap();
    // Other tests share this Postgres cluster; their open transactions can hold the feed
    // back for a moment too, so wait for both entries rather than expect them at once.
    let got = support::wait_for(
        "both entries",
        std::time::Duration::from_secs(20),
        || async {
            let page = feed::page(
                &mut AsyncPgConnection::establish(&url).await.unwrap(),
                Position::START,
                100,
            )
            .await
            .unwrap();
            (page.len() == 2).then_some(page)
        },
    )
    .await;
    let next = got[1].0;
    assert_eq!(ids(got), ["$early:a.test", "$late:a.test"]);
    assert!(feed::page(&mut reader, next, 100).await.unwrap().is_empty());
    assert_eq!(Position::parse(&next.to_string()), Some(next));
}

/// Two group commits that share event ids lock them in one order, so they queue behind
/// each other instead of deadlocking. `first` holds `$a` in an open transaction; a batch
/// listing `$b` before `$a` must wait for `$a` without taking `$b` first — else `first`,
/// inserting `$b` next, would wait on it and Postgres would fail one of the two.
#[tokio::test]
async fn batches_sharing_event_ids_queue_instead_of_deadlocking() {
    use diesel_async::SimpleAsyncConnection;
    use parafed::protocol::{Envelope, EventId, EventType, RoomId, ServerName, Signatures, UserId};
    use parafed::store::events::{self, EventStatus, NewEvent};
    let url = support::pg::migrated_db().await;
    let origin = ServerName::parse("a.test").unwrap();
    let env = |id: &str| Envelope {
        event_id: EventId::parse(id).unwrap(),
        room_id: RoomId::parse("!r:a.test").unwrap(),
        event_type: EventType::parse("m.message").unwrap(),
        sender: UserId::parse("@u:a.test").unwrap(),
        origin_server: origin.clone(),
        origin_ts: 1,
        content: serde_json::json!({}),
        depth: 1,
        state_key: None,
        signatures: Signatures::default(),
    };
    let (a, b) = (env("$a:a.test"), env("$b:a.test"));
    fn row<'a>(e: &'a Envelope, from: &'a ServerName) -> NewEvent<'a> {
        NewEvent {
            envelope: e,
            received_from: Some(from),
            status: EventStatus::Pending,
            signature_checked: false,
        }
    }
    let mut first = AsyncPgConnection::establish(&url).await.unwrap();
    first.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        events::insert(&mut first, &[row(&a, &origin)])
            .await
            .unwrap(),
        [true]
    );

    let second_url = url.clone();
    let (b2, a2, from) = (b.clone(), a.clone(), origin.clone());
    let second = tokio::spawn(async move {
        let mut c = AsyncPgConnection::establish(&second_url).await.unwrap();
        events::insert(&mut c, &[row(&b2, &from), row(&a2, &from)]).await
    });
    // Wait until the second batch is blocked on a row lock.
    support::wait_for(
        "the second batch to wait for a lock",
        std::time::Duration::from_secs(20),
        || async {
            let mut watch = AsyncPgConnection::establish(&url).await.unwrap();
            let waiting = names(
                &mut watch,
                "SELECT pid::text AS name FROM pg_stat_activity \
                  WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
            .await;
            (!waiting.is_empty()).then_some(())
        },
    )
    .await;
    // Would deadlock if the second batch had taken `$b` before waiting for `$a`.
    assert_eq!(
        events::insert(&mut first, &[row(&b, &origin)])
            .await
            .unwrap(),
        [true]
    );
    first.batch_execute("COMMIT").await.unwrap();
    let second = second.await.unwrap().expect("the second batch succeeds");
    assert_eq!(second, [false, false], "both were stored by the first");
}

/// A deferral of a server no longer in the room ends at the last event fanned out
/// before it left — whether the leave closed it (`rooms::refresh_room_server`) or a
/// fan-out racing the leave started it afterwards with no end — and events fanned out
/// after the leave are not owed.
#[tokio::test]
async fn a_deferral_of_a_server_that_left_ends_where_it_left() {
    use diesel_async::SimpleAsyncConnection;
    use parafed::store::{deferrals, rooms};
    let url = support::pg::migrated_db().await;
    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    let room = "!r:alpha.test";
    support::host_room(&mut c, room, &[("@x:gone.test", "gone.test")]).await;
    // Events 1..=3 fanned out while gone.test is in the room.
    let event = |i: i64, fanned: &str| {
        format!(
            "INSERT INTO federation_events (event_id, room_id, event_type, sender, \
             origin_server, origin_ts, content, depth, signatures, status, fanned_out_at) \
             VALUES ('$e{i}:alpha.test', '{room}', 'm.message', '@a:alpha.test', \
             'alpha.test', 0, '{{}}', {i}, '{{}}', 'accepted', {fanned});"
        )
    };
    for i in 1..=3 {
        c.batch_execute(&event(i, "now() - interval '1 minute'"))
            .await
            .unwrap();
    }
    let seqs: Vec<i64> = {
        use parafed::store::schema::federation_events as fe;
        fe::table
            .filter(fe::event_id.eq_any(["$e1:alpha.test", "$e3:alpha.test"]))
            .order(fe::seq.asc())
            .select(fe::seq)
            .load::<i64>(&mut c)
            .await
            .unwrap()
    };
    let (s1, s3) = (seqs[0], seqs[1]);
    // A deferral from event 1 on; then the server leaves (the leave closes it).
    c.batch_execute(&format!(
        "INSERT INTO outbound_deferrals (destination, room_id, from_seq) \
         VALUES ('gone.test', '{room}', {s1} - 1)"
    ))
    .await
    .unwrap();
    // Event 4 is stored before the leave but fanned out after it: not owed (fan-out
    // reads the room's servers when it runs).
    c.batch_execute(&event(4, "NULL")).await.unwrap();
    rooms::set_member(
        &mut c,
        room,
        "@x:gone.test",
        "gone.test",
        rooms::Membership::Left,
        None,
    )
    .await
    .unwrap();
    rooms::refresh_room_server(&mut c, room, "gone.test")
        .await
        .unwrap();
    c.batch_execute(
        "UPDATE federation_events SET fanned_out_at = now() + interval '1 minute' \
         WHERE event_id = '$e4:alpha.test'",
    )
    .await
    .unwrap();
    let d = deferrals::of(&mut c, "gone.test").await.unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].until_seq, d[0].joined), (Some(s3), false));

    // A deferral a fan-out started after the leave, without an end: the same end.
    c.batch_execute(
        "DELETE FROM outbound_deferrals; \
         INSERT INTO outbound_deferrals (destination, room_id, from_seq) \
         SELECT 'gone.test', room_id, min(seq) - 1 FROM federation_events GROUP BY room_id",
    )
    .await
    .unwrap();
    let d = deferrals::of(&mut c, "gone.test").await.unwrap();
    assert_eq!(
        d[0].until_seq,
        Some(s3),
        "ends at the last event fanned out before the leave"
    );
}

/// `destinations::update_many` saves each state only over the version it was loaded at,
/// all in one statement: a destination an operator paused after the load gets the
/// change applied to the paused state (the pause is kept, as `update` keeps it); the
/// others are saved as changed.
#[tokio::test]
async fn many_destination_states_are_saved_at_once_without_undoing_a_concurrent_change() {
    use parafed::store::destinations;
    let url = support::pg::migrated_db().await;
    let pool = parafed::store::pool(&url, 2).unwrap();
    let mut c = pool.get().await.unwrap();
    destinations::ensure(&mut c, &["a.test", "b.test"])
        .await
        .unwrap();
    let a = destinations::get(&mut c, "a.test").await.unwrap().unwrap();
    let b = destinations::get(&mut c, "b.test").await.unwrap().unwrap();
    // An operator pauses b after it was loaded.
    destinations::update(&mut c, "b.test", |mut h| {
        h.state = "paused".into();
        h.paused_reason = Some("operator".into());
        Ok(h)
    })
    .await
    .unwrap();
    let mut saved = destinations::update_many(&mut c, vec![a.clone(), b.clone()], |mut h| {
        h.last_error = Some("connection refused".into());
        h.consecutive_failures += 1;
        Ok(h)
    })
    .await
    .unwrap();
    saved.sort_by(|x, y| x.destination.cmp(&y.destination));
    let stored_a = destinations::get(&mut c, "a.test").await.unwrap().unwrap();
    let stored_b = destinations::get(&mut c, "b.test").await.unwrap().unwrap();
    assert_eq!(saved, vec![stored_a.clone(), stored_b.clone()]);
    assert_eq!(stored_a.state, "healthy");
    assert_eq!(stored_a.last_error.as_deref(), Some("connection refused"));
    assert_eq!(stored_a.consecutive_failures, 1);
    assert_eq!(stored_a.version, a.version + 1);
    assert_eq!(stored_b.state, "paused", "the operator's pause is kept");
    assert_eq!(stored_b.paused_reason.as_deref(), Some("operator"));
    assert_eq!(stored_b.last_error.as_deref(), Some("connection refused"));
    assert_eq!(stored_b.consecutive_failures, 1);
    assert_eq!(stored_b.version, b.version + 2);
}

/// A watched table that grew past what its statistics say is analyzed by parafed itself
/// (without waiting for autovacuum's next look), and only once: the next look finds its
/// statistics fresh.
#[tokio::test]
async fn a_table_that_outgrew_its_statistics_is_analyzed_once() {
    use diesel_async::RunQueryDsl;
    use parafed::store::statistics;
    let url = support::pg::migrated_db().await;
    let pool = parafed::store::pool(&url, 2).unwrap();
    let mut c = pool.get().await.unwrap();
    #[derive(diesel::QueryableByName)]
    struct Analyzed {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        analyzed: bool,
    }
    let analyzed = async |c: &mut parafed::store::PgConn| -> bool {
        diesel::sql_query(
            "SELECT last_analyze IS NOT NULL AS analyzed FROM pg_stat_user_tables \
              WHERE relname = 'outbound_deferrals'",
        )
        .get_result::<Analyzed>(c)
        .await
        .unwrap()
        .analyzed
    };
    // Autovacuum would analyze it too, at a moment of its own choosing.
    diesel::sql_query("ALTER TABLE outbound_deferrals SET (autovacuum_enabled = false)")
        .execute(&mut c)
        .await
        .unwrap();
    diesel::sql_query(format!(
        "INSERT INTO outbound_deferrals (destination, room_id, from_seq) \
         SELECT 'd' || n || '.test', '!r:alpha.test', 0 \
           FROM generate_series(1, {}) AS n",
        statistics::MIN_CHANGES
    ))
    .execute(&mut c)
    .await
    .unwrap();
    // The counters reach the shared statistics when the writer flushes them: at once
    // on Postgres 15 and later, within a second or so before.
    let _ = diesel::sql_query("SELECT pg_stat_force_next_flush()")
        .execute(&mut c)
        .await;
    #[derive(diesel::QueryableByName)]
    struct Changed {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        changed: i64,
    }
    parafed::devservers::wait_until(
        "the inserts to be counted",
        std::time::Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move {
                let mut c = pool.get().await.ok()?;
                let n: Changed = diesel::sql_query(
                    "SELECT n_mod_since_analyze AS changed FROM pg_stat_user_tables \
                      WHERE relname = 'outbound_deferrals'",
                )
                .get_result(&mut c)
                .await
                .ok()?;
                (n.changed >= statistics::MIN_CHANGES).then_some(())
            }
        },
    )
    .await
    .unwrap();
    assert!(!analyzed(&mut c).await, "nothing analyzed the table yet");
    let done = statistics::refresh(&mut c).await.unwrap();
    assert_eq!(done.analyzed, vec!["outbound_deferrals"]);
    assert_eq!(done.not_owned, Vec::<&str>::new());
    assert!(analyzed(&mut c).await);
    let again = statistics::refresh(&mut c).await.unwrap();
    assert_eq!(again.analyzed, Vec::<&str>::new());
}

/// The drain's read of waiting rows (`outbound::waiting`) asks for earlier unsettled
/// events through the partial index whatever the statistics say. Taken while a burst
/// was still being verified, they claim most of the room is unsettled; a plan that
/// trusts them expects a sequential scan to meet one within a few rows, and when none
/// is left it walks the whole table once per round (docs/performance.md, tenth round).
#[tokio::test]
async fn the_drains_read_looks_for_earlier_unsettled_events_by_index_after_a_burst() {
    use diesel_async::SimpleAsyncConnection;
    let url = support::pg::migrated_db().await;
    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    // A burst of 30 000 events stored, analyzed while they all waited for verify, then
    // verified and fanned out; the newest 64 wait for one destination. Autovacuum
    // stays out so the statistics stay those of the burst.
    c.batch_execute(
        "ALTER TABLE federation_events SET (autovacuum_enabled = false); \
         INSERT INTO federation_events (event_id, room_id, event_type, sender, \
             origin_server, origin_ts, content, depth, signatures, status) \
         SELECT '$e' || n || ':alpha.test', '!r:alpha.test', 'm.message', '@a:alpha.test', \
                'alpha.test', 0, '{}', n, '{}', 'pending' \
           FROM generate_series(1, 30000) AS n; \
         ANALYZE federation_events; \
         UPDATE federation_events SET status = 'accepted', verified_at = now(), \
             fanned_out_at = now(); \
         INSERT INTO outbound_queue (destination, event_id, event_seq) \
         SELECT 'sink.test', event_id, seq FROM federation_events \
          ORDER BY seq DESC LIMIT 64;",
    )
    .await
    .unwrap();
    // The parameters as the drains bind them: the destination(s), and five minutes ago.
    let statements = [
        (
            "waiting",
            parafed::store::outbound::waiting_statement(128).replace("$1", "'sink.test'"),
        ),
        (
            "waiting_of (a probe round)",
            parafed::store::outbound::waiting_of_statement(1)
                .replace("$1", "ARRAY['sink.test', 'other.test']"),
        ),
    ];
    let mut statements: Vec<(&str, String)> = statements
        .into_iter()
        .map(|(name, s)| (name, s.replace("$2", "(now() - interval '5 minutes')")))
        .collect();
    // `waiting` is a prepared statement (`store::prepared`): after a few runs Postgres
    // may keep a generic plan, made without knowing that `$2` is minutes ago.
    c.batch_execute(&format!(
        "PREPARE waiting_read(text, timestamptz) AS {}; \
         SET plan_cache_mode = force_generic_plan;",
        parafed::store::outbound::waiting_statement(128)
    ))
    .await
    .unwrap();
    statements.push((
        "waiting (generic plan)",
        "EXECUTE waiting_read('sink.test', now() - interval '5 minutes')".into(),
    ));
    for (name, statement) in statements {
        let plan = plan_of(&mut c, &statement).await;
        assert!(
            !plan.contains("Seq Scan on federation_events p"),
            "{name} walks federation_events:\n{plan}"
        );
        assert!(
            plan.contains("federation_events_unsettled_room"),
            "{name} does not use the unsettled-events index:\n{plan}"
        );
        // One destination's rows, in order, from the index (the destination handed over
        // as `(SELECT $1)` is still its condition).
        if name.starts_with("waiting (") {
            assert!(
                plan.contains("outbound_queue_destination_waiting")
                    && !plan.contains("Seq Scan on outbound_queue"),
                "{name} does not read the destination's rows by index:\n{plan}"
            );
        }
    }
}

/// The statements that every verify run and every drain round runs are kept prepared
/// on the connection and settle on the generic plan: Diesel caches most query-builder
/// statements itself, but sends hand-written SQL and query-builder `UPDATE`s to be
/// parsed and planned again on every run unless they are wrapped (`store::prepared`);
/// and a prepared statement whose values move the planner's estimate (the length of an
/// `= ANY` list or of the arrays a batch is unnested from, a time bound) can stay on
/// custom plans, planned on every run. At a steady 1 000 events/s that planning cost
/// Postgres more than running the statements (docs/performance.md, twelfth round); at
/// 500 events/s a drain round's settle and its attempts' begin were still planned on
/// most runs (thirteenth round). The old forms of `attempts::begin`, `attempts::finish`,
/// `outbound::settle`, `outbound::dead` and `rooms::memberships` (now part of
/// `rooms::rules_view`) fail here.
#[tokio::test]
async fn the_statements_every_run_of_the_pipeline_makes_are_prepared_and_planned_once() {
    use parafed::store::{attempts, deferrals, destinations, events, outbound, rooms};
    let url = support::pg::migrated_db().await;
    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    // Tables with rows and statistics, as in a deployment: on empty tables every plan
    // costs the same whatever the values. Autovacuum stays off them, so that no ANALYZE
    // during the runs makes the statements plan anew.
    {
        use diesel_async::SimpleAsyncConnection;
        c.batch_execute(
            "ALTER TABLE federation_events SET (autovacuum_enabled = false); \
             ALTER TABLE outbound_queue SET (autovacuum_enabled = false); \
             ALTER TABLE delivery_attempts SET (autovacuum_enabled = false); \
             ALTER TABLE room_members SET (autovacuum_enabled = false); \
             ALTER TABLE destination_health SET (autovacuum_enabled = false); \
             ALTER TABLE outbound_deferrals SET (autovacuum_enabled = false); \
             INSERT INTO federation_events (event_id, room_id, event_type, sender, \
                 origin_server, origin_ts, content, depth, signatures, status, fanned_out_at) \
             SELECT '$e' || n || ':alpha.test', '!r:alpha.test', 'm.message', '@a:alpha.test', \
                    'alpha.test', 0, '{}', n, '{}', 'accepted', now() \
               FROM generate_series(100, 2100) AS n; \
             INSERT INTO outbound_queue (destination, event_id, event_seq) \
             SELECT 'sink.test', event_id, seq FROM federation_events; \
             INSERT INTO delivery_attempts (outbound_id, destination, event_id, request_kind, \
                 attempt, latency_ms, finished_at) \
             SELECT id, destination, event_id, 'event', 1, 1, now() FROM outbound_queue; \
             INSERT INTO room_members (room_id, user_id, server_name, membership) \
             SELECT '!r' || n || ':alpha.test', '@a:alpha.test', 'alpha.test', 'joined' \
               FROM generate_series(1, 2000) AS n; \
             ANALYZE;",
        )
        .await
        .unwrap();
    }
    let ttl = chrono::Duration::seconds(30);
    // More runs than the five custom plans Postgres makes before it weighs the generic
    // one (twelve: at least seven on the generic plan); lists of varying length, as
    // verify's batches are.
    for n in 1..=12 {
        let ids: Vec<String> = (0..n).map(|i| format!("$e{i}:alpha.test")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        events::get_many(&mut c, &ids).await.unwrap();
        events::envelopes(&mut c, &ids).await.unwrap();
        destinations::acquire_lease(&mut c, "sink.test", "w1", ttl)
            .await
            .unwrap();
        destinations::release_lease(&mut c, "sink.test", "w1")
            .await
            .unwrap();
        outbound::waiting(&mut c, "sink.test", 64, chrono::Utc::now())
            .await
            .unwrap();
        // A drain round's and a verify run's lists at a steady rate: a few rows each,
        // fewer than the ten a generic plan assumes (a custom plan is then the cheaper
        // estimate, and is made on every run unless the list is out of its sight).
        let k = n % 3 + 1;
        let few = &["$a:alpha.test", "$b:alpha.test", "$c:alpha.test"][..k];
        let rows: Vec<i64> = (0..k as i64).map(|i| 1_000_000 + i).collect();
        let numbered: Vec<(i64, i32)> = rows.iter().map(|&id| (id, 1)).collect();
        attempts::begin(&mut c, &numbered).await.unwrap();
        let finished: Vec<attempts::Finished> = rows
            .iter()
            .map(|&id| attempts::Finished {
                id,
                status_code: Some(202),
                error_class: None,
                latency_ms: 1,
                response_excerpt: None,
            })
            .collect();
        attempts::finish(&mut c, &finished).await.unwrap();
        let settled: Vec<(i64, outbound::Settled)> = rows
            .iter()
            .map(|&id| (id, outbound::Settled::Delivered))
            .collect();
        outbound::settle(&mut c, &finished, &settled).await.unwrap();
        let dead: Vec<(i64, String)> = rows.iter().map(|&id| (id, "expired".into())).collect();
        outbound::dead(&mut c, &dead).await.unwrap();
        // From here on, all but the membership lookup were on the generic plan here in
        // their old forms too (with the arrays in sight): they are listed so that a
        // change that makes them plan per run shows, not because their old forms failed.
        let rejected: Vec<(&str, i64, &str)> = few.iter().map(|&e| (e, 1, "bad")).collect();
        events::reject(&mut c, &rejected).await.unwrap();
        let names = &["sink.test", "other.test", "third.test"][..k];
        destinations::ensure(&mut c, names).await.unwrap();
        attempts::close_open_of(&mut c, names).await.unwrap();
        deferrals::of_many(&mut c, names).await.unwrap();
        let rooms = ["!r1:alpha.test", "!r2:alpha.test", "!r3:alpha.test"];
        let pairs: Vec<(&str, &str)> = rooms[..k].iter().map(|&r| (r, "@a:alpha.test")).collect();
        rooms::rules_view(&mut c, &ids[..n.min(3)], &pairs)
            .await
            .unwrap();
        destinations::acquire_leases(&mut c, names, "w1", ttl)
            .await
            .unwrap();
        destinations::release_leases(&mut c, names, "w1")
            .await
            .unwrap();
    }
    #[derive(QueryableByName, Debug)]
    struct Kept {
        #[diesel(sql_type = Text)]
        statement: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        generic_plans: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        custom_plans: i64,
    }
    // Statements prepared through the protocol (a name per statement), as listed by
    // the connection that prepared them, with the plans each was run with.
    let kept: Vec<Kept> = diesel::sql_query(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements",
    )
    .load(&mut c)
    .await
    .unwrap();
    let expected = [
        (
            "events::get_many and events::envelopes",
            "FROM \"federation_events\" WHERE",
        ),
        (
            "destinations::acquire_lease",
            "\"destination_health\".\"lease_until\" < $4",
        ),
        (
            "destinations::release_lease",
            "\"destination_health\".\"lease_owner\" = $4))",
        ),
        ("outbound::waiting", "WITH w AS (SELECT o.id"),
        ("attempts::begin", "INSERT INTO delivery_attempts"),
        ("attempts::finish", "^UPDATE delivery_attempts a SET"),
        ("outbound::settle", "WITH finished AS ("),
        (
            "outbound::dead",
            "UPDATE outbound_queue o SET status = 'dead'",
        ),
        ("events::reject", "SET status = 'rejected'"),
        ("rooms::rules_view", "JOIN room_members m"),
        ("destinations::ensure", "INSERT INTO destination_health"),
        ("attempts::close_open_of", "WITH closed AS ("),
        ("deferrals::of_many", "^SELECT f.destination, f.room_id"),
        ("destinations::acquire_leases", "SET lease_owner = $2"),
        ("destinations::release_leases", "SET lease_owner = NULL"),
    ];
    let mut failed = Vec::new();
    for (what, text) in expected {
        // `^`: the statement starts with the text (the settle holds the finish's text).
        match kept.iter().find(|k| match text.strip_prefix('^') {
            Some(start) => k.statement.starts_with(start),
            None => k.statement.contains(text),
        }) {
            None => failed.push(format!("{what} is not kept prepared")),
            Some(k) if k.generic_plans < 7 || k.custom_plans > 5 => failed.push(format!(
                "{what} is planned again on every run: {} generic, {} custom plans",
                k.generic_plans, k.custom_plans
            )),
            Some(_) => {}
        }
    }
    assert!(failed.is_empty(), "{failed:#?}\nprepared: {kept:#?}");
}

/// Releasing, purging and counting a quarantined peer's held events finds them through
/// the partial indexes of held events, by the peer (`federation_events_held_from`, the
/// events it relayed; `federation_events_held_origin`, those it originated), on the
/// generic plan a prepared statement settles on, among many other peers' held events.
/// Those indexes replaced two that held an entry for every event (docs/performance.md,
/// fourteenth round); a status bound as a parameter would leave them unusable. The
/// functions are run first, so that the statements checked are the ones they send.
#[tokio::test]
async fn a_peers_held_events_are_found_by_the_held_event_indexes() {
    use diesel_async::SimpleAsyncConnection;
    use parafed::store::events;
    let url = support::pg::migrated_db().await;
    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    // 5 000 accepted events, 2 000 held from 200 other peers, 3 held from bad.test.
    c.batch_execute(
        "INSERT INTO federation_events (event_id, room_id, event_type, sender, \
             origin_server, origin_ts, content, depth, signatures, status, received_from) \
         SELECT '$' || kind || n || ':alpha.test', '!r:alpha.test', 'm.message', \
                '@a:alpha.test', origin, 0, '{}', n, '{}', status, relay \
           FROM (SELECT 'e', n, 'alpha.test', 'accepted', 'relay.test' \
                   FROM generate_series(1, 5000) n \
                 UNION ALL SELECT 'o', n, 'o' || n % 200 || '.test', 'held', \
                        'f' || n % 200 || '.test' FROM generate_series(1, 2000) n \
                 UNION ALL SELECT 'h', n, 'bad.test', 'held', 'relay.test' \
                   FROM generate_series(1, 3) n) AS x(kind, n, origin, status, relay); \
         ANALYZE federation_events;",
    )
    .await
    .unwrap();
    // What the statements find: the three held events, by origin and by the peer that
    // relayed them (which relayed nothing else that is held).
    assert_eq!(events::held_count(&mut c, "bad.test").await.unwrap(), 3);
    assert_eq!(events::held_count(&mut c, "relay.test").await.unwrap(), 3);
    assert_eq!(events::held_count(&mut c, "alpha.test").await.unwrap(), 0);
    assert!(events::release_held(&mut c, "nobody.test")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(events::purge_held(&mut c, "nobody.test").await.unwrap(), 0);
    let kept = names(
        &mut c,
        "SELECT statement AS name FROM pg_prepared_statements",
    )
    .await;
    c.batch_execute("SET plan_cache_mode = force_generic_plan;")
        .await
        .unwrap();
    for (name, statement) in [
        ("release", events::RELEASE_HELD_STATEMENT),
        ("purge", events::PURGE_HELD_STATEMENT),
        ("count", events::HELD_COUNT_STATEMENT),
    ] {
        assert!(
            kept.iter().any(|k| k == statement),
            "{name}: its function does not send its statement, prepared:\n{kept:#?}"
        );
        c.batch_execute(&format!("PREPARE held_{name}(text) AS {statement};"))
            .await
            .unwrap();
        let plan = plan_of(&mut c, &format!("EXECUTE held_{name}('bad.test')")).await;
        let by_index = |column: &str| {
            plan.lines()
                .any(|l| l.contains("Index Cond") && l.contains(&format!("{column} = $1")))
        };
        assert!(
            by_index("received_from")
                && by_index("origin_server")
                && plan.contains("federation_events_held_from")
                && plan.contains("federation_events_held_origin")
                && !plan.contains("Seq Scan on federation_events"),
            "{name} does not look the peer's held events up by index:\n{plan}"
        );
    }
}

/// The plan Postgres picks for `statement` (`EXPLAIN`, parameters written in), one line
/// of text per node.
async fn plan_of(c: &mut AsyncPgConnection, statement: &str) -> String {
    use diesel_async::SimpleAsyncConnection;
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION plan_of(q text) RETURNS SETOF text LANGUAGE plpgsql AS $$ \
           DECLARE line text; \
           BEGIN FOR line IN EXECUTE 'EXPLAIN ' || q LOOP RETURN NEXT line; END LOOP; END $$;",
    )
    .await
    .unwrap();
    names(
        c,
        &format!(
            "SELECT plan_of AS name FROM plan_of('{}')",
            statement.replace('\'', "''")
        ),
    )
    .await
    .join("\n")
}

/// A drain round's settle (`outbound::settle`) finds the round's attempts by key. The
/// statistics count few open attempts, but the open-attempt index holds every attempt
/// begun since the last VACUUM: a plan that reads it instead of the keys reads them all
/// once per round (docs/performance.md, tenth round).
#[tokio::test]
async fn a_rounds_settle_finds_its_attempts_by_key_however_many_began_since_vacuum() {
    use diesel_async::SimpleAsyncConnection;
    let url = support::pg::migrated_db().await;
    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    // 20 000 deliveries made and analyzed; then 1 000 more begun, all but the last
    // round's 64 finished, with no VACUUM since (the statistics count few rows waiting
    // and few attempts open).
    c.batch_execute(
        "ALTER TABLE delivery_attempts SET (autovacuum_enabled = false); \
         ALTER TABLE outbound_queue SET (autovacuum_enabled = false); \
         INSERT INTO federation_events (event_id, room_id, event_type, sender, \
             origin_server, origin_ts, content, depth, signatures, status, fanned_out_at) \
         SELECT '$e' || n || ':alpha.test', '!r:alpha.test', 'm.message', '@a:alpha.test', \
                'alpha.test', 0, '{}', n, '{}', 'accepted', now() \
           FROM generate_series(1, 21000) AS n; \
         INSERT INTO outbound_queue (destination, event_id, event_seq) \
         SELECT 'sink.test', event_id, seq FROM federation_events ORDER BY seq; \
         INSERT INTO delivery_attempts (outbound_id, destination, event_id, request_kind, \
             attempt, latency_ms, finished_at) \
         SELECT id, destination, event_id, 'event', 1, 1, now() FROM outbound_queue \
          ORDER BY id LIMIT 20000; \
         UPDATE outbound_queue SET status = 'delivered' WHERE id IN \
             (SELECT outbound_id FROM delivery_attempts); \
         ANALYZE; \
         INSERT INTO delivery_attempts (outbound_id, destination, event_id, request_kind, \
             attempt) \
         SELECT id, destination, event_id, 'event', 1 FROM outbound_queue \
          ORDER BY id OFFSET 20000; \
         UPDATE delivery_attempts SET finished_at = now(), latency_ms = 1 \
          WHERE id IN (SELECT id FROM delivery_attempts WHERE finished_at IS NULL \
                        ORDER BY id LIMIT 936);",
    )
    .await
    .unwrap();
    #[derive(QueryableByName)]
    struct Open {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        outbound_id: i64,
    }
    let open: Vec<Open> = diesel::sql_query(
        "SELECT id, outbound_id FROM delivery_attempts WHERE finished_at IS NULL ORDER BY id",
    )
    .load(&mut c)
    .await
    .unwrap();
    assert_eq!(open.len(), 64);
    let list = |v: Vec<String>| format!("ARRAY[{}]", v.join(", "));
    let n = open.len();
    // The round's results as the drain binds them ($1..$8): every request answered 202.
    let args = [
        list(open.iter().map(|o| o.id.to_string()).collect()),
        list(vec!["202".into(); n]),
        format!("{}::text[]", list(vec!["NULL".into(); n])),
        list(vec!["3".into(); n]),
        format!("{}::text[]", list(vec!["NULL".into(); n])),
        list(open.iter().map(|o| o.outbound_id.to_string()).collect()),
        list(vec!["'delivered'".into(); n]),
        format!("{}::text[]", list(vec!["NULL".into(); n])),
    ];
    let mut custom = parafed::store::outbound::SETTLE_STATEMENT.to_owned();
    for (i, a) in args.iter().enumerate() {
        custom = custom.replace(&format!("${}", i + 1), a);
    }
    // The settle is a prepared statement (`store::prepared`): after a few runs Postgres
    // may keep a generic plan, made without the values. Both must look up by key.
    c.batch_execute(&format!(
        "PREPARE settle_round(bigint[], int[], text[], int[], text[], bigint[], text[], \
                              text[]) AS {}; \
         SET plan_cache_mode = force_generic_plan;",
        parafed::store::outbound::SETTLE_STATEMENT
    ))
    .await
    .unwrap();
    let generic = format!("EXECUTE settle_round({})", args.join(", "));
    for (kind, statement) in [("custom", custom), ("generic", generic)] {
        let plan = plan_of(&mut c, &statement).await;
        assert!(
            !plan.contains("delivery_attempts_open"),
            "the settle's {kind} plan reads the open-attempt index:\n{plan}"
        );
        assert!(
            plan.contains("delivery_attempts_pkey"),
            "the settle's {kind} plan does not look the attempts up by key:\n{plan}"
        );
        assert!(
            plan.contains("outbound_queue_pkey") && !plan.contains("outbound_queue_destination"),
            "the settle's {kind} plan does not look the rows up by key:\n{plan}"
        );
    }
}

/// A fan-out's batch too big for one statement (`outbound::enqueue`, cut at
/// `MAX_ENTRIES_PER_STATEMENT`) starts the deferral of a room whose events all fall in a
/// later statement: each statement starts the deferrals of its own rooms. Without it the
/// events were marked fanned out with neither a row nor a deferral for the destination.
#[tokio::test]
async fn a_fan_out_split_over_statements_starts_every_rooms_deferral() {
    use diesel_async::SimpleAsyncConnection;
    use parafed::store::outbound::{self, Deferred, Fanned, NewOutbound};
    let url = support::pg::migrated_db().await;
    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    c.batch_execute(
        "INSERT INTO federation_events (event_id, room_id, event_type, sender, \
             origin_server, origin_ts, content, depth, signatures, status) \
         VALUES ('$a:alpha.test', '!a:alpha.test', 'm.message', '@a:alpha.test', \
                 'alpha.test', 0, '{}', 1, '{}', 'accepted'), \
                ('$b:alpha.test', '!b:alpha.test', 'm.message', '@a:alpha.test', \
                 'alpha.test', 0, '{}', 1, '{}', 'accepted');",
    )
    .await
    .unwrap();
    #[derive(QueryableByName)]
    struct Seq {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        seq: i64,
    }
    let seqs: Vec<Seq> = diesel::sql_query("SELECT seq FROM federation_events ORDER BY seq")
        .load(&mut c)
        .await
        .unwrap();
    let (seq_a, seq_b) = (seqs[0].seq, seqs[1].seq);
    // Event a goes to as many servers as one statement carries, so event b is written
    // by a second statement; dead.test, down, is owed b through a deferral.
    let many: Vec<String> = (0..outbound::MAX_ENTRIES_PER_STATEMENT)
        .map(|i| format!("s{i}.test"))
        .collect();
    let event = |id, seq, room| NewOutbound {
        event_id: id,
        event_seq: seq,
        room_id: room,
        provides: &[],
        waits: &[],
    };
    let fanned = Fanned {
        rows: vec![
            (event("$a:alpha.test", seq_a, "!a:alpha.test"), many),
            (event("$b:alpha.test", seq_b, "!b:alpha.test"), Vec::new()),
        ],
        conditional: vec![Vec::new(), Vec::new()],
        start: vec![Deferred {
            destination: "dead.test".into(),
            room_id: "!b:alpha.test".into(),
            from_seq: seq_b - 1,
        }],
        deferred: 1,
        ..Fanned::default()
    };
    let written = outbound::enqueue(&mut c, &fanned, &["$a:alpha.test", "$b:alpha.test"])
        .await
        .unwrap();
    assert_eq!(written.rows, outbound::MAX_ENTRIES_PER_STATEMENT);
    #[derive(QueryableByName, Debug, PartialEq)]
    struct Deferral {
        #[diesel(sql_type = Text)]
        room_id: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        from_seq: i64,
    }
    let deferrals: Vec<Deferral> = diesel::sql_query(
        "SELECT room_id, from_seq FROM outbound_deferrals WHERE destination = 'dead.test'",
    )
    .load(&mut c)
    .await
    .unwrap();
    assert_eq!(
        deferrals,
        vec![Deferral {
            room_id: "!b:alpha.test".into(),
            from_seq: seq_b - 1
        }],
        "dead.test is owed event b"
    );
    let unfanned: Vec<Seq> =
        diesel::sql_query("SELECT seq FROM federation_events WHERE fanned_out_at IS NULL")
            .load(&mut c)
            .await
            .unwrap();
    assert!(unfanned.is_empty(), "both events are marked fanned out");
}

/// A verify run's room rules read in one statement (`rooms::rules_view`): which of
/// the rooms asked are hosted here, and the membership of each (room, user) pair that
/// has one — whatever the other part of the statement finds.
#[tokio::test]
async fn rules_view_gives_the_hosted_rooms_and_the_pairs_memberships() {
    use diesel_async::SimpleAsyncConnection;
    use parafed::store::rooms;
    let url = support::pg::migrated_db().await;
    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    c.batch_execute(
        "INSERT INTO hosted_rooms (room_id, guild_id, guild_name) \
           VALUES ('!a:x.test', 'g1', 'A'), ('!b:x.test', 'g2', 'B'); \
         INSERT INTO room_members (room_id, user_id, server_name, membership) VALUES \
           ('!a:x.test', '@u:y.test', 'y.test', 'joined'), \
           ('!a:x.test', '@v:y.test', 'y.test', 'left'), \
           ('!b:x.test', '@u:y.test', 'y.test', 'invited'), \
           ('!c:x.test', '@u:y.test', 'y.test', 'joined');",
    )
    .await
    .unwrap();
    let (hosted, members) = rooms::rules_view(
        &mut c,
        &["!a:x.test", "!c:x.test", "!z:x.test"],
        &[
            ("!a:x.test", "@u:y.test"),
            ("!a:x.test", "@v:y.test"),
            ("!a:x.test", "@w:y.test"),
            ("!c:x.test", "@u:y.test"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(hosted, ["!a:x.test".to_owned()].into_iter().collect());
    let of = |r: &str, u: &str| members.get(&(r.to_owned(), u.to_owned())).cloned();
    assert_eq!(of("!a:x.test", "@u:y.test").as_deref(), Some("joined"));
    assert_eq!(of("!a:x.test", "@v:y.test").as_deref(), Some("left"));
    assert_eq!(of("!a:x.test", "@w:y.test"), None, "no membership");
    assert_eq!(
        of("!c:x.test", "@u:y.test").as_deref(),
        Some("joined"),
        "hosted or not"
    );
    assert_eq!(of("!b:x.test", "@u:y.test"), None, "a pair not asked");
    assert_eq!(members.len(), 3);
    let (hosted, members) = rooms::rules_view(&mut c, &["!b:x.test"], &[])
        .await
        .unwrap();
    assert_eq!(hosted.len(), 1);
    assert!(members.is_empty());
}

/// Fan-out's view of its rooms (`deferrals::fan_out_view`), one statement: each room's
/// joined servers and no one who left, a state for each server that has a row and none
/// for one new to us, each server's deferral in the room — and no deferral of a room
/// not asked or of a server no longer in the room.
#[tokio::test]
async fn fan_out_view_gives_each_rooms_servers_their_state_and_deferral() {
    use diesel_async::SimpleAsyncConnection;
    use parafed::store::deferrals;
    let url = support::pg::migrated_db().await;
    let pool = parafed::store::pool(&url, 1).unwrap();
    let mut c = pool.get().await.unwrap();
    // In !a: 300 dead peers alike (backing off, never answered, deferred from 7), one
    // that answered and is backing off, a healthy one never reached, a healthy one with
    // deferrals in three rooms (one closed), one new to us, and one that left (its
    // deferral still there). In !b: the healthy one and one with a deferral and no state
    // row. In !c (not asked): the healthy one.
    c.batch_execute(
        "INSERT INTO destination_health (destination, state, last_error_at, backoff_until) \
           SELECT 'dead' || i || '.test', 'backing_off', now(), now() + interval '1 minute' \
             FROM generate_series(1, 300) i; \
         INSERT INTO outbound_deferrals (destination, room_id, from_seq) \
           SELECT 'dead' || i || '.test', '!a:x.test', 7 FROM generate_series(1, 300) i; \
         INSERT INTO room_servers (room_id, server_name, state) \
           SELECT '!a:x.test', 'dead' || i || '.test', 'joined' FROM generate_series(1, 300) i; \
         INSERT INTO room_servers (room_id, server_name, state) VALUES \
           ('!a:x.test', 'answered.test', 'joined'), ('!a:x.test', 'fresh.test', 'joined'), \
           ('!a:x.test', 'busy.test', 'joined'), ('!a:x.test', 'new.test', 'joined'), \
           ('!a:x.test', 'gone.test', 'left'), ('!b:x.test', 'busy.test', 'joined'), \
           ('!b:x.test', 'orphan.test', 'joined'), ('!c:x.test', 'busy.test', 'joined'); \
         INSERT INTO destination_health (destination, state, last_status_code, last_error_at) \
           VALUES ('answered.test', 'backing_off', 503, now()); \
         INSERT INTO destination_health (destination, state) \
           VALUES ('fresh.test', 'healthy'), ('gone.test', 'healthy'); \
         INSERT INTO destination_health (destination, state, last_success_at) \
           VALUES ('busy.test', 'healthy', now()); \
         INSERT INTO outbound_deferrals (destination, room_id, from_seq, until_seq) \
           VALUES ('busy.test', '!a:x.test', 3, NULL), ('busy.test', '!b:x.test', 4, 9), \
                  ('busy.test', '!c:x.test', 5, NULL), ('orphan.test', '!b:x.test', 2, NULL), \
                  ('gone.test', '!a:x.test', 1, 8);",
    )
    .await
    .unwrap();
    let view = deferrals::fan_out_view(&mut c, &["!a:x.test", "!b:x.test"])
        .await
        .unwrap();
    let mut in_a: Vec<String> = (1..=300).map(|i| format!("dead{i}.test")).collect();
    in_a.extend(["answered.test", "fresh.test", "busy.test", "new.test"].map(String::from));
    in_a.sort_unstable();
    assert_eq!(
        view.servers.get("!a:x.test"),
        Some(&in_a),
        "sorted, without gone.test"
    );
    assert_eq!(
        view.servers.get("!b:x.test"),
        Some(&vec!["busy.test".to_owned(), "orphan.test".to_owned()])
    );
    assert_eq!(view.servers.len(), 2, "a room not asked has no list");
    for i in 1..=300 {
        let d = format!("dead{i}.test");
        assert_eq!(view.reach.get(&d), Some(&(false, true)), "{d}");
        assert_eq!(
            view.open.get(&(d.clone(), "!a:x.test".into())),
            Some(&(7, None)),
            "{d}"
        );
    }
    let reach = |d: &str| view.reach.get(d).copied();
    assert_eq!(reach("answered.test"), Some((false, false)));
    assert_eq!(reach("fresh.test"), Some((true, true)));
    assert_eq!(reach("busy.test"), Some((true, false)));
    assert_eq!(reach("orphan.test"), None, "no state row: new to us");
    assert_eq!(reach("new.test"), None);
    assert_eq!(reach("gone.test"), None, "not in the rooms asked");
    assert_eq!(view.reach.len(), 303);
    let of = |d: &str, r: &str| view.open.get(&(d.to_owned(), r.to_owned())).copied();
    assert_eq!(of("busy.test", "!a:x.test"), Some((3, None)));
    assert_eq!(of("busy.test", "!b:x.test"), Some((4, Some(9))));
    assert_eq!(of("busy.test", "!c:x.test"), None, "a room not asked");
    assert_eq!(of("orphan.test", "!b:x.test"), Some((2, None)));
    assert_eq!(of("gone.test", "!a:x.test"), None, "a server that left");
    assert_eq!(view.open.len(), 303);
    assert_eq!(
        deferrals::fan_out_view(&mut c, &[]).await.unwrap(),
        Default::default(),
        "no rooms, no statement"
    );
}

/// Fan-out's view (`deferrals::FAN_OUT_VIEW_STATEMENT`), run by every fan-out as a
/// prepared statement, joins its lists whichever plan Postgres keeps: the generic plan,
/// made without the array, must not search an array for each row of a table (`= ANY
/// ($1)` in a filter: a room of a thousand servers read a thousand times a fan-out;
/// docs/performance.md, eleventh round).
#[tokio::test]
async fn fan_outs_view_joins_its_lists_in_the_generic_plan() {
    use diesel_async::SimpleAsyncConnection;
    let url = support::pg::migrated_db().await;
    let mut c = AsyncPgConnection::establish(&url).await.unwrap();
    c.batch_execute(
        "INSERT INTO destination_health (destination, state, last_error_at) \
           SELECT 'dead' || i || '.test', 'backing_off', now() FROM generate_series(1, 1000) i; \
         INSERT INTO outbound_deferrals (destination, room_id, from_seq) \
           SELECT 'dead' || i || '.test', '!a:x.test', 7 FROM generate_series(1, 1000) i; \
         INSERT INTO room_servers (room_id, server_name, state) \
           SELECT '!r' || (i % 50) || ':x.test', 'dead' || i || '.test', 'joined' \
             FROM generate_series(1, 1000) i; \
         INSERT INTO room_servers (room_id, server_name, state) \
           SELECT '!a:x.test', 'dead' || i || '.test', 'joined' FROM generate_series(1, 1000) i; \
         ANALYZE destination_health; ANALYZE outbound_deferrals; ANALYZE room_servers;",
    )
    .await
    .unwrap();
    c.batch_execute(&format!(
        "PREPARE view(text[]) AS {}; SET plan_cache_mode = force_generic_plan;",
        parafed::store::deferrals::FAN_OUT_VIEW_STATEMENT
    ))
    .await
    .unwrap();
    let plan = plan_of(&mut c, "EXECUTE view(ARRAY['!a:x.test'])").await;
    assert!(
        !plan.contains("= ANY ("),
        "the generic plan searches an array row by row:\n{plan}"
    );
}
