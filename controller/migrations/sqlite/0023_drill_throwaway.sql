-- A restore drill's throwaway instance: outside its project's quota while it lives.
ALTER TABLE restore_drills ADD COLUMN throwaway_id TEXT;
