-- Modules: contents kept sealed to the controller's own key; which instances have which applied.
CREATE TABLE modules (
    id TEXT PRIMARY KEY,
    -- Insertion order (SQLite's rowid), the tie-break of lists sorted by creation time.
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    -- NULL: all tenants.
    project_id TEXT,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    description TEXT,
    contents_sealed TEXT NOT NULL,
    md5 TEXT NOT NULL,
    -- NULL: all datastores / versions.
    datastore TEXT,
    datastore_version TEXT,
    auto_apply BOOLEAN NOT NULL DEFAULT FALSE,
    visible BOOLEAN NOT NULL DEFAULT TRUE,
    live_update BOOLEAN NOT NULL DEFAULT FALSE,
    priority_apply BOOLEAN NOT NULL DEFAULT FALSE,
    apply_order BIGINT NOT NULL DEFAULT 5,
    is_admin BOOLEAN NOT NULL DEFAULT FALSE,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE instance_modules (
    instance_id TEXT NOT NULL,
    module_id TEXT NOT NULL,
    md5 TEXT NOT NULL,
    status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    updated TEXT NOT NULL,
    removed BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (instance_id, module_id)
);
