-- Durable workflows: a multi-step operation (switchover, failover) persisted step by step, so a
-- controller that restarts resumes it. `state` is the workflow's own JSON (its step included).
CREATE TABLE workflows (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    done BOOLEAN NOT NULL DEFAULT FALSE,
    cancel BOOLEAN NOT NULL DEFAULT FALSE,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
-- The instances a running workflow owns: at most one workflow per instance (the primary key),
-- so two operations racing on one instance cannot both start.
CREATE TABLE workflow_members (
    instance_id TEXT PRIMARY KEY,
    workflow_id TEXT NOT NULL REFERENCES workflows(id) ON DELETE CASCADE
);
