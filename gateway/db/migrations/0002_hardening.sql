-- eldersafe schema v2: what the hardening of ingest, the broker session and the
-- downlink needs. Each section belongs to one part of the server.

-- Dead letters keep a bounded prefix of a huge payload with its full length and
-- a digest; the digest makes a redelivered dead letter one row, not two.
-- digest = sha256(topic, 0x00, payload); occurrences counts fresh repeats of the
-- same bytes, not redeliveries (MQTT DUP flag set). reason_class is one of the
-- fixed classes of the dead-letter metric.
ALTER TABLE dead_letters
    ADD COLUMN payload_length   integer,
    ADD COLUMN digest           bytea,
    ADD COLUMN occurrences      integer NOT NULL DEFAULT 1,
    ADD COLUMN last_received_at timestamptz,
    ADD COLUMN reason_class     text CHECK (reason_class IN
        ('topic', 'json', 'schema', 'range', 'database', 'internal'));
CREATE UNIQUE INDEX dead_letters_digest ON dead_letters (digest);

-- Sites that sent messages but are not registered in `sites`. Their messages
-- are stored as usual (an SOS is never dropped over an administrative lapse);
-- this table is what an operator looks at to register them. `messages` counts
-- deliveries, so a redelivery after a crash may count twice.
CREATE TABLE unregistered_sources (
    site_id    text PRIMARY KEY,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    messages   bigint NOT NULL DEFAULT 0
);

-- The edge's answer to each downlink command (…/{device}/command/result):
-- one row per command id, however often the answer is redelivered.
CREATE TABLE command_results (
    command_id  uuid PRIMARY KEY,
    site_id     text NOT NULL,
    device_id   text NOT NULL,
    action      text NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('executed', 'refused', 'unreachable')),
    reason      text,
    via         text,
    alert_id    uuid,
    time        timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX command_results_alert ON command_results (alert_id) WHERE alert_id IS NOT NULL;
CREATE INDEX command_results_device ON command_results (site_id, device_id, time DESC);

-- Incidents of the server's own MQTT session (a session the broker lost or that
-- another client took over): what the console shows as the server's health.
CREATE TABLE mqtt_session_incidents (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time      timestamptz NOT NULL DEFAULT now(),
    client_id text NOT NULL,
    kind      text NOT NULL CHECK (kind IN ('session_lost', 'taken_over')),
    detail    text NOT NULL DEFAULT ''
);
CREATE INDEX mqtt_session_incidents_time ON mqtt_session_incidents (time DESC);

-- When each server account's session was last seen alive, with the expiry it
-- asked for: a restarted server whose broker has no session although
-- last_seen_at + expiry_s lies ahead reports the session as lost. The broker
-- names a session after its account, so client_id is the server's user name.
CREATE TABLE mqtt_server_sessions (
    client_id    text PRIMARY KEY,
    last_seen_at timestamptz NOT NULL,
    expiry_s     integer NOT NULL CHECK (expiry_s >= 0)
);
