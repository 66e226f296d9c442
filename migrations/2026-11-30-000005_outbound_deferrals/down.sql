DROP INDEX federation_events_room_seq;
ALTER TABLE federation_events DROP COLUMN released_at;
DROP TABLE outbound_deferrals;
