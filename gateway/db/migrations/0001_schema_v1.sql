-- eldersafe schema v1. Works on TimescaleDB's Apache-2 edition: hypertables,
-- time_bucket and drop_chunks only (no compression, continuous aggregates or jobs).
CREATE EXTENSION IF NOT EXISTS timescaledb;

-- District bureau -> street centre -> community station / care institution.
CREATE TABLE organisations (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9-]{1,64}$'),
    parent_id   text REFERENCES organisations (id),
    kind        text NOT NULL CHECK (kind IN ('bureau', 'street', 'station', 'institution')),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'bureau') = (parent_id IS NULL))
);
CREATE INDEX organisations_parent ON organisations (parent_id);

-- A monitored place: an elder's home ("home care bed") or a room in an institution.
CREATE TABLE sites (
    id              text PRIMARY KEY CHECK (id ~ '^[a-z0-9-]{1,64}$'),
    organisation_id text NOT NULL REFERENCES organisations (id),
    kind            text NOT NULL CHECK (kind IN ('home', 'room')),
    name            text NOT NULL,
    address         text,
    latitude        double precision,
    longitude       double precision,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sites_organisation ON sites (organisation_id);

CREATE TABLE residents (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site_id              text NOT NULL REFERENCES sites (id),
    name                 text NOT NULL,
    birth_year           integer,
    phone                text,
    family_contact_name  text,
    family_contact_phone text,
    inactivity_window_min integer NOT NULL DEFAULT 720 CHECK (inactivity_window_min > 0),
    notes                text,
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX residents_site ON residents (site_id);

-- Each gateway has its own broker account; password_hash is Mosquitto's $7$ format.
CREATE TABLE gateways (
    id            text PRIMARY KEY CHECK (id ~ '^[a-z0-9-]{1,64}$'),
    site_id       text NOT NULL REFERENCES sites (id),
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    site_id     text NOT NULL REFERENCES sites (id),
    id          text NOT NULL CHECK (id ~ '^[a-z0-9-]{1,64}$'),
    profile     text NOT NULL,
    address     text NOT NULL,
    gateway_id  text REFERENCES gateways (id),
    resident_id bigint REFERENCES residents (id),
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, id)
);

-- Latest retained status per device (and per gateway, device_id 'gateway:<id>').
CREATE TABLE device_status (
    site_id    text NOT NULL,
    device_id  text NOT NULL,
    online     boolean NOT NULL,
    battery    smallint,
    rssi       smallint,
    detail     text,
    time       timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, device_id)
);

CREATE TABLE staff (
    id              text PRIMARY KEY CHECK (id ~ '^[a-z0-9._-]{1,64}$'),
    organisation_id text NOT NULL REFERENCES organisations (id),
    name            text NOT NULL,
    role            text NOT NULL CHECK (role IN ('duty', 'supervisor', 'street', 'bureau', 'admin')),
    phone           text,
    password_hash   text,
    active          boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shifts (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    staff_id  text NOT NULL REFERENCES staff (id),
    starts_at timestamptz NOT NULL,
    ends_at   timestamptz NOT NULL,
    CHECK (ends_at > starts_at)
);
CREATE INDEX shifts_window ON shifts (starts_at, ends_at);

-- Raw telemetry. Natural key (site, device, metric, time): a redelivered message
-- after a crash adds nothing. Retention: the server calls drop_chunks.
CREATE TABLE telemetry (
    time      timestamptz NOT NULL,
    site_id   text NOT NULL,
    device_id text NOT NULL,
    metric    text NOT NULL,
    value     double precision NOT NULL,
    unit      text NOT NULL DEFAULT ''
);
SELECT create_hypertable('telemetry', 'time', chunk_time_interval => interval '1 day');
CREATE UNIQUE INDEX telemetry_key ON telemetry (site_id, device_id, metric, time DESC);

-- One row per event id ever seen. A hypertable's unique keys must contain its
-- time column, so the ledger (an ordinary table) is what makes an event id unique.
CREATE TABLE event_ledger (
    event_id    uuid PRIMARY KEY,
    time        timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE device_events (
    time        timestamptz NOT NULL,
    event_id    uuid NOT NULL,
    site_id     text NOT NULL,
    device_id   text NOT NULL,
    type        text NOT NULL,
    phase       text NOT NULL,
    profile     text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    received_at timestamptz NOT NULL DEFAULT now()
);
SELECT create_hypertable('device_events', 'time', chunk_time_interval => interval '7 days');
CREATE UNIQUE INDEX device_events_key ON device_events (event_id, time);
CREATE INDEX device_events_device ON device_events (site_id, device_id, time DESC);

CREATE TABLE alerts (
    id            uuid PRIMARY KEY,
    site_id       text NOT NULL,
    device_id     text,
    type          text NOT NULL CHECK (type IN ('sos', 'fall', 'smoke', 'electrical', 'vital_signs',
                  'inactivity', 'wandering', 'device_offline', 'low_battery', 'tamper', 'device_fault')),
    severity      text NOT NULL CHECK (severity IN ('critical', 'major', 'minor')),
    status        text NOT NULL CHECK (status IN ('open', 'acknowledged', 'on_scene', 'resolved')),
    dedup_key     text NOT NULL,
    opened_at     timestamptz NOT NULL,
    last_seen_at  timestamptz NOT NULL,
    count         integer NOT NULL DEFAULT 1,
    level         smallint NOT NULL DEFAULT 0,
    next_step_at  timestamptz,
    outcome       text,
    resolved_at   timestamptz,
    first_event_id uuid
);
-- At most one unresolved alert per condition: a repeat updates it.
CREATE UNIQUE INDEX alerts_open_dedup ON alerts (dedup_key) WHERE status <> 'resolved';
CREATE INDEX alerts_due ON alerts (next_step_at) WHERE status <> 'resolved';

-- Append-only, hash-chained audit of every alert transition and delivery attempt.
CREATE TABLE alert_audit (
    time      timestamptz NOT NULL,
    alert_id  uuid NOT NULL,
    seq       bigint NOT NULL,
    actor     text NOT NULL,
    action    text NOT NULL,
    channel   text,
    detail    jsonb NOT NULL DEFAULT '{}',
    prev_hash bytea,
    hash      bytea NOT NULL
);
SELECT create_hypertable('alert_audit', 'time', chunk_time_interval => interval '30 days');
CREATE UNIQUE INDEX alert_audit_seq ON alert_audit (alert_id, seq, time);

CREATE TABLE notifications (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id        uuid NOT NULL REFERENCES alerts (id),
    level           smallint NOT NULL,
    channel         text NOT NULL,
    recipient       text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'sent', 'failed', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (alert_id, level, channel, recipient)
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';

-- Whatever failed validation: kept with the reason, never dropped in silence.
CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    topic       text NOT NULL,
    payload     bytea NOT NULL,
    reason      text NOT NULL
);
CREATE INDEX dead_letters_time ON dead_letters (received_at);
