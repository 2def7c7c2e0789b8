-- eldersafe schema v6: the staff API (issue 8; gateway/api).

-- Integrations log in with an API key: only its SHA-256 is kept; the key itself is
-- shown once. A key acts with a role inside one organisation, like a person.
CREATE TABLE api_keys (
    id              text PRIMARY KEY CHECK (id ~ '^[a-z0-9-]{1,64}$'),
    name            text NOT NULL,
    organisation_id text NOT NULL REFERENCES organisations (id),
    role            text NOT NULL CHECK (role IN ('duty', 'supervisor', 'street', 'bureau', 'admin')),
    key_sha256      bytea NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);

-- Tokens carry the staff row's token_version: raising it (password changed,
-- account disabled) ends every token issued before.
ALTER TABLE staff ADD COLUMN token_version integer NOT NULL DEFAULT 0;

-- Idempotency keys of the mutations clients retry (a double-tapped acknowledge is
-- one acknowledgement): the first answer is kept and replayed. Keys are per actor,
-- so nobody can read another's answer by guessing a key.
CREATE TABLE api_idempotency (
    actor       text NOT NULL,
    key         text NOT NULL,
    method      text NOT NULL,
    path        text NOT NULL,
    status      smallint NOT NULL,
    body        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (actor, key)
);
CREATE INDEX api_idempotency_age ON api_idempotency (created_at);

-- PIPL art. 28/51: every read of sensitive personal information (health readings,
-- locations) through the API: who, what, when, and the alert it served.
CREATE TABLE sensitive_reads (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time        timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    resident_id bigint,
    site_id     text,
    what        text NOT NULL,
    alert_id    uuid,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX sensitive_reads_resident ON sensitive_reads (resident_id, time);

-- Wake the live feed of every server when the change log grows (the feed still
-- reads in (xid, position) order; the notification only says "look now").
CREATE FUNCTION alert_changes_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('alert_changes', '');
    RETURN NULL;
END $$;
CREATE TRIGGER alert_changes_wake AFTER INSERT ON alert_changes
    FOR EACH STATEMENT EXECUTE FUNCTION alert_changes_wake();
