-- Builds before drops, as in up.sql.
CREATE INDEX federation_events_origin ON federation_events (origin_server, received_at);
CREATE INDEX federation_events_received_from ON federation_events (received_from, status);
DROP INDEX federation_events_held_origin;
DROP INDEX federation_events_held_from;
