-- What happened to each intent, for progress reporting and exactly-once checks.
CREATE TABLE intents (
    id TEXT PRIMARY KEY,
    -- Insertion order (SQLite's rowid), the tie-break of lists sorted by creation time.
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    instance_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    progress BIGINT NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX intents_instance ON intents (instance_id, created);
-- What the instance's agent last said it supports (persisted on change only).
ALTER TABLE instances ADD COLUMN agent_version TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN capabilities TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN datastore_version_number TEXT NOT NULL DEFAULT '';
