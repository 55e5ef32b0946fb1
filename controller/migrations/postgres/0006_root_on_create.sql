-- Datastore-version option: enable root at create and return its password in the response.
ALTER TABLE datastore_versions ADD COLUMN root_on_create BOOLEAN NOT NULL DEFAULT FALSE;
