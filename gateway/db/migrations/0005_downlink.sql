-- eldersafe schema v5: the device downlink (gateway/alerts/downlink.py). The engine
-- writes downlink_outbox (v3); the server's own MQTT session publishes it, and the
-- edge's answer (command_results, written by ingest) becomes part of the alert.

-- A row the broker refused or that cannot be a command waits (or closes at
-- 'infinity') instead of being retried in a hot loop; the reason stays in last_error.
ALTER TABLE downlink_outbox ADD COLUMN not_before timestamptz NOT NULL DEFAULT '-infinity';

-- Publishers sleep until this wake-up at the commit of a new command.
CREATE FUNCTION downlink_outbox_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('downlink_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER downlink_outbox_wake AFTER INSERT ON downlink_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION downlink_outbox_wake();

-- Each stored command result, queued in ingest's own transaction (like the engine
-- inbox): a result committed is a result the engine will record in its alert,
-- however the servers die in between. A redelivered result inserts nothing into
-- command_results (ON CONFLICT DO NOTHING), so the trigger does not fire again.
CREATE TABLE command_result_inbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id  uuid NOT NULL UNIQUE,
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION command_result_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO command_result_inbox (command_id) VALUES (NEW.command_id)
    ON CONFLICT (command_id) DO NOTHING;
    PERFORM pg_notify('command_results', '');
    RETURN NULL;
END $$;
CREATE TRIGGER command_results_engine_inbox AFTER INSERT ON command_results
    FOR EACH ROW EXECUTE FUNCTION command_result_enqueue();

-- Results stored before this version, for the engine's own commands.
INSERT INTO command_result_inbox (command_id)
SELECT r.command_id FROM command_results r JOIN downlink_outbox o USING (command_id)
ON CONFLICT (command_id) DO NOTHING;
