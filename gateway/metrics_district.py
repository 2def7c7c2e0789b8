"""District-wide alert metrics, read from the database at scrape time.

Alerts are opened, acknowledged and escalated by whichever server claims them,
so per-process counters would split one district's figures over the servers.
This collector reads them from the one record every server writes: the ordered
change log ``alert_changes`` (gateway.alerts.feed explains its commit order).
It folds each change into running totals once and remembers how far it read,
so a scrape reads only what changed since the last one (an index range scan on
``alert_changes_commit_order``); the first scrape after a start reads the log
from its beginning once. Gauges (outbox depths, inbox lag, devices online,
unresolved alerts) are small counts over partial indexes or the device table.

Every server exports the same values for these series: aggregate them over
servers with ``max``, never ``sum``. The endpoint runs in prometheus_client's
own thread, so this uses a synchronous connection and never touches the
server's event loop; a short cache keeps several scrapers from multiplying the
queries. A database outage keeps the last values and says so
(``eldersafe_district_metrics_up`` 0), it never fails the scrape.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "ACK_BUCKETS",
    "ON_SCENE_BUCKETS",
    "AlertFact",
    "Buckets",
    "DistrictCollector",
    "DistrictTotals",
    "facts_from_change",
]

log = logging.getLogger(__name__)

# Seconds; the targets the district screen shows are 60 s to acknowledge (a critical
# alert's first rung) and 15 min to be on scene (the "15-minute service circle").
ACK_BUCKETS = (5.0, 10.0, 15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1800.0)
ON_SCENE_BUCKETS = (60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0, 7200.0)

COUNTED_ACTIONS = ("opened", "acknowledged", "on_scene", "escalated")
NO_UNIT = "none"  # an alert of a site no unit is responsible for (an unregistered site)

# One page of the change log after a commit_seq, in commit order (the feed's: a number
# seen means every lower one that commits is seen already). The unit is read for
# openings only and the audit detail (the step's level and kind) for escalations only.
_CHANGES = """
SELECT c.commit_seq, c.action,
       CASE WHEN c.action = ANY(%(counted)s) THEN c.alert END,
       a.unit_id, au.detail
FROM (
    SELECT commit_seq, alert_id, seq, time, action, alert FROM alert_changes
    WHERE commit_seq > %(after)s ORDER BY commit_seq LIMIT %(limit)s
) c
LEFT JOIN alerts a ON c.action = 'opened' AND a.id = c.alert_id
LEFT JOIN alert_audit au ON c.action = 'escalated'
    AND au.alert_id = c.alert_id AND au.seq = c.seq AND au.time = c.time
ORDER BY c.commit_seq
"""
_NOTIFICATIONS_PENDING = """
SELECT channel, count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)
FROM notifications WHERE status = 'pending' GROUP BY channel
"""
_DOWNLINK_PENDING = """
SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)
FROM downlink_outbox WHERE published_at IS NULL AND not_before < 'infinity'
"""
_INBOXES = """
SELECT 'events', count(*), coalesce(extract(epoch FROM now() - min(enqueued_at)), 0)
FROM engine_inbox
UNION ALL
SELECT 'command_results', count(*), coalesce(extract(epoch FROM now() - min(enqueued_at)), 0)
FROM command_result_inbox
UNION ALL
SELECT 'readings', count(*), 0 FROM condition_inbox
"""
_UNRESOLVED = """
SELECT type, severity, status, coalesce(unit_id, %s), count(*) FROM alerts
WHERE status <> 'resolved' GROUP BY 1, 2, 3, 4
"""
# Devices by profile (the device class: es-wb1 wristband, es-cb1 button, …) and state.
# A gateway's own status row is "gateway"; a status from a device not in the directory
# is "unregistered".
_DEVICES = """
SELECT coalesce(d.profile,
                CASE WHEN s.device_id LIKE 'gateway:%' THEN 'gateway' ELSE 'unregistered' END),
       s.online, count(*)
FROM device_status s LEFT JOIN devices d ON d.site_id = s.site_id AND d.id = s.device_id
GROUP BY 1, 2
"""


@dataclass(frozen=True, slots=True)
class AlertFact:
    """What one change contributes to the district's totals."""

    kind: str  # opened | acknowledged | on_scene | escalated
    type: str
    severity: str
    unit: str = NO_UNIT
    seconds: float | None = None  # acknowledged / on_scene: since the ladder started
    level: int | None = None  # escalated: the step's rung
    step_kind: str | None = None  # escalated: level, repeat or service_circle


