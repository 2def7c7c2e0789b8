-- eldersafe schema v4: the notifiers (gateway/notify). The notifications table of
-- v3 is the durable outbox (one row per Notice.key); this adds what delivering it
-- needs: the bureau webhook's per-alert order, per-channel attempts, the voice
-- call's acknowledge code, and what was delivered, confirmed or why a row closed.

ALTER TABLE notifications
    -- webhook rows: the n-th message of this alert to this endpoint (1, 2, …);
    -- message n+1 is not sent before n is acknowledged with a 2xx
    ADD COLUMN lane_seq           integer,
    ADD COLUMN channel_attempts   integer NOT NULL DEFAULT 0,
    -- six digits the callee keys in (voice / SMS); random from gen_random_uuid's
    -- strong source, fixed at insert so a retried call speaks the same code
    ADD COLUMN ack_code           text NOT NULL DEFAULT lpad(
        ((('x' || left(replace(gen_random_uuid()::text, '-', ''), 15))::bit(60)::bigint)
         % 1000000)::text, 6, '0'),
    ADD COLUMN delivered_channels text[] NOT NULL DEFAULT '{}',
    ADD COLUMN delivered_at       timestamptz,
    ADD COLUMN confirmed_at       timestamptz,
    ADD COLUMN reference          text,       -- the provider's message / call id
    ADD COLUMN closed_reason      text,       -- why nothing more follows (dropped, failed)
    ADD COLUMN updated_at         timestamptz;

-- Rows of one alert are inserted by one engine transaction at a time (it holds
-- the alert's row lock), so max + 1 is the next position; the unique index turns
-- any other writer into an error instead of two messages with one position.
CREATE FUNCTION notifications_lane_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.channel = 'webhook' AND NEW.lane_seq IS NULL THEN
        NEW.lane_seq := 1 + coalesce((SELECT max(lane_seq) FROM notifications
                                      WHERE alert_id = NEW.alert_id AND target = NEW.target
                                        AND lane_seq IS NOT NULL), 0);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER notifications_lane_seq BEFORE INSERT ON notifications
    FOR EACH ROW EXECUTE FUNCTION notifications_lane_seq();
CREATE UNIQUE INDEX notifications_lane ON notifications (alert_id, target, lane_seq)
    WHERE lane_seq IS NOT NULL;
CREATE INDEX notifications_pending_lane ON notifications (alert_id, target, lane_seq)
    WHERE status = 'pending' AND lane_seq IS NOT NULL;

-- Notifier runners sleep until the earliest not_before or this wake-up at commit.
CREATE FUNCTION notifications_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notifications', '');
    RETURN NULL;
END $$;
CREATE TRIGGER notifications_wake AFTER INSERT ON notifications
    FOR EACH STATEMENT EXECUTE FUNCTION notifications_wake();
