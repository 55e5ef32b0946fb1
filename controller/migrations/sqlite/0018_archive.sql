-- Point-in-time recovery: what each source's agent reports of its continuous archive (since
-- when it has run without a hole, until when everything written is stored; Unix ms), and of
-- each backup whether its position is in that archive (the archive's `since` when it was taken)
-- and when it completed (Unix ms): the recovery window runs from the first such backup.
ALTER TABLE instances ADD COLUMN archive_since_ms INTEGER;
ALTER TABLE instances ADD COLUMN archive_latest_ms INTEGER;
ALTER TABLE instances ADD COLUMN archive_fault TEXT;
ALTER TABLE backups ADD COLUMN archive_since_ms INTEGER;
ALTER TABLE backups ADD COLUMN completed_ms INTEGER;
