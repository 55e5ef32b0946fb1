CREATE TABLE backups (
    id TEXT PRIMARY KEY,
    -- Insertion order (SQLite's rowid), the tie-break of lists sorted by creation time.
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    project_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    status TEXT NOT NULL,
    parent_id TEXT,
    datastore_version_id TEXT NOT NULL,
    size_bytes BIGINT,
    checksum TEXT,
    location TEXT,
    progress TEXT NOT NULL DEFAULT '',
    fault TEXT,
    intent_id TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX backups_project ON backups (project_id, deleted, created);
CREATE INDEX backups_intent ON backups (intent_id);
