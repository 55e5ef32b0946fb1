-- Root history (GET /root answers whether root is enabled) and per-project quota limits.
ALTER TABLE instances ADD COLUMN root_enabled INTEGER NOT NULL DEFAULT 0;
CREATE TABLE quotas (
    project_id TEXT NOT NULL,
    resource TEXT NOT NULL,
    hard_limit INTEGER NOT NULL,
    PRIMARY KEY (project_id, resource)
);
