CREATE TABLE datastores (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    default_version_id TEXT
);
CREATE TABLE datastore_versions (
    id TEXT PRIMARY KEY,
    datastore_id TEXT NOT NULL REFERENCES datastores(id),
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    manager TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    UNIQUE (datastore_id, name)
);
CREATE TABLE flavors (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    ram INTEGER NOT NULL,
    vcpus INTEGER NOT NULL,
    disk INTEGER NOT NULL
);
CREATE TABLE version_flavors (
    version_id TEXT NOT NULL REFERENCES datastore_versions(id),
    flavor_id TEXT NOT NULL REFERENCES flavors(id),
    PRIMARY KEY (version_id, flavor_id)
);
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    name TEXT NOT NULL,
    flavor_id TEXT NOT NULL,
    datastore_version_id TEXT NOT NULL,
    volume_size INTEGER NOT NULL,
    task TEXT NOT NULL,
    task_started TEXT NOT NULL,
    service_status TEXT NOT NULL,
    fault TEXT,
    fault_at TEXT,
    server_id INTEGER NOT NULL,
    host TEXT,
    port INTEGER,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX instances_project ON instances (project_id, deleted, created);
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    intent_id TEXT NOT NULL UNIQUE,
    instance_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('server_id', 0);
