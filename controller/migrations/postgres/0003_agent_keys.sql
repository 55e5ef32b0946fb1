-- The agent's X25519 public key: secrets in intents are sealed to it.
ALTER TABLE instances ADD COLUMN agent_public_key TEXT NOT NULL DEFAULT '';
