-- One-time enrolment tokens: a host (or a booting VM) joins with one; only its hash is kept.
CREATE TABLE enrolment_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    project_id TEXT NOT NULL,
    name TEXT NOT NULL,
    datastore_version_id TEXT NOT NULL,
    flavor_id TEXT NOT NULL,
    volume_size BIGINT NOT NULL,
    -- Set at creation for a VM the controller boots, at first use for a host.
    instance_id TEXT,
    -- Bound on first use: a retry with the same key gets the same answer.
    public_key TEXT,
    -- The agent's NATS creds, sealed to the controller's own key.
    creds_sealed BYTEA,
    created TEXT NOT NULL,
    expires_unix BIGINT NOT NULL,
    used_at TEXT
);
-- How the instance's agent was placed: 'provisioner' (the configured one: local processes or
-- VMs) or 'enrolled' (a host that joined by itself; the controller starts and removes nothing).
ALTER TABLE instances ADD COLUMN placement TEXT NOT NULL DEFAULT 'provisioner';
