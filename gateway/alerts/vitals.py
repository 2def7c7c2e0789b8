"""The vital-sign sweep: heart rate and SpO2 outside the resident's own range for a while.

No trigger on telemetry: vital readings are most of a wristband's telemetry, and
queueing each one would double the writes of ingest's hot path (the lead's call).
Instead each watched wristband (a wristband profile worn by a resident) has one
row in ``condition_state`` (metric ``vital_signs``, as schema v3 planned for
"vital-sign durations … claimed by sweeps"): its ``check_at`` is claimed with
``FOR UPDATE SKIP LOCKED`` like the welfare check, so with several servers each
check runs once. A check reads the device's heart_rate_bpm / spo2_pct readings
since the newest one it judged (an indexed range read on the telemetry key
``(site_id, device_id, metric, time)``), feeds ``alerting.conditions.evaluate_vital``
with the state kept in the row, raises / clears through ``apply_signal`` (the
engine's own path: audit chain, change log, escalation) and sets the next
``check_at``. Readings arriving late but newer than the last judged are read by
the next check; older ones are ignored, as ``evaluate_vital`` would.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from alerting.conditions import (
    DEFAULT_VITAL_RANGES,
    InvalidReading,
    VitalRange,
    VitalState,
    evaluate_vital,
)
from alerting.lifecycle import IllegalTransition
from alerting.ports import StoreError
from alerting.rules import ConditionSignal
from gateway import metrics
from gateway.alerts.directory import Directory, load_policy_book
from gateway.alerts.store import PgAlertTransaction
from gateway.alerts.unit_of_work import Outcome, apply_signal

log = logging.getLogger(__name__)

WATCH = "vital_signs"  # condition_state.metric of a wristband's vital-sign watch
# Profiles that measure heart rate and SpO2 (DEVICES.md §1): data, so a vendor's
# wristband is one more name here.
VITAL_PROFILES: tuple[str, ...] = ("es-wb1",)
VITAL_METRICS: tuple[str, ...] = ("heart_rate_bpm", "spo2_pct")
# How often each wristband is looked at: an alert is raised at most this long after
# its readings complete the hold (2 min by default).
CHECK_EVERY = timedelta(seconds=30)
# A check reads no further back than this (a watch new or long unchecked), and at most
# READINGS_PER_CHECK readings per metric; more left over means a check again at once.
LOOKBACK = timedelta(hours=1)
# A worn wristband reports each vital at least once a minute (the edge's refresh);
# readings further apart than this say nothing about the time between them, so a
# run outside (or back inside) the range starts again after such a gap: two high
# readings an hour apart are not an hour of high heart rate.
MAX_GAP = timedelta(minutes=5)
READINGS_PER_CHECK = 500

# Run by the district import in its transaction: a wristband given to a resident is
# watched, one taken away is not ('-infinity': nothing judged yet, due at once).
WATCH_WRISTBANDS = f"""
INSERT INTO condition_state (site_id, device_id, metric, state, last_time, check_at)
SELECT d.site_id, d.id, '{WATCH}', '{{}}', '-infinity', '-infinity' FROM devices d
WHERE d.resident_id IS NOT NULL AND d.profile = ANY(%(profiles)s)
ON CONFLICT (site_id, device_id, metric) DO NOTHING
"""
UNWATCH_WRISTBANDS = f"""
DELETE FROM condition_state c WHERE c.metric = '{WATCH}' AND NOT EXISTS (
    SELECT 1 FROM devices d WHERE d.site_id = c.site_id AND d.id = c.device_id
      AND d.resident_id IS NOT NULL AND d.profile = ANY(%(profiles)s))
"""

_CLAIM = f"""
SELECT c.site_id, c.device_id, c.state, r.heart_rate_min, r.heart_rate_max, r.spo2_min
FROM condition_state c
JOIN devices d ON d.site_id = c.site_id AND d.id = c.device_id
JOIN residents r ON r.id = d.resident_id
WHERE c.check_at <= %s AND c.metric = '{WATCH}'
ORDER BY c.check_at LIMIT %s FOR UPDATE OF c SKIP LOCKED
"""
# One round trip for the whole batch: per (wristband, metric) the readings after the
# newest judged one, up to the engine's now, through the telemetry key index.
_READINGS = """
SELECT w.site_id, w.device_id, w.metric, t.time, t.value
FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[])
     AS w (site_id, device_id, metric, after)
CROSS JOIN LATERAL (
    SELECT time, value FROM telemetry
    WHERE site_id = w.site_id AND device_id = w.device_id AND metric = w.metric
      AND time > w.after AND time <= %s
    ORDER BY time LIMIT %s
) t
ORDER BY t.time
"""
_SAVE = f"""
UPDATE condition_state c SET state = v.state, last_time = greatest(c.last_time, v.last_time),
    -- greatest() skips a NULL: nothing judged yet keeps '-infinity'
    check_at = v.check_at, updated_at = now()
FROM unnest(%s::text[], %s::text[], %s::jsonb[], %s::timestamptz[], %s::timestamptz[])
     AS v (site_id, device_id, state, last_time, check_at)
