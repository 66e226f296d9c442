-- Deferred fan-out: a destination that is not healthy when an event of a room hosted
-- here is fanned out gets no outbound row for it. One row here says instead "the events
-- of this room stored after `from_seq` that this destination would receive have no
-- outbound row yet"; its drain writes them (in storage order, a window ahead of what it
-- sends) once it may send again. A room with a thousand dead servers then costs a fan-out
-- a thousand index lookups per batch, not a thousand rows per event (docs/architecture.md,
-- "Deferred fan-out"; src/store/deferrals.rs).
CREATE TABLE outbound_deferrals (
    destination TEXT NOT NULL,
    room_id     TEXT NOT NULL,
    -- Events of the room with seq > from_seq are owed (seq: federation_events.seq).
    from_seq    BIGINT NOT NULL,
    -- Set when the destination left the room: nothing after it is owed, and the row goes
    -- once the drain reached it.
    until_seq   BIGINT,
    -- Bumped by every fan-out that skipped the destination because of this row, in the
    -- statement that relies on it: a drain that ends the deferral deletes it only if
    -- untouched since it read it, so a skipped event either stops the end or (the row
    -- gone) gets its outbound row from the fan-out (src/delivery/deferral.rs).
    touched     BIGINT NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, room_id)
);
-- When a held event (from a quarantined peer) was released: fan-out never defers a
-- released event, so a drain's cursor may pass held events at once — their rows come
-- from their own fan-out — and a peer whose events keep being held cannot stall a room.
ALTER TABLE federation_events ADD COLUMN released_at TIMESTAMPTZ;
-- The drain reads a room's events after a cursor, in storage order.
CREATE INDEX federation_events_room_seq ON federation_events (room_id, seq);
