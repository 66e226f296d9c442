-- parafed's schema. Postgres is the system of record: every piece of work a Redis job
-- carries can be rebuilt from these rows (see docs/architecture.md).
--
-- federation_events and federation_server_keys keep Paracord's names; the rest are
-- parafed's support tables. Times that travel on the wire (origin_ts, depth,
-- valid_until) are Unix ms BIGINTs as on the wire; times parafed keeps for itself are
-- TIMESTAMPTZ.

-- Every event we hold: peers' events and our own. `content` and `signatures` are the
-- exact serde_json text (not JSONB, which would not keep number spellings such as -0.0
-- or 1e+21 that the signature covers), so the wire body can be rebuilt byte for byte.
CREATE TABLE federation_events (
    event_id       TEXT PRIMARY KEY,
    room_id        TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    sender         TEXT NOT NULL,
    origin_server  TEXT NOT NULL,
    origin_ts      BIGINT NOT NULL,
    content        TEXT NOT NULL,
    depth          BIGINT NOT NULL,
    state_key      TEXT,
    signatures     TEXT NOT NULL,
    -- The server that handed us the event (differs from origin_server for relayed
    -- events); NULL for events we created.
    received_from  TEXT,
    -- pending: stored, not yet verified; accepted; rejected (reason kept); held: from a
    -- quarantined peer, kept but neither applied nor relayed.
    status         TEXT NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'accepted', 'rejected', 'held')),
    reject_reason  TEXT,
    received_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    verified_at    TIMESTAMPTZ,
    -- Last time a job for this row (verify, or fanout for our own events) was pushed to
    -- Redis; the reconciler re-pushes rows whose work is unfinished and stale.
    enqueued_at    TIMESTAMPTZ,
    -- Fan-out wrote this event's outbound rows.
    fanned_out_at  TIMESTAMPTZ
);
-- GET /events?room_id&since_depth pages on depth within a room.
CREATE INDEX federation_events_room_depth ON federation_events (room_id, depth);
-- Reconciler: unverified events and accepted events not yet fanned out.
CREATE INDEX federation_events_pending ON federation_events (enqueued_at)
    WHERE status = 'pending';
CREATE INDEX federation_events_unfanned ON federation_events (enqueued_at)
    WHERE status = 'accepted' AND fanned_out_at IS NULL;
-- Admin: a peer's events, newest first (quarantine release / purge).
CREATE INDEX federation_events_origin ON federation_events (origin_server, received_at);
CREATE INDEX federation_events_received_from ON federation_events (received_from, status);

-- Peers' public keys, as fetched from their /keys. valid_until is "refetch after".
CREATE TABLE federation_server_keys (
    server_name    TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    public_key     TEXT NOT NULL,
    valid_until    BIGINT NOT NULL,
    fetched_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (server_name, key_id)
);

-- Our own signing keys. Exactly one is active; retired keys stay published and usable
-- for verification until verify_until.
CREATE TABLE local_signing_keys (
    key_id         TEXT PRIMARY KEY,
    seed           BYTEA NOT NULL CHECK (octet_length(seed) = 32),
    public_key     TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('active', 'retired')),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    retired_at     TIMESTAMPTZ,
    verify_until   TIMESTAMPTZ
);
CREATE UNIQUE INDEX local_signing_keys_one_active ON local_signing_keys (status)
    WHERE status = 'active';

