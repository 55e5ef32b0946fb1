-- Replication: which source an instance replicates from, the source's replication user (its
-- password sealed to the controller's own key), the strategy, and whether an old source was
-- ejected (it stays fenced). Replication snapshots are backups deleted once used.
ALTER TABLE instances ADD COLUMN replica_of TEXT;
ALTER TABLE instances ADD COLUMN repl_user TEXT;
ALTER TABLE instances ADD COLUMN repl_secret TEXT;
ALTER TABLE instances ADD COLUMN repl_strategy TEXT;
ALTER TABLE instances ADD COLUMN ejected BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE backups ADD COLUMN snapshot_for TEXT;
