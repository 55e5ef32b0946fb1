-- Public key of the NATS user issued to the instance's agent (revoked on delete).
ALTER TABLE instances ADD COLUMN agent_nats_user TEXT NOT NULL DEFAULT '';
