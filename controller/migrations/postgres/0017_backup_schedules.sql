-- Backup schedules (a Coffer extension of the API): a cron pattern per instance, run by the
-- leader's timers; every `full_every`-th run is a full backup and the others incrementals on the
-- latest; retention removes the schedule's own backups past `keep_last` / `keep_days`, never one
-- that a kept backup builds on. `next_run_ms` (Unix ms) is advanced in the transaction that starts
-- a run, so a run happens once whichever controller leads and however often one restarts.
CREATE TABLE backup_schedules (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    name TEXT NOT NULL,
    pattern TEXT NOT NULL,
    full_every BIGINT NOT NULL DEFAULT 1,
    keep_last BIGINT,
    keep_days BIGINT,
    next_run_ms BIGINT NOT NULL,
    runs BIGINT NOT NULL DEFAULT 0,
    last_run TEXT,
    last_result TEXT,
    created TEXT NOT NULL
);
CREATE INDEX backup_schedules_due ON backup_schedules (next_run_ms);
CREATE INDEX backup_schedules_project ON backup_schedules (project_id, created);
-- Which backups a schedule took (what its retention may remove).
CREATE TABLE scheduled_backups (
    backup_id TEXT PRIMARY KEY,
    schedule_id TEXT NOT NULL
);
CREATE INDEX scheduled_backups_schedule ON scheduled_backups (schedule_id);
