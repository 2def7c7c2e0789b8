-- eldersafe schema v3: the alert engine's durable state (issue 7; alerting/README.md).
-- Intake exactly once: a row trigger on device_events writes the engine inbox in
-- the ingest transaction itself, so a committed event is a committed inbox row.

-- Alerts carry everything alerting.model.Alert holds.
ALTER TABLE alerts
    ADD COLUMN epoch                integer NOT NULL DEFAULT 0,
    ADD COLUMN escalation_anchor    timestamptz,
    ADD COLUMN sources              text[] NOT NULL DEFAULT '{}',
    ADD COLUMN last_event_id        uuid,
    ADD COLUMN acknowledged_at      timestamptz,
    ADD COLUMN acknowledged_by      text,
    ADD COLUMN on_scene_at          timestamptz,
    ADD COLUMN on_scene_by          text,
    ADD COLUMN condition_cleared_at timestamptz,
    ADD COLUMN resolved_by          text,
    ADD COLUMN unit_id              text,
    ADD COLUMN updated_at           timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT alerts_outcome CHECK (outcome IS NULL OR outcome IN ('handled', 'false_alarm',
        'sent_to_hospital', 'cancelled_by_resident', 'transferred', 'cleared', 'deceased')),
    ADD CONSTRAINT alerts_resolved CHECK ((status = 'resolved') = (resolved_at IS NOT NULL));
UPDATE alerts SET escalation_anchor = opened_at WHERE escalation_anchor IS NULL;
ALTER TABLE alerts ALTER COLUMN escalation_anchor SET NOT NULL;

-- The newest (seq, hash) of each alert's audit chain, kept apart from the rows so
-- that deleting the newest rows shows (alerting.audit.ChainHead).
CREATE TABLE alert_audit_heads (
    alert_id uuid PRIMARY KEY,
    seq      bigint NOT NULL,
    hash     bytea NOT NULL
);

-- One row per escalation step ever fired: the primary key is what makes a step
-- fire once however many servers claim the timer (alerting.planner.StepKey.id).
CREATE TABLE alert_steps (
    step_id  text PRIMARY KEY,
    alert_id uuid NOT NULL REFERENCES alerts (id),
    epoch    integer NOT NULL,
    kind     text NOT NULL,
    level    smallint NOT NULL,
    n        integer NOT NULL,
    due_at   timestamptz NOT NULL,
    fired_at timestamptz NOT NULL,
    fired_by text NOT NULL
);
CREATE INDEX alert_steps_alert ON alert_steps (alert_id, epoch);

-- The notifications outbox, keyed by alerting.pipeline.Notice.key
-- (step, person, first channel): reminders of one level no longer collide.
-- v1's table was never written; it is replaced.
DROP TABLE notifications;
CREATE TABLE notifications (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key            text NOT NULL UNIQUE,
    alert_id       uuid NOT NULL REFERENCES alerts (id),
    step_id        text NOT NULL REFERENCES alert_steps (step_id),
    level          smallint NOT NULL,
    person_id      text NOT NULL,
    role           text NOT NULL,
    channel        text NOT NULL,
    target         text NOT NULL,
    text           text NOT NULL,
    until_status   text NOT NULL,
    fallback       jsonb NOT NULL DEFAULT '[]',  -- [[channel, target], ...]
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'sent', 'confirmed', 'failed', 'dropped')),
    attempts       integer NOT NULL DEFAULT 0,
    not_before     timestamptz NOT NULL,
    channel_since  timestamptz NOT NULL,
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_due ON notifications (not_before) WHERE status = 'pending';
CREATE INDEX notifications_alert ON notifications (alert_id);

-- Downlink commands to residents' devices (the wristband's "help is coming"); a
-- publisher drains it. command_id is derived from the alert: a retry is one command.
CREATE TABLE downlink_outbox (
    command_id   uuid PRIMARY KEY,
    alert_id     uuid NOT NULL REFERENCES alerts (id),
    site_id      text NOT NULL,
    device_id    text NOT NULL,
    action       text NOT NULL,
    args         jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL,
    published_at timestamptz,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text
);
CREATE INDEX downlink_outbox_pending ON downlink_outbox (created_at) WHERE published_at IS NULL;

