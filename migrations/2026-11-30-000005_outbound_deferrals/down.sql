DROP INDEX federation_events_room_seq;
DROP TABLE outbound_deferrals;