-- Where peers are: a configured base URL or what discovery found.
CREATE TABLE peers (
    server_name          TEXT PRIMARY KEY,
    base_url             TEXT,
    federation_endpoint  TEXT,
    domain               TEXT,
    discovered_at        TIMESTAMPTZ,
    last_discovery_error TEXT,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Operator decisions about a peer (no row = the mode's default).
CREATE TABLE peer_trust (
    server_name            TEXT PRIMARY KEY,
    state                  TEXT NOT NULL CHECK (state IN ('allow', 'block', 'quarantine')),
    reason                 TEXT,
    until                  TIMESTAMPTZ,
    -- Inbound events per minute across the ingress fleet; NULL = the default limit.
    rate_limit_per_minute  INTEGER CHECK (rate_limit_per_minute IS NULL OR rate_limit_per_minute >= 0),
    automatic              BOOLEAN NOT NULL DEFAULT false,
    bad_signatures         BIGINT NOT NULL DEFAULT 0,
    rejected_events        BIGINT NOT NULL DEFAULT 0,
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX peer_trust_state ON peer_trust (state);

-- Rooms hosted here that federate, registered by the local Paracord app. Invites and
-- joins for any other room id on our domain are refused (403), as Paracord refuses guilds
-- outside its federation allowlist.
CREATE TABLE hosted_rooms (
    room_id             TEXT PRIMARY KEY,
    guild_id            TEXT NOT NULL,
    guild_name          TEXT NOT NULL,
    default_channel_id  TEXT,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Which servers are in each room hosted here (the fan-out set).
CREATE TABLE room_servers (
    room_id        TEXT NOT NULL,
    server_name    TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('joined', 'left')),
    joined_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, server_name)
);
CREATE INDEX room_servers_joined ON room_servers (room_id) WHERE state = 'joined';
CREATE INDEX room_servers_server ON room_servers (server_name);

-- Room membership per user: who may send into a room.
CREATE TABLE room_members (
    room_id        TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    server_name    TEXT NOT NULL,
    membership     TEXT NOT NULL CHECK (membership IN ('invited', 'joined', 'left')),
    event_id       TEXT,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_room_server ON room_members (room_id, server_name);

-- One row per (destination, event) to deliver. Delivery state that outlives a job lives
-- here and in destination_health, never only in Redis.
CREATE TABLE outbound_queue (
    id               BIGSERIAL PRIMARY KEY,
    destination      TEXT NOT NULL,
    event_id         TEXT NOT NULL REFERENCES federation_events (event_id) ON DELETE CASCADE,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'inflight', 'delivered', 'dead', 'cancelled')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at     TIMESTAMPTZ,
    last_error       TEXT,
    dead_reason      TEXT,
    UNIQUE (destination, event_id)
);
-- Drain a destination's backlog in order.
CREATE INDEX outbound_queue_destination_pending ON outbound_queue (destination, id)
    WHERE status IN ('pending', 'inflight');
-- Reconciler and expiry: due and old work.
CREATE INDEX outbound_queue_due ON outbound_queue (next_attempt_at)
    WHERE status IN ('pending', 'inflight');
-- Admin: by state, newest first; "why was event X not delivered to Y".
CREATE INDEX outbound_queue_status ON outbound_queue (status, updated_at);
CREATE INDEX outbound_queue_event ON outbound_queue (event_id);

-- Every delivery attempt: events, and outbound invite / join / leave requests.
CREATE TABLE delivery_attempts (
    id                BIGSERIAL PRIMARY KEY,
    outbound_id       BIGINT REFERENCES outbound_queue (id) ON DELETE CASCADE,
    destination       TEXT NOT NULL,
    event_id          TEXT,
    request_kind      TEXT NOT NULL CHECK (request_kind IN ('event', 'invite', 'join', 'leave', 'keys', 'discovery')),
    attempt           INTEGER NOT NULL,
    status_code       INTEGER,
    -- connect, timeout, tls, protocol, http_4xx, http_5xx, … (bounded set)
    error_class       TEXT,
    latency_ms        INTEGER NOT NULL,
    response_excerpt  TEXT,
    attempted_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX delivery_attempts_outbound ON delivery_attempts (outbound_id, attempt);
CREATE INDEX delivery_attempts_destination ON delivery_attempts (destination, attempted_at);
CREATE INDEX delivery_attempts_event ON delivery_attempts (event_id);
CREATE INDEX delivery_attempts_attempted_at ON delivery_attempts (attempted_at);

-- Per-destination delivery state, owned in one place: a dead peer costs this row and its
-- pending outbound rows, never a storm of retrying jobs.
CREATE TABLE destination_health (
    destination           TEXT PRIMARY KEY,
    state                 TEXT NOT NULL DEFAULT 'healthy'
                          CHECK (state IN ('healthy', 'backoff', 'paused')),
    consecutive_failures  INTEGER NOT NULL DEFAULT 0,
    consecutive_forbidden INTEGER NOT NULL DEFAULT 0,
    backoff_until         TIMESTAMPTZ,
    last_success_at       TIMESTAMPTZ,
    last_error_at         TIMESTAMPTZ,
    last_error            TEXT,
    last_status_code      INTEGER,
    paused_reason         TEXT,
    -- One drain at a time per destination, fleet-wide: the worker holding the lease is
    -- the only one sending to it, so at most `window` requests are ever in flight.
    lease_owner           TEXT,
    lease_until           TIMESTAMPTZ,
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX destination_health_backoff ON destination_health (backoff_until)
    WHERE state = 'backoff';
CREATE INDEX destination_health_state ON destination_health (state);

-- The inbound feed the local Paracord app reads: accepted events in the order parafed
-- accepted them. A reader pages with `seq > cursor`.
CREATE TABLE inbound_feed (
    seq            BIGSERIAL PRIMARY KEY,
    event_id       TEXT NOT NULL UNIQUE REFERENCES federation_events (event_id) ON DELETE CASCADE,
    room_id        TEXT NOT NULL,
    appended_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX inbound_feed_room ON inbound_feed (room_id, seq);

-- Named consumers' positions in the inbound feed.
CREATE TABLE feed_cursors (
    consumer       TEXT PRIMARY KEY,
    seq            BIGINT NOT NULL DEFAULT 0,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Local API idempotency: one event per client transaction id.
CREATE TABLE local_transactions (
    txn_id         TEXT PRIMARY KEY,
    request_sha256 TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    response       TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX local_transactions_created ON local_transactions (created_at);
