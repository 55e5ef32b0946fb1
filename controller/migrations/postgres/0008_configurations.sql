-- Configuration groups: the parameters tenants may set per datastore version (loaded from a
-- rules file), the groups, and which group an instance has attached.
CREATE TABLE config_params (
    version_id TEXT NOT NULL,
    name TEXT NOT NULL,
    -- The rule as JSON (coffer_strategies::config_rules::ParamRule).
    rule TEXT NOT NULL,
    PRIMARY KEY (version_id, name)
);
CREATE TABLE configurations (
    id TEXT PRIMARY KEY,
    -- Insertion order (SQLite's rowid), the tie-break of lists sorted by creation time.
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    project_id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    datastore_version_id TEXT NOT NULL,
    -- JSON object: parameter name -> the tenant's JSON value.
    config_values TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX configurations_project ON configurations (project_id, deleted, created);
ALTER TABLE instances ADD COLUMN configuration_id TEXT;
