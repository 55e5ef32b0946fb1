-- How many closed change files the instance's agent has stored whole: when it grows, the
-- controller removes the pieces those files were stored in before.
ALTER TABLE instances ADD COLUMN archive_compactions INTEGER;