WHERE c.site_id = v.site_id AND c.device_id = v.device_id AND c.metric = '{WATCH}'
"""


def resident_ranges(
    heart_rate_min: float | None, heart_rate_max: float | None, spo2_min: float | None
) -> dict[str, VitalRange]:
    """The resident's own range per metric; a bound they lack is the default's."""
    hr, spo2 = DEFAULT_VITAL_RANGES["heart_rate_bpm"], DEFAULT_VITAL_RANGES["spo2_pct"]
    return {
        "heart_rate_bpm": VitalRange(
            hr.metric,
            low=hr.low if heart_rate_min is None else float(heart_rate_min),
            high=hr.high if heart_rate_max is None else float(heart_rate_max),
            hold=hr.hold,
        ),
        "spo2_pct": VitalRange(
            spo2.metric,
            low=spo2.low if spo2_min is None else float(spo2_min),
            high=spo2.high,
            hold=spo2.hold,
        ),
    }


def _state_from_json(doc: Mapping[str, Any]) -> VitalState:
    def at(key: str) -> datetime | None:
        value = doc.get(key)
        return None if value is None else datetime.fromisoformat(value)

    return VitalState(bool(doc.get("alerting", False)), at("since"), at("last_at"))


def _state_json(state: VitalState) -> dict[str, Any]:
    return {
        "alerting": state.alerting,
        "since": None if state.since is None else state.since.isoformat(),
        "last_at": None if state.last_at is None else state.last_at.isoformat(),
    }


async def vitals_sweep(
    conn: psycopg.AsyncConnection[Any], now: datetime, limit: int = 200, worker: str = "engine"
) -> Outcome:
    """Judge the due wristbands' new vital readings; one transaction, one commit.

    ``out.events`` counts the wristbands checked, ``out.dead`` readings refused."""
    out = Outcome()
    async with conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_CLAIM, (now, limit))
            watches = await cur.fetchall()
        if not watches:
            return out
        # Alerts are locked in key order across the batch: two workers never deadlock.
        watches.sort(key=lambda w: (w["site_id"], w["device_id"]))
        states = {
            (w["site_id"], w["device_id"]): {
                m: _state_from_json((w["state"] or {}).get(m) or {}) for m in VITAL_METRICS
            }
            for w in watches
        }
        readings = await _read(conn, states, now)
        tx = PgAlertTransaction(conn, worker)
        directory = Directory(conn, await load_policy_book(conn))
        saved: list[tuple[str, str, Jsonb, datetime | None, datetime]] = []
        for w in watches:
            key = (w["site_id"], w["device_id"])
            got = readings.get(key, [])
            full = any(
                sum(1 for r in got if r[0] == m) >= READINGS_PER_CHECK for m in VITAL_METRICS
            )
            ranges = resident_ranges(w["heart_rate_min"], w["heart_rate_max"], w["spo2_min"])
            before = states[key]
            after, signals = _judge(key, ranges, before, got, out)
            # Most checks find nothing to raise or clear: judged in memory, they cost no
            # round trip. Only a watch with signals gets its savepoint.
            if signals:
                try:
                    async with conn.transaction():  # a savepoint: one bad watch spoils no other
                        for signal in signals:
                            await apply_signal(tx, directory, signal, now, out)
                except (StoreError, IllegalTransition, ValueError, KeyError) as exc:
                    tx.forget()
                    log.error("vital-sign check of %s/%s failed, kept for the next: %s", *key, exc)
                    metrics.VITALS_FAILED.inc()
                    after = before
            newest = max((s.last_at for s in after.values() if s.last_at), default=None)
            check_at = now if full else now + CHECK_EVERY
            saved.append(
                (*key, Jsonb({m: _state_json(s) for m, s in after.items()}),
                 newest, check_at)
            )  # fmt: skip
            out.events += 1
        await conn.execute(_SAVE, [list(col) for col in zip(*saved, strict=True)])
    metrics.VITALS_CHECKS.inc(out.events)
    return out


async def _read(
    conn: psycopg.AsyncConnection[Any],
    states: Mapping[tuple[str, str], Mapping[str, VitalState]],
    now: datetime,
) -> dict[tuple[str, str], list[tuple[str, datetime, float]]]:
    oldest = now - LOOKBACK
    sites, devices, names, after = [], [], [], []
    for (site_id, device_id), per_metric in states.items():
        for metric in VITAL_METRICS:
            last = per_metric[metric].last_at
            sites.append(site_id)
            devices.append(device_id)
            names.append(metric)
            after.append(oldest if last is None or last < oldest else last)
    cur = await conn.execute(_READINGS, (sites, devices, names, after, now, READINGS_PER_CHECK))
    found: dict[tuple[str, str], list[tuple[str, datetime, float]]] = {}
    for site_id, device_id, metric, at, value in await cur.fetchall():
        found.setdefault((site_id, device_id), []).append((metric, at, value))
    return found


def _judge(
    key: tuple[str, str],
    ranges: Mapping[str, VitalRange],
    states: Mapping[str, VitalState],
    readings: Sequence[tuple[str, datetime, float]],
    out: Outcome,
) -> tuple[dict[str, VitalState], list[ConditionSignal]]:
    """Both metrics' readings in time order, so one alert's sources come and go in order;
    the signals are applied by the caller, in that order."""
    site_id, device_id = key
    after = dict(states)
    signals: list[ConditionSignal] = []
    for metric, at, value in readings:
        state = after[metric]
        if state.since is not None and state.last_at is not None and at - state.last_at > MAX_GAP:
            state = VitalState(state.alerting, None, state.last_at)
        try:
            after[metric], signal = evaluate_vital(
                ranges[metric], state, site_id=site_id, device_id=device_id,
                value=value, at=at,
            )  # fmt: skip
        except InvalidReading as exc:
            log.error("reading refused by the vital-sign rule: %s/%s %s", site_id, device_id, exc)
            metrics.VITALS_REFUSED.inc()
            out.dead += 1
            continue
        if signal is not None:
            signals.append(signal)
    return after, signals
