"""Telemetry straight from JSON to binary COPY rows, without pydantic objects.

Telemetry is nearly all of ingest's traffic, and pydantic builds a model per
message and per reading (≈ 6 µs of a 1-reading message). This path checks the
contract of ``TelemetryPayload`` by hand on the plain values ``orjson``
returns and appends the COPY rows directly. It only ever *accepts*: whatever
it does not accept — a refusal or a shape it does not handle (an unusual time
format, a huge number, …) — it hands back (``None``), and the caller runs the
pydantic model, which then decides, so a dead letter keeps pydantic's precise
reason. ``tests/unit/test_ingest_fastpath.py`` proves with hypothesis that it
accepts only what ``TelemetryPayload.model_validate_json`` accepts, with the
same rows.

The checks, each as strict as the model: exactly the keys of the model (no
extras, required ones present), ``v`` the integer 1, numbers int or float but
never bool, finite and within ±2**63 (larger ones go to pydantic), metrics
matching ``Metric``'s pattern, units strings of at most 16 characters without
NUL, times RFC 3339 with an offset in the common shape
(``YYYY-MM-DDTHH:MM:SS[.ffffff](Z|±HH:MM)``) inside the contract's time window,
1 to 1000 readings.
"""

from __future__ import annotations

import re
import struct
from datetime import UTC, datetime, timedelta

import orjson

from gateway.contract import payloads as _contract
from gateway.contract.payloads import _DAY_US, _ORDINAL_1970, EARLIEST_TIME, MAX_AHEAD

_ORDINAL_2000 = datetime(2000, 1, 1).toordinal()  # PostgreSQL's timestamp epoch
_EPOCH_2000 = datetime(2000, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
# check_window's scale is µs since day 1 of year 1 (by ordinal); COPY's since 2000 UTC
_WINDOW_SHIFT = _ORDINAL_2000 * _DAY_US
_EARLIEST_US = (EARLIEST_TIME - _EPOCH_2000) // _ONE_US  # 0, spelled out
_NUMBER_LIMIT = 2.0**63
# window_limit() inlined, on COPY's scale: round((clock() + 24 h) * 1e6) + _LATEST_SHIFT
_AHEAD_S = MAX_AHEAD.total_seconds()
_LATEST_SHIFT = _ORDINAL_1970 * _DAY_US - _WINDOW_SHIFT

_TIME_SHAPE = re.compile(
    r"\d{4}-\d{2}-\d{2}T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)",
    re.ASCII,
).fullmatch
_METRIC = re.compile(r"[a-z][a-z0-9_]{0,63}", re.ASCII).fullmatch
_fromisoformat = datetime.fromisoformat
_loads = orjson.loads

_ROW_HEAD = struct.Struct("!hiq").pack  # 6 columns; time: 8 bytes, µs since 2000 UTC
_VALUE = struct.Struct("!id").pack  # value: 8 bytes, float8
_TOP_KEYS = frozenset({"v", "time", "readings"})
_READING_KEYS = frozenset({"metric", "value", "unit", "time"})
_ALL_KEYS = {"metric": 0, "value": 0, "unit": 0, "time": 0}.keys()  # dict_keys == is fastest
_REQUIRED_KEYS = {"metric": 0, "value": 0}.keys()
_CACHE_SIZE = 10_000


def _text_field(value: str) -> bytes:
    raw = value.encode()
    return len(raw).to_bytes(4, "big") + raw


class TelemetryFastPath:
    """Caches what it has checked (devices repeat metrics, units and often times)."""

    def __init__(self) -> None:
        self._metrics: dict[str, bytes] = {}  # metric -> its COPY field
        self._units: dict[str, bytes] = {"": _text_field("")}  # unit -> its COPY field
        self._times: dict[str, int] = {}  # time text -> µs since 2000 UTC (window apart)

    def rows(self, payload: bytes, fields: bytes) -> tuple[bytearray, int] | None:
        """The COPY rows of a valid telemetry payload and their count; None: ask pydantic."""
        try:
            return self._rows(payload, fields)
        except Exception:  # any surprise is pydantic's to judge (never a verdict here)
            return None

    def _time(self, text: object) -> int | None:
        """µs since 2000 UTC of a time in the common shape, or None (not handled here)."""
        if type(text) is not str or _TIME_SHAPE(text) is None:
            return None
        times = self._times
        if len(times) >= _CACHE_SIZE:
            times.clear()
        us = times[text] = (_fromisoformat(text) - _EPOCH_2000) // _ONE_US
        return us

    def _metric(self, metric: object) -> bytes | None:
        if type(metric) is not str or _METRIC(metric) is None:
            return None
        if len(self._metrics) >= _CACHE_SIZE:
            self._metrics.clear()
        field = self._metrics[metric] = _text_field(metric)
        return field

    def _unit(self, unit: object) -> bytes | None:
        if type(unit) is not str or len(unit) > 16 or "\x00" in unit:
            return None
        if len(self._units) >= _CACHE_SIZE:
            self._units.clear()
        field = self._units[unit] = _text_field(unit)
        return field

    def _rows(self, payload: bytes, fields: bytes) -> tuple[bytearray, int] | None:
        # The caches are keyed by str only, so a hit is a checked str; a value of
        # another type misses (or raises TypeError, unhashable: handed back) and
        # is checked by the method that fills the cache.
        doc = _loads(payload)
        if type(doc) is not dict or doc.keys() != _TOP_KEYS:
            return None
        v = doc["v"]
        readings = doc["readings"]
        if type(v) is not int or v != 1 or type(readings) is not list:
            return None
        n = len(readings)
        if n == 0 or n > 1000:
            return None
        times, metrics, units = self._times, self._metrics, self._units
        default_us = times.get(doc["time"]) or self._time(doc["time"])
        if default_us is None:
            return None
        # one read of the contract's clock per message, like the model's window_limit()
        latest = round((_contract.clock() + _AHEAD_S) * 1e6) + _LATEST_SHIFT
        if default_us < _EARLIEST_US or default_us > latest:
            return None
        rows = bytearray()
        for r in readings:
            if type(r) is not dict:
                return None
            keys = r.keys()
            if keys == _ALL_KEYS:
                at = r["time"]
                if at is None:
                    us = default_us
                else:
                    at_us = times.get(at) or self._time(at)
                    if at_us is None or at_us < _EARLIEST_US or at_us > latest:
                        return None
                    us = at_us
                unit = units.get(r["unit"]) or self._unit(r["unit"])
                if unit is None:
                    return None
            elif keys == _REQUIRED_KEYS:
                us, unit = default_us, units[""]
            elif keys <= _READING_KEYS and "metric" in keys and "value" in keys:
                at = r.get("time")
                if at is None:
                    us = default_us
                else:
                    at_us = times.get(at) or self._time(at)
                    if at_us is None or at_us < _EARLIEST_US or at_us > latest:
                        return None
                    us = at_us
                unit = units.get(r.get("unit", "")) or self._unit(r.get("unit", ""))
                if unit is None:
                    return None
            else:
                return None
            metric = metrics.get(r["metric"]) or self._metric(r["metric"])
            if metric is None:
                return None
            value = r["value"]
            tv = type(value)
            if tv is float:
                if not -_NUMBER_LIMIT < value < _NUMBER_LIMIT:  # also refuses NaN
                    return None
            elif tv is int:
                if not -_NUMBER_LIMIT < value < _NUMBER_LIMIT:
                    return None
                value = float(value)
            else:  # bool, str, None, …
                return None
            rows += _ROW_HEAD(6, 8, us) + fields + metric + _VALUE(8, value) + unit
        return rows, n
