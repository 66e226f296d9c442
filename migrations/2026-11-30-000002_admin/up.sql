-- The operator's audit trail: one row per state-changing admin call (who, what, when,
-- the filter it was given and how many rows or jobs it changed). Never pruned by
-- retention: it is small and it is the record of what operators did.
CREATE TABLE admin_audit (
    id       BIGSERIAL PRIMARY KEY,
    at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    target   TEXT,
    filter   TEXT,
    count    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX admin_audit_at ON admin_audit (at DESC);
