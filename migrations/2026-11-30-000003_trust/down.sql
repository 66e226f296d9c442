DROP TABLE IF EXISTS trust_settings;
ALTER TABLE peer_trust DROP COLUMN IF EXISTS previous_state;
ALTER TABLE peer_trust DROP COLUMN IF EXISTS offenses;
ALTER TABLE peer_trust DROP COLUMN IF EXISTS max_in_flight;
ALTER TABLE peer_trust DROP COLUMN IF EXISTS set_by;
DELETE FROM peer_trust WHERE state = 'none';
ALTER TABLE peer_trust DROP CONSTRAINT peer_trust_state_check;
ALTER TABLE peer_trust ADD CONSTRAINT peer_trust_state_check
    CHECK (state IN ('allow', 'block', 'quarantine'));
