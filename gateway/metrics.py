"""Prometheus metrics of the gateway processes (one registry, names prefixed ``eldersafe_``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INGEST_MESSAGES = Counter("eldersafe_ingest_messages_total", "MQTT messages ingested")
INGEST_TELEMETRY_ROWS = Counter("eldersafe_ingest_telemetry_rows_total", "telemetry rows written")
INGEST_EVENTS = Counter("eldersafe_ingest_events_total", "event messages written (before dedup)")
DEAD_LETTERS = Counter(
    "eldersafe_dead_letters_total",
    "messages refused into dead letters, by reason class",
    ["reason"],  # topic, json, schema, range, database, internal (gateway.ingest.batch.DeadReason)
)
INGEST_UNREGISTERED = Counter(
    "eldersafe_ingest_unregistered_site_messages_total",
    "messages stored for a site that is not registered (see table unregistered_sources)",
)
INGEST_ALERTS_DEFERRED = Counter(
    "eldersafe_ingest_alerts_deferred_total",
    "alarm batches committed without their alerts (the engine's intake in the ingest"
    " transaction failed or timed out; the engine's inbox workers raise them)",
)
INGEST_COMMAND_RESULTS = Counter(
    "eldersafe_ingest_command_results_total", "command results received (before dedup)"
)
INGEST_IGNORED = Counter(
    "eldersafe_ingest_ignored_total", "messages on topics ingest does not store"
)
INGEST_BATCH_SECONDS = Histogram(
    "eldersafe_ingest_batch_seconds",
    "time to make one batch durable",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
INGEST_BATCH_MESSAGES = Histogram(
    "eldersafe_ingest_batch_messages",
    "messages in one committed ingest batch (1 when quiet, thousands under a backlog)",
    buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 2500, 5000, 8192),
)
INGEST_LAG = Histogram(
    "eldersafe_ingest_lag_seconds",
    "from the arrival of a batch's first (oldest) message to its commit and acknowledgement",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
INGEST_STORE_ERRORS = Counter(
    "eldersafe_ingest_store_errors_total", "failed batch writes (retried)"
)
INGEST_PENDING = Gauge("eldersafe_ingest_pending_messages", "received, not yet durable")
MQTT_SESSIONS_LOST = Counter(
    "eldersafe_mqtt_sessions_lost_total",
    "the server's MQTT session lost (session_lost: the broker had none when it should have;"
    " taken_over: another connection took it, DISCONNECT 0x8E)",
    ["kind"],
)
for _kind in ("session_lost", "taken_over"):
    MQTT_SESSIONS_LOST.labels(_kind)  # exported as 0 from the start, for alert rules
EDGE_COMMANDS = Counter(
    "eldersafe_edge_commands_total",
    "downlink commands answered by the edge, by outcome: executed, refused, unreachable;"
    " duplicate (an id seen before, its result published again); invalid (no id to answer)",
    ["outcome"],
)
ENGINE_EVENTS = Counter(
    "eldersafe_engine_events_total", "device events applied by the alert engine (inbox rows)"
)
ENGINE_DEAD = Counter(
    "eldersafe_engine_dead_letters_total",
    "events the alert engine could not apply (kept in engine_dead_letters)",
)
ENGINE_STEPS = Counter("eldersafe_engine_steps_total", "escalation steps fired")
NOTIFY_ATTEMPTS = Counter(
    "eldersafe_notify_attempts_total",
    "notice delivery attempts by channel and result (delivered, failed)",
    ["channel", "result"],
)
NOTIFY_TIME_TO_DELIVER = Histogram(
    "eldersafe_notify_time_to_deliver_seconds",
    "from the escalation step that made a notice to its first delivery, by the channel"
    " that delivered it (observed by the server that delivered it: sum over servers)",
    ["channel"],
    buckets=(0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 900),
)
NOTIFY_DROPPED = Counter(
    "eldersafe_notify_dropped_total",
    "notices closed without a further attempt, by pipeline stage (dedup: moot or already"
    " delivered; retry: unrecoverable or retries exhausted on the last channel)",
    ["stage"],
)
NOTIFY_CONFIRMATIONS = Counter(
    "eldersafe_notify_confirmations_total",
    "acknowledge codes keyed in by a callee, by result (confirmed, wrong_code, unknown)",
    ["result"],
)
ENGINE_CRASHES = Counter(
    "eldersafe_engine_loop_restarts_total", "alert engine loops restarted after an error"
)
DB_STALLED_ENDED = Counter(
    "eldersafe_db_stalled_sessions_ended_total",
    "server database sessions ended after waiting inside a transaction past their limit",
)
VITALS_CHECKS = Counter(
    "eldersafe_vitals_checks_total", "wristbands whose vital signs the sweep judged"
)
VITALS_REFUSED = Counter(
    "eldersafe_vitals_refused_readings_total",
    "heart rate / SpO2 readings the vital-sign rule cannot judge (non-finite)",
)
VITALS_FAILED = Counter(
    "eldersafe_vitals_failed_checks_total",
    "vital-sign checks that failed and were kept for the next pass (logged with the reason)",
)
DOWNLINK_PUBLISHES = Counter(
    "eldersafe_downlink_publishes_total",
    "device downlink commands by publish result: published (PUBACK), no_subscribers (PUBACK"
    " 0x10: no edge session holds the topic), refused (PUBACK >= 0x80), no_puback (still in"
    " flight after the wait), invalid (a row that cannot be a command)",
    ["result"],
)
DOWNLINK_RESULTS = Counter(
    "eldersafe_downlink_results_total",
    "command results recorded in their alert, by outcome (executed, refused, unreachable);"
    " unmatched: not one of the engine's commands; mismatch: another device answered its id",
    ["outcome"],
)
