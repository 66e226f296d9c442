DROP INDEX inbound_feed_position;
ALTER TABLE inbound_feed DROP COLUMN txid;
