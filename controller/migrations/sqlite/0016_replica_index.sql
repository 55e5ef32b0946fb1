-- A heartbeat's reply says whether its instance has replicas: found by index, not by reading every
-- instance (a full scan per heartbeat at fleet size).
CREATE INDEX instances_replica_of ON instances (replica_of);