def _time(alert: Mapping[str, Any], key: str) -> datetime | None:
    value = alert.get(key)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _since_anchor(alert: Mapping[str, Any], key: str) -> float | None:
    """Seconds from the start of the alert's current ladder to ``key``.

    The ladder starts when the alert opens; a reopened alert (or one whose severity
    was raised) starts a new ladder and must be acknowledged again, so that is
    measured from its new start. A negative span (servers' clocks apart) counts as 0.
    """
    anchor = _time(alert, "escalation_anchor") or _time(alert, "opened_at")
    at = _time(alert, key)
    if anchor is None or at is None or anchor.tzinfo is None or at.tzinfo is None:
        return None
    return max(0.0, (at - anchor).total_seconds())


def facts_from_change(
    action: str,
    alert: Mapping[str, Any] | None,
    unit: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> tuple[AlertFact, ...]:
    """The facts of one change-log row (pure: the row's fields in, facts out).

    An alert taken on scene with no acknowledgement before (the same transition
    sets both) is acknowledged then, so it gives an acknowledgement as well.
    """
    if alert is None or action not in COUNTED_ACTIONS:
        return ()
    kind_of = alert.get("type")
    severity = alert.get("severity")
    if not isinstance(kind_of, str) or not isinstance(severity, str):
        return ()
    if action == "opened":
        return (AlertFact("opened", kind_of, severity, unit or NO_UNIT),)
    if action == "escalated":
        detail = detail or {}
        level = detail.get("level", alert.get("level"))
        step_kind = detail.get("kind")
        return (
            AlertFact(
                "escalated",
                kind_of,
                severity,
                level=level if isinstance(level, int) else None,
                step_kind=step_kind if isinstance(step_kind, str) else "level",
            ),
        )
    facts: list[AlertFact] = []
    acknowledged = action == "acknowledged" or (
        action == "on_scene"
        and alert.get("acknowledged_at") is not None
        and alert.get("acknowledged_at") == alert.get("on_scene_at")
    )
    if acknowledged:
        seconds = _since_anchor(alert, "acknowledged_at")
        if seconds is not None:
            facts.append(AlertFact("acknowledged", kind_of, severity, seconds=seconds))
    if action == "on_scene":
        seconds = _since_anchor(alert, "on_scene_at")
        if seconds is not None:
            facts.append(AlertFact("on_scene", kind_of, severity, seconds=seconds))
    return tuple(facts)


@dataclass
class Buckets:
    """A cumulative histogram kept by hand (the collector builds it from the log)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.n += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out = [(_bound_label(b), float(c)) for b, c in zip(self.bounds, self.counts, strict=True)]
        return [*out, ("+Inf", float(self.n))]


def _bound_label(bound: float) -> str:
    return str(int(bound)) if bound.is_integer() else repr(bound)


@dataclass
class DistrictTotals:
    """Running totals folded from the change log, and how far it was read."""

    position: int = 0  # the commit_seq read through
    opened: dict[tuple[str, str, str], int] = field(default_factory=dict)
    escalations: dict[tuple[str, str], int] = field(default_factory=dict)
    to_acknowledge: dict[tuple[str, str], Buckets] = field(default_factory=dict)
    to_on_scene: dict[tuple[str, str], Buckets] = field(default_factory=dict)

    def add(self, fact: AlertFact) -> None:
        if fact.kind == "opened":
            key3 = (fact.type, fact.severity, fact.unit)
            self.opened[key3] = self.opened.get(key3, 0) + 1
        elif fact.kind == "escalated":
            level = "" if fact.level is None else str(fact.level)
            key2 = (level, fact.step_kind or "level")
            self.escalations[key2] = self.escalations.get(key2, 0) + 1
        elif fact.seconds is not None:
            table, bounds = (
                (self.to_acknowledge, ACK_BUCKETS)
                if fact.kind == "acknowledged"
                else (self.to_on_scene, ON_SCENE_BUCKETS)
            )
            key = (fact.type, fact.severity)
            if key not in table:
                table[key] = Buckets(bounds)
            table[key].observe(fact.seconds)


@dataclass(frozen=True, slots=True)
class Gauges:
    notifications: tuple[tuple[str, int, float], ...] = ()  # channel, pending, oldest s
    downlink: tuple[int, float] = (0, 0.0)
    inboxes: tuple[tuple[str, int, float], ...] = ()
    unresolved: tuple[tuple[str, str, str, str, int], ...] = ()
    devices: tuple[tuple[str, bool, int], ...] = ()


class DistrictCollector(Collector):
    """Registered by ``eldersafe server`` beside its own per-process metrics."""

    def __init__(
        self,
        dsn: str,
        *,
        cache_s: float = 5.0,
        page: int = 5000,
        budget_s: float = 3.0,
        statement_timeout_ms: int = 5000,
    ) -> None:
        self.dsn = dsn
        self.cache_s = cache_s
        self.page = page
        self.budget_s = budget_s
        self.statement_timeout_ms = statement_timeout_ms
        self.totals = DistrictTotals()
        self.gauges = Gauges()
        self.up = False
        self.caught_up = False  # the change log read to its end once since the start
        self.errors = 0
        self.refreshed_at: float | None = None  # monotonic
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return []  # no query at registration: the families are built at scrape time

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = time.monotonic()
            if self.refreshed_at is None or now - self.refreshed_at >= self.cache_s:
                self._refresh()
            families = list(self._families())
        yield from families

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- reading -------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=3)
            conn.execute(f"SET statement_timeout = {int(self.statement_timeout_ms)}")
            conn.execute("SET application_name = 'eldersafe-district-metrics'")
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _refresh(self) -> None:
        try:
            conn = self._connection()
            self._read_changes(conn)
            self.gauges = self._read_gauges(conn)
            self.up = True
        except (psycopg.Error, OSError) as exc:
            self.errors += 1
            self.up = False
            log.warning("district metrics not read (last values kept): %s", exc)
            self._drop()
        except Exception:  # a bug here must not take the server's own series down too
            self.errors += 1
            self.up = False
            log.exception("district metrics failed (last values kept)")
            self._drop()
        # also after a failure: a database away is not asked again at every scrape
        self.refreshed_at = time.monotonic()

    def _read_changes(self, conn: psycopg.Connection[Any]) -> None:
        """Fold new change-log rows into the totals, page by page, within the budget."""
        started = time.monotonic()
        while True:
            rows = conn.execute(
                _CHANGES,
                {
                    "counted": list(COUNTED_ACTIONS),
                    "after": self.totals.position,
                    "limit": self.page,
                },
            ).fetchall()
            self._fold(rows)
            if len(rows) < self.page:
                self.caught_up = True
                return
            if time.monotonic() - started > self.budget_s:
                return

    def _fold(self, rows: Sequence[tuple[Any, ...]]) -> None:
        for position, action, alert, unit, detail in rows:
            for fact in facts_from_change(action, alert, unit, detail):
                self.totals.add(fact)
            self.totals.position = position

    def _read_gauges(self, conn: psycopg.Connection[Any]) -> Gauges:
        downlink = conn.execute(_DOWNLINK_PENDING).fetchone()
        return Gauges(
            notifications=tuple(
                (str(c), int(n), float(age)) for c, n, age in conn.execute(_NOTIFICATIONS_PENDING)
            ),
            downlink=(int(downlink[0]), float(downlink[1])) if downlink else (0, 0.0),
            inboxes=tuple((str(k), int(n), float(age)) for k, n, age in conn.execute(_INBOXES)),
            unresolved=tuple(
                (str(t), str(s), str(st), str(u), int(n))
                for t, s, st, u, n in conn.execute(_UNRESOLVED, (NO_UNIT,))
            ),
            devices=tuple((str(p), bool(o), int(n)) for p, o, n in conn.execute(_DEVICES)),
        )

    # -- exposition ----------------------------------------------------------

    def _families(self) -> Iterable[Metric]:
        if self.caught_up:
            yield from self._log_families()
        # Until the log is read to its end, the totals are short of the district's: a
        # counter that climbed through a catch-up would read as a burst of alerts to
        # rate(). Absent series instead; then the first value is the whole count.
        yield GaugeMetricFamily(
            "eldersafe_district_metrics_catching_up",
            "1 while this server reads the change log it has not read since its start"
            " (the alert series are left out meanwhile)",
            value=float(not self.caught_up),
        )
        yield from self._gauge_families()

    def _log_families(self) -> Iterable[Metric]:
        t = self.totals
        opened = CounterMetricFamily(
            "eldersafe_alerts_opened",
            "alerts opened in the district by type, severity at opening and responsible unit"
            " (from the database: the same on every server, aggregate with max)",
            labels=["type", "severity", "unit"],
        )
        for (kind_of, severity, unit), n in sorted(t.opened.items()):
            opened.add_metric([kind_of, severity, unit], n)
        yield opened

        escalations = CounterMetricFamily(
            "eldersafe_alert_escalations",
            "escalation steps fired in the district by rung (level 0: the first notice at"
            " once) and kind (level, repeat of the top rung, service_circle)",
            labels=["level", "kind"],
        )
        for (level, step_kind), n in sorted(t.escalations.items()):
            escalations.add_metric([level, step_kind], n)
        yield escalations

        for name, text, table in (
            (
                "eldersafe_alert_time_to_acknowledge_seconds",
                "from the start of an alert's ladder (its opening; a reopening) to its"
                " acknowledgement (target for critical alerts: 60 s)",
                t.to_acknowledge,
            ),
            (
                "eldersafe_alert_time_to_on_scene_seconds",
                "from the start of an alert's ladder to staff on scene (target: 15 min)",
                t.to_on_scene,
            ),
        ):
            family = HistogramMetricFamily(name, text, labels=["type", "severity"])
            for (kind_of, severity), buckets in sorted(table.items()):
                family.add_metric([kind_of, severity], buckets.cumulative(), buckets.total)
            yield family

    def _gauge_families(self) -> Iterable[Metric]:
        g = self.gauges
        unresolved = GaugeMetricFamily(
            "eldersafe_alerts_unresolved",
            "alerts not yet resolved, by type, severity, status and responsible unit",
            labels=["type", "severity", "status", "unit"],
        )
        for kind_of, severity, status, unit, n in g.unresolved:
            unresolved.add_metric([kind_of, severity, status, unit], n)
        yield unresolved

        pending = GaugeMetricFamily(
            "eldersafe_notifications_pending",
            "notices in the notifications outbox not yet delivered or closed, by channel",
            labels=["channel"],
        )
        oldest = GaugeMetricFamily(
            "eldersafe_notifications_pending_oldest_seconds",
            "age of the oldest pending notice, by channel",
            labels=["channel"],
        )
        for channel, n, age in g.notifications:
            pending.add_metric([channel], n)
            oldest.add_metric([channel], age)
        yield pending
        yield oldest

        yield GaugeMetricFamily(
            "eldersafe_downlink_pending",
            "device commands in the downlink outbox not yet published",
            value=g.downlink[0],
        )
        yield GaugeMetricFamily(
            "eldersafe_downlink_pending_oldest_seconds",
            "age of the oldest unpublished device command",
            value=g.downlink[1],
        )

        depth = GaugeMetricFamily(
            "eldersafe_engine_inbox_depth",
            "committed rows the alert engine has not applied yet, by inbox (events,"
            " command_results, readings for server-side thresholds)",
            labels=["inbox"],
        )
        lag = GaugeMetricFamily(
            "eldersafe_engine_inbox_lag_seconds",
            "age of the oldest unapplied row: how far alerts lag behind ingest",
            labels=["inbox"],
        )
        for inbox, n, age in g.inboxes:
            depth.add_metric([inbox], n)
            lag.add_metric([inbox], age)
        yield depth
        yield lag

        devices = GaugeMetricFamily(
            "eldersafe_devices",
            "devices by class (profile) and state (online, offline) from their last status",
            labels=["profile", "state"],
        )
        for profile, online, n in g.devices:
            devices.add_metric([profile, "online" if online else "offline"], n)
        yield devices

        yield GaugeMetricFamily(
            "eldersafe_district_metrics_up",
            "1 if the last read of the district's metrics from the database succeeded",
            value=float(self.up),
        )
        yield CounterMetricFamily(
            "eldersafe_district_metrics_errors",
            "failed reads of the district's metrics (the last values were kept)",
            value=self.errors,
        )
