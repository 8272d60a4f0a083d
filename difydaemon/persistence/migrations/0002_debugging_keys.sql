-- Remote debugging keys (http-api.md §2.7, runtimes.md §2.1).
--
-- The Go daemon keeps them in Redis both ways with a 2 h TTL; here they are
-- rows, so that a key handed to a developer survives a daemon restart.  One
-- key per tenant, and a key names one tenant.  Expired rows are not deleted:
-- the next request for the tenant's key replaces the expired one in place.

CREATE TABLE debugging_keys (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    tenant_id varchar(64) NOT NULL,
    key varchar(64) NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX idx_debugging_keys_tenant_id ON debugging_keys (tenant_id);
CREATE UNIQUE INDEX idx_debugging_keys_key ON debugging_keys (key);
