-- Root history (GET /root answers whether root is enabled) and per-project quota limits.
ALTER TABLE instances ADD COLUMN root_enabled BOOLEAN NOT NULL DEFAULT FALSE;
CREATE TABLE quotas (
    project_id TEXT NOT NULL,
    resource TEXT NOT NULL,
    hard_limit BIGINT NOT NULL,
    PRIMARY KEY (project_id, resource)
);
