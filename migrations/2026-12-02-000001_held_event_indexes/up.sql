-- Every stored event wrote an entry into two indexes that only the quarantine's
-- operations and one admin filter read: federation_events_origin (origin_server,
-- received_at) and federation_events_received_from (received_from, status). The
-- quarantine's operations (release, purge and count a peer's held events,
-- `store::events`) always ask for held events; the indexes held an entry for every
-- event, written by its insert and again by its accept (a status change is never a HOT
-- update): four of the twelve index entries an event cost (docs/performance.md,
-- fourteenth round). Partial indexes of held events answer the same questions and cost
-- an event nothing unless it is held.
--
-- Given up: the admin listing filtered by origin alone (`parafed admin events list
-- --origin`) now reads the whole table and sorts it, as the listing without a filter
-- already did.
--
-- The new indexes are built before the old ones are dropped: a build only keeps writers
-- of federation_events waiting, a DROP INDEX holds the table against readers too until
-- the migration commits. Both builds read the table once each (0.34 s for both over a
-- million events here, warm cache).
CREATE INDEX federation_events_held_origin ON federation_events (origin_server)
    WHERE status = 'held';
CREATE INDEX federation_events_held_from ON federation_events (received_from)
    WHERE status = 'held';
DROP INDEX federation_events_origin;
DROP INDEX federation_events_received_from;
