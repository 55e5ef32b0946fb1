-- The NATS authority's revocations (the user keys of deleted agents, with when), shared by every
-- controller on the store: the account JWT any of them pushes carries them all.
CREATE TABLE nats_revocations (
    user_key TEXT PRIMARY KEY,
    revoked_at BIGINT NOT NULL
);
