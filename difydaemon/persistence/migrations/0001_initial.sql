-- The tables of http-api.md §5.2.
--
-- One file serves PostgreSQL and SQLite: SQLite accepts PostgreSQL type
-- names (uuid and timestamptz get NUMERIC affinity there, which keeps UUID
-- and ISO-8601 text as text).  Deviation from the Go daemon: every tenant_id
-- is varchar(64), not uuid, so a tenant id that is not a UUID is not a
-- database error.  Statements are separated by a semicolon at the end of a
-- line; the runner splits on that, so no statement may contain one.

CREATE TABLE plugins (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    plugin_unique_identifier varchar(255) NOT NULL,
    plugin_id varchar(255) NOT NULL,
    refers bigint NOT NULL DEFAULT 0,
    install_type varchar(127) NOT NULL,
    manifest_type varchar(127) NOT NULL DEFAULT '',
    remote_declaration text,
    source varchar(63) NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX idx_plugin_unique_identifier ON plugins (plugin_unique_identifier);
CREATE INDEX idx_plugins_plugin_id ON plugins (plugin_id);
CREATE INDEX idx_plugins_install_type ON plugins (install_type);

CREATE TABLE plugin_installations (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    tenant_id varchar(64) NOT NULL,
    plugin_id varchar(255) NOT NULL,
    plugin_unique_identifier varchar(255) NOT NULL,
    runtime_type varchar(127) NOT NULL,
    endpoints_setups bigint NOT NULL DEFAULT 0,
    endpoints_active bigint NOT NULL DEFAULT 0,
    source varchar(63) NOT NULL DEFAULT '',
    meta text NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX idx_tenant_plugin ON plugin_installations (tenant_id, plugin_id);
CREATE INDEX idx_plugin_installations_plugin_id ON plugin_installations (plugin_id);
CREATE INDEX idx_plugin_installations_plugin_unique_identifier ON plugin_installations (plugin_unique_identifier);
-- the installation list is paged newest first per tenant
CREATE INDEX idx_plugin_installations_tenant_created ON plugin_installations (tenant_id, created_at);

CREATE TABLE plugin_declarations (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    plugin_unique_identifier varchar(255) NOT NULL,
    plugin_id varchar(255) NOT NULL,
    declaration text NOT NULL
);
CREATE UNIQUE INDEX idx_plugin_declarations_plugin_unique_identifier ON plugin_declarations (plugin_unique_identifier);
CREATE INDEX idx_plugin_declarations_plugin_id ON plugin_declarations (plugin_id);

CREATE TABLE tool_installations (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    tenant_id varchar(64) NOT NULL,
    provider varchar(127) NOT NULL,
    plugin_unique_identifier varchar(255) NOT NULL,
    plugin_id varchar(255) NOT NULL
);
CREATE INDEX idx_tool_installations_tenant_id ON tool_installations (tenant_id);
CREATE INDEX idx_tool_installations_provider ON tool_installations (provider);
CREATE INDEX idx_tool_installations_plugin_unique_identifier ON tool_installations (plugin_unique_identifier);
CREATE INDEX idx_tool_installations_plugin_id ON tool_installations (plugin_id);

CREATE TABLE ai_model_installations (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    tenant_id varchar(64) NOT NULL,
    provider varchar(127) NOT NULL,
    plugin_unique_identifier varchar(255) NOT NULL,
    plugin_id varchar(255) NOT NULL
);
CREATE INDEX idx_ai_model_installations_tenant_id ON ai_model_installations (tenant_id);
CREATE INDEX idx_ai_model_installations_provider ON ai_model_installations (provider);
CREATE INDEX idx_ai_model_installations_plugin_unique_identifier ON ai_model_installations (plugin_unique_identifier);
CREATE INDEX idx_ai_model_installations_plugin_id ON ai_model_installations (plugin_id);

CREATE TABLE agent_strategy_installations (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    tenant_id varchar(64) NOT NULL,
    provider varchar(127) NOT NULL,
    plugin_unique_identifier varchar(255) NOT NULL,
    plugin_id varchar(255) NOT NULL
);
CREATE INDEX idx_agent_strategy_installations_tenant_id ON agent_strategy_installations (tenant_id);
CREATE INDEX idx_agent_strategy_installations_provider ON agent_strategy_installations (provider);
CREATE INDEX idx_agent_strategy_installations_plugin_unique_identifier ON agent_strategy_installations (plugin_unique_identifier);
CREATE INDEX idx_agent_strategy_installations_plugin_id ON agent_strategy_installations (plugin_id);

CREATE TABLE datasource_installations (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    tenant_id varchar(64) NOT NULL,
    provider varchar(127) NOT NULL,
    plugin_unique_identifier varchar(255) NOT NULL,
    plugin_id varchar(255) NOT NULL
);
CREATE INDEX idx_datasource_installations_tenant_id ON datasource_installations (tenant_id);
CREATE INDEX idx_datasource_installations_provider ON datasource_installations (provider);
CREATE INDEX idx_datasource_installations_plugin_unique_identifier ON datasource_installations (plugin_unique_identifier);
CREATE INDEX idx_datasource_installations_plugin_id ON datasource_installations (plugin_id);

CREATE TABLE trigger_installations (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    tenant_id varchar(64) NOT NULL,
    provider varchar(127) NOT NULL,
    plugin_unique_identifier varchar(255) NOT NULL,
    plugin_id varchar(255) NOT NULL
);
CREATE INDEX idx_trigger_installations_tenant_id ON trigger_installations (tenant_id);
CREATE INDEX idx_trigger_installations_provider ON trigger_installations (provider);
CREATE INDEX idx_trigger_installations_plugin_unique_identifier ON trigger_installations (plugin_unique_identifier);
CREATE INDEX idx_trigger_installations_plugin_id ON trigger_installations (plugin_id);

CREATE TABLE endpoints (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    name varchar(127) NOT NULL DEFAULT 'default',
    hook_id varchar(127) NOT NULL,
    tenant_id varchar(64) NOT NULL,
    user_id varchar(64) NOT NULL,
    plugin_id varchar(64) NOT NULL,
    expired_at timestamptz NOT NULL,
    enabled boolean NOT NULL,
    settings text NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX idx_endpoints_hook_id ON endpoints (hook_id);
CREATE INDEX idx_endpoints_tenant_id ON endpoints (tenant_id);
CREATE INDEX idx_endpoints_user_id ON endpoints (user_id);
CREATE INDEX idx_endpoints_plugin_id ON endpoints (plugin_id);

CREATE TABLE install_tasks (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    status varchar(50) NOT NULL,
    tenant_id varchar(64) NOT NULL,
    total_plugins bigint NOT NULL,
    completed_plugins bigint NOT NULL,
    plugins text NOT NULL DEFAULT '[]'
);
CREATE INDEX idx_install_tasks_status ON install_tasks (status);
CREATE INDEX idx_install_tasks_tenant_id ON install_tasks (tenant_id);

CREATE TABLE serverless_runtimes (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    plugin_unique_identifier varchar(255) NOT NULL,
    function_url varchar(255) NOT NULL,
    function_name varchar(127) NOT NULL,
    type varchar(127) NOT NULL,
    checksum varchar(127) NOT NULL
);
CREATE UNIQUE INDEX idx_serverless_runtimes_plugin_unique_identifier ON serverless_runtimes (plugin_unique_identifier);
CREATE INDEX idx_serverless_runtimes_checksum ON serverless_runtimes (checksum);

CREATE TABLE tenant_storages (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    tenant_id varchar(255) NOT NULL,
    plugin_id varchar(255) NOT NULL,
    size bigint NOT NULL
);
CREATE INDEX idx_tenant_storages_tenant_id ON tenant_storages (tenant_id);
CREATE INDEX idx_tenant_storages_plugin_id ON tenant_storages (plugin_id);

CREATE TABLE plugin_readme_records (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    plugin_unique_identifier varchar(255) NOT NULL,
    language varchar(10) NOT NULL,
    content text NOT NULL
);
CREATE INDEX idx_plugin_readme_records_plugin_unique_identifier ON plugin_readme_records (plugin_unique_identifier);
-- Deviation: one README per (identifier, language), so saving one twice
-- replaces it instead of adding a duplicate.
CREATE UNIQUE INDEX idx_plugin_readme_records_identifier_language ON plugin_readme_records (plugin_unique_identifier, language);
