-- Modules: contents kept sealed to the controller's own key; which instances have which applied.
CREATE TABLE modules (
    id TEXT PRIMARY KEY,
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
    auto_apply INTEGER NOT NULL DEFAULT 0,
    visible INTEGER NOT NULL DEFAULT 1,
    live_update INTEGER NOT NULL DEFAULT 0,
    priority_apply INTEGER NOT NULL DEFAULT 0,
    apply_order INTEGER NOT NULL DEFAULT 5,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE instance_modules (
    instance_id TEXT NOT NULL,
    module_id TEXT NOT NULL,
    md5 TEXT NOT NULL,
    status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    updated TEXT NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (instance_id, module_id)
);
