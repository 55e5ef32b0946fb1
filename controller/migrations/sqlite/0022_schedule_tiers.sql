-- Retention tiers of a backup schedule: besides keep_last and keep_days, keep the newest
-- backup of each of the last N days, ISO weeks and months that have one.
ALTER TABLE backup_schedules ADD COLUMN keep_daily INTEGER;
ALTER TABLE backup_schedules ADD COLUMN keep_weekly INTEGER;
ALTER TABLE backup_schedules ADD COLUMN keep_monthly INTEGER;