-- The ordered change log the live feed serves and resumes from. A position is
-- given at insert, not at commit, so a reader must not pass a position that an
-- unfinished transaction may still fill: the feed runs in (xid, position) order
-- and only over transactions older than every one still running (xid below the
-- snapshot's xmin), a set that never grows behind the reader (gateway.alerts.feed).
-- seq is the alert's audit seq: a client keeps, per alert, the highest it saw.
CREATE TABLE alert_changes (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid      xid8 NOT NULL DEFAULT pg_current_xact_id(),
    alert_id uuid NOT NULL,
    seq      bigint NOT NULL,
    time     timestamptz NOT NULL,
    action   text NOT NULL,
    alert    jsonb NOT NULL
);
CREATE INDEX alert_changes_feed ON alert_changes (xid, position);
CREATE INDEX alert_changes_alert ON alert_changes (alert_id, position);

-- The engine inbox: one row per committed device event, written by the trigger
-- below in the same transaction; engine workers claim rows (FOR UPDATE SKIP
-- LOCKED), apply them and delete them in one transaction.
CREATE TABLE engine_inbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid NOT NULL UNIQUE,
    time        timestamptz NOT NULL,
    site_id     text NOT NULL,
    device_id   text NOT NULL,
    type        text NOT NULL,
    phase       text NOT NULL,
    profile     text NOT NULL,
    data        jsonb NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- An event the engine could not apply (never silence): kept with the reason.
CREATE TABLE engine_dead_letters (
    event_id  uuid PRIMARY KEY,
    event     jsonb NOT NULL,
    reason    text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION engine_inbox_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO engine_inbox (event_id, time, site_id, device_id, type, phase, profile, data)
    VALUES (NEW.event_id, NEW.time, NEW.site_id, NEW.device_id, NEW.type, NEW.phase,
            NEW.profile, NEW.data)
    ON CONFLICT (event_id) DO NOTHING;
    -- Delivered at commit, once per transaction (identical notifications fold).
    PERFORM pg_notify('engine_inbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER device_events_engine_inbox AFTER INSERT ON device_events
    FOR EACH ROW EXECUTE FUNCTION engine_inbox_enqueue();

-- Server-side thresholds (alerting.conditions.THRESHOLD_RULES): the readings of
-- their metrics, and only those, are queued for the engine in ingest's own
-- transaction, like events (the WHEN clause keeps every other reading untouched).
CREATE TABLE condition_inbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time        timestamptz NOT NULL,
    site_id     text NOT NULL,
    device_id   text NOT NULL,
    metric      text NOT NULL,
    value       double precision NOT NULL
);
CREATE FUNCTION condition_inbox_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO condition_inbox (time, site_id, device_id, metric, value)
    VALUES (NEW.time, NEW.site_id, NEW.device_id, NEW.metric, NEW.value);
    PERFORM pg_notify('engine_inbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER telemetry_condition_inbox AFTER INSERT ON telemetry FOR EACH ROW
    WHEN (NEW.metric IN ('residual_current_ma', 'cable_temp_c_1', 'cable_temp_c_2',
                         'cable_temp_c_3', 'cable_temp_c_4'))
    EXECUTE FUNCTION condition_inbox_enqueue();

-- Directory: messaging targets, the bureau's webhook, residents' own thresholds.
ALTER TABLE organisations ADD COLUMN webhook_url text, ADD COLUMN apprise_url text;
ALTER TABLE staff ADD COLUMN apprise_url text;
ALTER TABLE residents
    ADD COLUMN external_id    text UNIQUE,
    ADD COLUMN lives_alone    boolean NOT NULL DEFAULT false,
    ADD COLUMN timezone       text NOT NULL DEFAULT 'Asia/Shanghai',
    ADD COLUMN night_start    time NOT NULL DEFAULT '22:00',
    ADD COLUMN night_end      time NOT NULL DEFAULT '06:30',
    ADD COLUMN heart_rate_min smallint,
    ADD COLUMN heart_rate_max smallint,
    ADD COLUMN spo2_min       smallint;
CREATE TABLE family_contacts (
    resident_id bigint NOT NULL REFERENCES residents (id) ON DELETE CASCADE,
    name        text NOT NULL,
    phone       text,
    apprise_url text,
    rank        smallint NOT NULL DEFAULT 0,
    PRIMARY KEY (resident_id, name)
);
ALTER TABLE shifts ADD CONSTRAINT shifts_once UNIQUE (staff_id, starts_at);

-- Escalation policy overrides per unit (alerting.policy.PolicyBook); alert_type ''
-- means every type of that severity.
CREATE TABLE escalation_policies (
    unit_id    text NOT NULL REFERENCES organisations (id),
    alert_type text NOT NULL DEFAULT '',
    severity   text NOT NULL CHECK (severity IN ('critical', 'major', 'minor')),
    policy     jsonb NOT NULL,
    PRIMARY KEY (unit_id, alert_type, severity)
);

-- Server-side condition state per (site, device, metric): thresholds with
-- hysteresis and vital-sign durations (alerting.conditions), claimed by sweeps.
CREATE TABLE condition_state (
    site_id    text NOT NULL,
    device_id  text NOT NULL,
    metric     text NOT NULL,
    state      jsonb NOT NULL,
    last_time  timestamptz NOT NULL,  -- newest reading judged: older ones arrive too late
    check_at   timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, device_id, metric)
);
CREATE INDEX condition_state_due ON condition_state (check_at) WHERE check_at IS NOT NULL;

-- The welfare check of residents living alone (alerting.conditions inactivity):
-- one row per resident, claimed by the sweep when check_at comes (SKIP LOCKED),
-- so with several servers each check runs once.
CREATE TABLE inactivity_watch (
    resident_id   bigint PRIMARY KEY REFERENCES residents (id) ON DELETE CASCADE,
    last_activity timestamptz,  -- NULL: not looked yet
    raised        boolean NOT NULL DEFAULT false,
    check_at      timestamptz NOT NULL DEFAULT '-infinity'
);
CREATE INDEX inactivity_watch_due ON inactivity_watch (check_at);

-- A clock tests drive (ELDERSAFE_ENGINE_CLOCK=database; refused in production).
CREATE TABLE engine_clock (
    id  boolean PRIMARY KEY DEFAULT true CHECK (id),
    now timestamptz NOT NULL
);
