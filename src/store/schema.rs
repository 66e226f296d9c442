//! Diesel's view of the tables in `migrations/`. Written by hand to match the SQL;
//! `tests/it/store.rs` checks every table and column exists in a migrated database.

diesel::table! {
    federation_events (event_id) {
        event_id -> Text,
        room_id -> Text,
        event_type -> Text,
        sender -> Text,
        origin_server -> Text,
        origin_ts -> Int8,
        content -> Text,
        depth -> Int8,
        state_key -> Nullable<Text>,
        signatures -> Text,
        received_from -> Nullable<Text>,
        status -> Text,
        reject_reason -> Nullable<Text>,
        received_at -> Timestamptz,
        verified_at -> Nullable<Timestamptz>,
        enqueued_at -> Nullable<Timestamptz>,
        fanned_out_at -> Nullable<Timestamptz>,
        seq -> Int8,
        signature_checked -> Bool,
        released_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    federation_server_keys (server_name, key_id) {
        server_name -> Text,
        key_id -> Text,
        public_key -> Text,
        valid_until -> Int8,
        fetched_at -> Timestamptz,
    }
}

diesel::table! {
    local_signing_keys (key_id) {
        key_id -> Text,
        seed -> Bytea,
        public_key -> Text,
        status -> Text,
        created_at -> Timestamptz,
        retired_at -> Nullable<Timestamptz>,
        verify_until -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    peers (server_name) {
        server_name -> Text,
        base_url -> Nullable<Text>,
        federation_endpoint -> Nullable<Text>,
        domain -> Nullable<Text>,
        discovered_at -> Nullable<Timestamptz>,
        last_discovery_error -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    peer_trust (server_name) {
        server_name -> Text,
        state -> Text,
        reason -> Nullable<Text>,
        until -> Nullable<Timestamptz>,
        rate_limit_per_minute -> Nullable<Int4>,
        automatic -> Bool,
        bad_signatures -> Int8,
        rejected_events -> Int8,
        updated_at -> Timestamptz,
        set_by -> Nullable<Text>,
        max_in_flight -> Nullable<Int4>,
        offenses -> Nullable<Text>,
        previous_state -> Nullable<Text>,
    }
}

diesel::table! {
    trust_settings (name) {
        name -> Text,
        value -> Text,
        set_by -> Text,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    hosted_rooms (room_id) {
        room_id -> Text,
        guild_id -> Text,
        guild_name -> Text,
        default_channel_id -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    room_servers (room_id, server_name) {
        room_id -> Text,
        server_name -> Text,
        state -> Text,
        joined_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    room_members (room_id, user_id) {
        room_id -> Text,
        user_id -> Text,
        server_name -> Text,
        membership -> Text,
        event_id -> Nullable<Text>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    outbound_queue (id) {
        id -> Int8,
        destination -> Text,
        event_id -> Text,
        status -> Text,
        attempts -> Int4,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        delivered_at -> Nullable<Timestamptz>,
        last_error -> Nullable<Text>,
        dead_reason -> Nullable<Text>,
        event_seq -> Int8,
        order_provides -> Array<Int8>,
        order_waits -> Array<Int8>,
    }
}

diesel::table! {
    outbound_deferrals (destination, room_id) {
        destination -> Text,
        room_id -> Text,
        from_seq -> Int8,
        until_seq -> Nullable<Int8>,
        touched -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    delivery_attempts (id) {
        id -> Int8,
        outbound_id -> Nullable<Int8>,
        destination -> Text,
        event_id -> Nullable<Text>,
        request_kind -> Text,
        attempt -> Int4,
        status_code -> Nullable<Int4>,
        error_class -> Nullable<Text>,
        latency_ms -> Nullable<Int4>,
        response_excerpt -> Nullable<Text>,
        attempted_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    destination_health (destination) {
        destination -> Text,
        state -> Text,
        consecutive_failures -> Int4,
        consecutive_forbidden -> Int4,
        backoff_until -> Nullable<Timestamptz>,
        last_success_at -> Nullable<Timestamptz>,
        last_error_at -> Nullable<Timestamptz>,
        last_error -> Nullable<Text>,
        last_status_code -> Nullable<Int4>,
        paused_reason -> Nullable<Text>,
        lease_owner -> Nullable<Text>,
        lease_until -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
        paused_by -> Nullable<Text>,
        version -> Int8,
    }
}

diesel::table! {
    inbound_feed (seq) {
        seq -> Int8,
        event_id -> Text,
        room_id -> Text,
        appended_at -> Timestamptz,
        txid -> Int8,
    }
}

diesel::table! {
    local_transactions (txn_id) {
        txn_id -> Text,
        request_sha256 -> Text,
        event_id -> Text,
        response -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    admin_audit (id) {
        id -> Int8,
        at -> Timestamptz,
        actor -> Text,
        action -> Text,
        target -> Nullable<Text>,
        filter -> Nullable<Text>,
        count -> Int8,
    }
}

diesel::joinable!(outbound_queue -> federation_events (event_id));
diesel::joinable!(delivery_attempts -> outbound_queue (outbound_id));
diesel::joinable!(inbound_feed -> federation_events (event_id));

diesel::allow_tables_to_appear_in_same_query!(
    federation_events,
    federation_server_keys,
    local_signing_keys,
    peers,
    peer_trust,
    hosted_rooms,
    room_servers,
    room_members,
    outbound_queue,
    outbound_deferrals,
    delivery_attempts,
    destination_health,
    inbound_feed,
    local_transactions,
    admin_audit,
    trust_settings,
);

/// Every table, for the schema test and `parafed migrate` output.
pub const TABLES: &[&str] = &[
    "federation_events",
    "federation_server_keys",
    "local_signing_keys",
    "peers",
    "peer_trust",
    "hosted_rooms",
    "room_servers",
    "room_members",
    "outbound_queue",
    "outbound_deferrals",
    "delivery_attempts",
    "destination_health",
    "inbound_feed",
    "local_transactions",
    "admin_audit",
    "trust_settings",
];
