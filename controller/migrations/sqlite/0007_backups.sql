CREATE TABLE backups (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    status TEXT NOT NULL,
    parent_id TEXT,
    datastore_version_id TEXT NOT NULL,
    size_bytes INTEGER,
    checksum TEXT,
    location TEXT,
    progress TEXT NOT NULL DEFAULT '',
    fault TEXT,
    intent_id TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX backups_project ON backups (project_id, deleted, created);
CREATE INDEX backups_intent ON backups (intent_id);
