-- Each continuous period of an instance's archive (a new one after a hole, or when a source
-- that became a replica is a source again) as its agent last reported it.
CREATE TABLE archive_periods (
    instance_id TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    latest_ms INTEGER NOT NULL,
    first_position TEXT NOT NULL DEFAULT '',
    last_position TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (instance_id, since_ms)
);
-- A replica that became the source (switchover or failover): the source before it, the
-- position it had (everything up to it came from that source), and when (before it was
-- promoted).
CREATE TABLE archive_handovers (
    instance_id TEXT NOT NULL,
    from_instance TEXT NOT NULL,
    position TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (instance_id, at_ms)
);
CREATE INDEX archive_handovers_from ON archive_handovers (from_instance, at_ms);
