-- Restore drills: the controller restores an instance's latest backup (rolled forward through
-- its archive where it can) into a throwaway instance, runs the datastore's own checks, deletes
-- the throwaway and keeps a report signed with its drill key.
CREATE TABLE restore_drills (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    -- RUNNING, PASSED or FAILED.
    status TEXT NOT NULL,
    -- The signed report (JSON text) and its signature (hex), with the signer's public key.
    report TEXT,
    signature TEXT,
    signer TEXT,
    created TEXT NOT NULL,
    finished TEXT
);
CREATE INDEX restore_drills_instance ON restore_drills (instance_id, created);
-- The tables a restore of the backup must hold (a JSON list), as its agent recorded them.
ALTER TABLE backups ADD COLUMN inventory TEXT;
-- Why the instance's last restore drill failed (cleared by one that passes).
ALTER TABLE instances ADD COLUMN drill_fault TEXT;
-- What a schedule runs: 'backup' or 'drill'.
ALTER TABLE backup_schedules ADD COLUMN kind TEXT NOT NULL DEFAULT 'backup';
