-- The key a backup is sealed with, as the controller issued it (`<operator key id>:<instance>`);
-- NULL for backups taken before keys were per instance.
ALTER TABLE backups ADD COLUMN key_id TEXT;
