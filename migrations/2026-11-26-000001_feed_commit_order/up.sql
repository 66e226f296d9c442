-- The inbound feed is read in commit order. A BIGSERIAL alone is not: two transactions
-- can take seq 5 and 6 and commit 6 first, and a reader that saw 6 would never see 5.
-- Each entry records the id of the transaction that wrote it; readers page on
-- (txid, seq) and show only entries of transactions older than every transaction still
-- running (pg_snapshot_xmin), so no entry can later appear behind a position already read.
ALTER TABLE inbound_feed
    ADD COLUMN txid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX inbound_feed_position ON inbound_feed (txid, seq);
