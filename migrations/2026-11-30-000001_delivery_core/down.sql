ALTER TABLE federation_events DROP COLUMN signature_checked;
DROP INDEX federation_events_held;

CREATE TABLE feed_cursors (
    consumer       TEXT PRIMARY KEY,
    seq            BIGINT NOT NULL DEFAULT 0,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

DROP INDEX destination_health_due;
ALTER TABLE destination_health DROP COLUMN version, DROP COLUMN paused_by;
ALTER TABLE destination_health DROP CONSTRAINT destination_health_state_check;
UPDATE destination_health SET state = 'backoff' WHERE state IN ('backing_off', 'held');
ALTER TABLE destination_health ADD CONSTRAINT destination_health_state_check
    CHECK (state IN ('healthy', 'backoff', 'paused'));
CREATE INDEX destination_health_backoff ON destination_health (backoff_until)
    WHERE state = 'backoff';

DROP INDEX delivery_attempts_open;
UPDATE delivery_attempts SET latency_ms = 0 WHERE latency_ms IS NULL;
ALTER TABLE delivery_attempts ALTER COLUMN latency_ms SET NOT NULL;
ALTER TABLE delivery_attempts DROP COLUMN finished_at;

DROP INDEX outbound_queue_waiting_created;
DROP INDEX outbound_queue_destination_waiting;
ALTER TABLE outbound_queue ADD COLUMN next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX outbound_queue_due ON outbound_queue (next_attempt_at)
    WHERE status IN ('pending', 'inflight');
CREATE INDEX outbound_queue_destination_pending ON outbound_queue (destination, id)
    WHERE status IN ('pending', 'inflight');
ALTER TABLE outbound_queue DROP CONSTRAINT outbound_queue_status_check;
ALTER TABLE outbound_queue ADD CONSTRAINT outbound_queue_status_check
    CHECK (status IN ('pending', 'inflight', 'delivered', 'dead', 'cancelled'));
ALTER TABLE outbound_queue DROP COLUMN order_waits, DROP COLUMN order_provides, DROP COLUMN event_seq;

DROP INDEX federation_events_unsettled_room;
ALTER TABLE federation_events DROP COLUMN seq;
