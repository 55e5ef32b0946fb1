-- Several controllers on one store: a duty that runs on one controller at a time (publishing the
-- outbox, the timers) is held by a lease until `expires_ms` (the store's clock, Unix ms); each
-- controller also keeps a lease on its own name while it lives.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);
-- The controller driving a workflow and until when; once that lapses another adopts it.
ALTER TABLE workflows ADD COLUMN owner TEXT;
ALTER TABLE workflows ADD COLUMN lease_ms BIGINT NOT NULL DEFAULT 0;
-- The controller placing a create (the row is keyless until its agent is up): only that one, or
-- another once it is gone, undoes a create cut short.
ALTER TABLE instances ADD COLUMN placing_by TEXT;
