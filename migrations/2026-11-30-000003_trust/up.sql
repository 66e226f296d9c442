-- Trust an operator can run (parafed admin peers …).
-- 'none': no decision, the row only holds the peer's own limits.
ALTER TABLE peer_trust DROP CONSTRAINT peer_trust_state_check;
ALTER TABLE peer_trust ADD CONSTRAINT peer_trust_state_check
    CHECK (state IN ('none', 'allow', 'block', 'quarantine'));
-- Who made the decision (the admin token's name, or `parafed` for an automatic one).
ALTER TABLE peer_trust ADD COLUMN set_by TEXT;
-- Requests of this peer in flight at once per ingress process; NULL = the default.
ALTER TABLE peer_trust ADD COLUMN max_in_flight INTEGER
    CHECK (max_in_flight IS NULL OR max_in_flight >= 1);
-- An automatic quarantine's offence counts (JSON), kept with the decision.
ALTER TABLE peer_trust ADD COLUMN offenses TEXT;
-- While quarantined: the state to return to when the quarantine ends.
ALTER TABLE peer_trust ADD COLUMN previous_state TEXT
    CHECK (previous_state IS NULL OR previous_state IN ('none', 'allow', 'block'));

-- Fleet-wide settings an operator changes without a restart (the federation mode).
CREATE TABLE trust_settings (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    set_by      TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
