-- The expiry's index of waiting rows by age (`retention::expire`) had the same predicate
-- as the drains' index of a destination's waiting rows, so the planner could read a
-- destination's rows through it: every waiting row, filtered by destination, then
-- sorted. With statistics taken while few rows waited it did, once the queue had grown
-- (a probe round's read of 256 destinations went through 31 000 rows for each: 1.4 s
-- instead of 5 ms; docs/performance.md, sixth round). Its predicate now also names
-- `created_at`, which only the expiry's condition implies: the drains' statements can
-- no longer use it, the expiry still does. (created_at is NOT NULL, so the predicate
-- selects the same rows; Postgres proves a partial index usable from the query's own
-- conditions, not from the column's constraint.) The index is built while the
-- migration holds outbound_queue: a few seconds per million waiting rows.
DROP INDEX outbound_queue_waiting_created;
CREATE INDEX outbound_queue_expiry ON outbound_queue (created_at)
    WHERE status = 'pending' AND created_at IS NOT NULL;
