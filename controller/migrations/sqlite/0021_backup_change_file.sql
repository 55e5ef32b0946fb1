-- The change-log file a backup's position is in, as its agent reported it: archived files
-- before the oldest kept backup's are removed (no point of the recovery window needs them).
ALTER TABLE backups ADD COLUMN change_file TEXT;
