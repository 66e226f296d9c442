-- The delivery core: events keep their storage order, outbound rows carry what they
-- depend on, attempts are recorded before the request leaves, destination states are
-- typed. Unused parts of the first schema go.

-- Storage order of events: the order dependants are sent in (docs/architecture.md,
-- "Delivery order"). Existing rows are numbered in table order.
ALTER TABLE federation_events ADD COLUMN seq BIGINT GENERATED ALWAYS AS IDENTITY;
-- Events that may still get outbound rows (not yet verified, held from a quarantined
-- origin, or accepted and not yet fanned out): the deliver job looks these up by room
-- to hold back their dependants.
CREATE INDEX federation_events_unsettled_room ON federation_events (room_id, seq)
    WHERE status IN ('pending', 'held') OR (status = 'accepted' AND fanned_out_at IS NULL);

-- Outbound rows: the event's storage order and its ordering keys (hashes; see
-- src/delivery/order.rs). 'inflight' was never written: a row is pending until settled.
ALTER TABLE outbound_queue
    ADD COLUMN event_seq BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN order_provides BIGINT[] NOT NULL DEFAULT '{}',
    ADD COLUMN order_waits BIGINT[] NOT NULL DEFAULT '{}';
UPDATE outbound_queue o SET event_seq = e.seq FROM federation_events e WHERE e.event_id = o.event_id;
UPDATE outbound_queue SET status = 'pending' WHERE status = 'inflight';
ALTER TABLE outbound_queue DROP CONSTRAINT outbound_queue_status_check;
ALTER TABLE outbound_queue ADD CONSTRAINT outbound_queue_status_check
    CHECK (status IN ('pending', 'delivered', 'dead', 'cancelled'));
-- Retry timing is per destination (destination_health.backoff_until), never per row.
DROP INDEX outbound_queue_due;
ALTER TABLE outbound_queue DROP COLUMN next_attempt_at;
-- Drain a destination's backlog in event order.
DROP INDEX outbound_queue_destination_pending;
CREATE INDEX outbound_queue_destination_waiting ON outbound_queue (destination, event_seq, id)
    WHERE status = 'pending';
-- Expiry: waiting rows by age.
CREATE INDEX outbound_queue_waiting_created ON outbound_queue (created_at)
    WHERE status = 'pending';

-- Attempts are written when the request starts; `finished_at` is set with its result.
-- A row left open by a sender that died is closed as 'interrupted'.
ALTER TABLE delivery_attempts ADD COLUMN finished_at TIMESTAMPTZ;
UPDATE delivery_attempts SET finished_at = attempted_at;
ALTER TABLE delivery_attempts ALTER COLUMN latency_ms DROP NOT NULL;
CREATE INDEX delivery_attempts_open ON delivery_attempts (destination)
    WHERE finished_at IS NULL;

-- Destination states (src/delivery/destination.rs): healthy, backing_off, held
-- (quarantine), paused (operator). `version` makes saves of stale copies fail.
ALTER TABLE destination_health DROP CONSTRAINT destination_health_state_check;
UPDATE destination_health SET state = CASE
    WHEN state = 'backoff' AND paused_reason IS NOT NULL THEN 'held'
    WHEN state = 'backoff' THEN 'backing_off'
    ELSE state END;
UPDATE destination_health SET backoff_until = now()
    WHERE state IN ('backing_off', 'held') AND backoff_until IS NULL;
ALTER TABLE destination_health ADD CONSTRAINT destination_health_state_check
    CHECK (state IN ('healthy', 'backing_off', 'held', 'paused'));
ALTER TABLE destination_health
    ADD COLUMN paused_by TEXT,
    ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
DROP INDEX destination_health_backoff;
CREATE INDEX destination_health_due ON destination_health (backoff_until)
    WHERE state IN ('backing_off', 'held');

-- Feed consumers keep their own position (an opaque `next_since`); nothing used this.
DROP TABLE feed_cursors;

-- The held-events gauge (and the quarantine release / purge to come) count held events.
CREATE INDEX federation_events_held ON federation_events (received_at)
    WHERE status = 'held';

-- The envelope signature was verified before the event was stored (a relayed event
-- whose origin's keys could not be had is stored unchecked and left to verify). A
-- checked copy replaces an unchecked pending or held one with the same id, so a forged
-- or unverifiable copy can never make the real event answer `inserted: false`.
ALTER TABLE federation_events ADD COLUMN signature_checked BOOLEAN NOT NULL DEFAULT false;
