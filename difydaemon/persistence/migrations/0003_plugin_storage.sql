-- Plugin key/value storage (http-api.md §5.7, runtimes.md §4.2 `storage`).
--
-- The Go daemon keeps each value as an object-store file under
-- PERSISTENCE_STORAGE_PATH/<tenant_id>/<plugin_id>/<key> and only the byte
-- count in tenant_storages.  Here the values are rows too, so that a value
-- and the count that accounts for it change in one transaction.
--
-- `key` is the cleaned key (the service refuses keys over 256 bytes, so 256
-- characters always fit).  `bytea` is the PostgreSQL binary type; SQLite
-- gives the column NUMERIC affinity, which stores a bytes parameter as a
-- BLOB unchanged.

CREATE TABLE plugin_storages (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    tenant_id varchar(255) NOT NULL,
    plugin_id varchar(255) NOT NULL,
    key varchar(256) NOT NULL,
    value bytea NOT NULL
);
CREATE UNIQUE INDEX idx_plugin_storages_tenant_plugin_key
    ON plugin_storages (tenant_id, plugin_id, key);

-- One accounting row per (tenant, plugin): the first writes of two sessions
-- racing both insert "if absent" and then lock the one row.
CREATE UNIQUE INDEX idx_tenant_storages_tenant_plugin ON tenant_storages (tenant_id, plugin_id);
