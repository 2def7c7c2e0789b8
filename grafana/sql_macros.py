"""Grafana's PostgreSQL query interpolation, reproduced so a panel's SQL can run without Grafana.

Grafana cannot be installed on the project's machines, so the tests run each
panel's SQL against TimescaleDB after the same two passes Grafana makes:

1. the frontend's template pass (public/app/features/templating/template_srv and
   the SQL datasource's ``interpolateVariable``): ``$var``, ``${var}``,
   ``${var:sqlstring}`` and the built-ins ``$__interval`` / ``$__interval_ms``;
   a name that is no variable is left alone (``$__timeFilter`` among them);
2. the backend's macro pass (pkg/tsdb/grafana-postgresql-datasource/macros.go):
   every ``$name(args)`` is a macro, an unknown one is an error. Times are RFC 3339
   in UTC with Go's ``RFC3339Nano`` trimming; ``$__timeGroup`` is ``time_bucket``
   when the datasource says ``timescaledb: true`` (ours does), and turns into
   ``$__timeGroupAlias`` when a comma follows it, as Grafana's does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


class MacroError(ValueError):
    """A macro Grafana would refuse (unknown name, missing argument, bad interval)."""


@dataclass(frozen=True, slots=True)
class Variable:
    """A template variable's current value(s), as the dashboard would send them."""

    values: tuple[str, ...]
    multi: bool = True
    include_all: bool = True


@dataclass(frozen=True, slots=True)
class QueryContext:
    time_from: datetime
    time_to: datetime
    interval: timedelta = timedelta(minutes=1)
    variables: Mapping[str, Variable] = field(default_factory=dict)
    timescaledb: bool = True


# template_srv's variable syntax: $name, [[name:format]], ${name.fieldPath:format}
_TEMPLATE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}"
)
# macros.go: sExpr = `\$` + `([_a-zA-Z0-9]+)` + `\(([^\)]*)\)`
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")
_INTERVAL = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800,
                 "y": 31536000}  # fmt: skip


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def format_variable(variable: Variable, fmt: str | None) -> str:
    """``sqlstring``: each value quoted, quotes doubled, comma-joined; no format: the SQL
    datasource's default (quoted when multi or all, else only the quotes doubled)."""
    if fmt == "sqlstring" or (fmt is None and (variable.multi or variable.include_all)):
        return ",".join(quote_literal(v) for v in variable.values)
    if fmt is None:
        return ",".join(v.replace("'", "''") for v in variable.values)
    if fmt == "csv":
        return ",".join(variable.values)
    raise MacroError(f"variable format {fmt!r} is not one this project's panels use")


def format_interval(interval: timedelta) -> str:
    """Grafana's gtime.FormatInterval: the largest whole unit that fits."""
    ms = int(interval / timedelta(milliseconds=1))
    for unit, size in (("y", 31536000000), ("d", 86400000), ("h", 3600000), ("m", 60000),
                       ("s", 1000), ("ms", 1)):  # fmt: skip
        if ms >= size:
            return f"{ms // size}{unit}"
    return "1ms"


def parse_interval(text: str) -> timedelta:
    m = _INTERVAL.match(text.strip().strip("'"))
    if m is None:
        raise MacroError(f"error parsing interval {text}")
    return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])


def rfc3339nano(t: datetime) -> str:
    """Go's time.RFC3339Nano of a UTC time: fraction without trailing zeros, 'Z'."""
    t = t.astimezone(UTC)
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.microsecond:
        text += "." + f"{t.microsecond:06d}".rstrip("0")
    return text + "Z"


def interpolate_variables(sql: str, ctx: QueryContext) -> str:
    """The frontend's pass: dashboard variables and the interval built-ins."""
    builtins = {
        "__interval": format_interval(ctx.interval),
        "__interval_ms": str(int(ctx.interval / timedelta(milliseconds=1))),
    }

    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(6)
        if m.group(5):
            raise MacroError(f"field paths (${{{name}.{m.group(5)}}}) are not supported")
        if name in builtins:
            return builtins[name]
        variable = ctx.variables.get(name)
        if variable is None:
            return m.group(0)  # not a variable: Grafana leaves it as written
        return format_variable(variable, fmt)

    return _TEMPLATE.sub(replace, sql)


def _macro(name: str, args: Sequence[str], ctx: QueryContext) -> str:
    t_from, t_to = rfc3339nano(ctx.time_from), rfc3339nano(ctx.time_to)
    if name in ("__time", "__timeEpoch", "__timeFilter") and not args[0]:
        raise MacroError(f"missing time column argument for macro {name}")
    if name == "__time":
        return f'{args[0]} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {args[0]}) as "time"'
    if name == "__timeFilter":
        return f"{args[0]} BETWEEN '{t_from}' AND '{t_to}'"
    if name == "__timeFrom":
        return f"'{t_from}'"
    if name == "__timeTo":
        return f"'{t_to}'"
    if name in ("__timeGroup", "__timeGroupAlias"):
        if len(args) < 2:
            raise MacroError(f"macro {name} needs time column and interval and optional fill")
        if len(args) == 3:
            raise MacroError("fill modes are Grafana's post-processing; panels here use none")
        seconds = parse_interval(args[1]).total_seconds()
        if ctx.timescaledb:
            group = f"time_bucket('{seconds:.3f}s',{args[0]})"
        else:
            group = f"floor(extract(epoch from {args[0]})/{seconds:g})*{seconds:g}"
        return group + (' AS "time"' if name == "__timeGroupAlias" else "")
    raise MacroError(f"unknown macro {name!r}")


def expand_macros(sql: str, ctx: QueryContext) -> str:
    """The backend's pass (macros.go Interpolate)."""

    def replace(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "__timeGroup":
            end = sql.find(m.group(0))
            after = end + len(m.group(0)) if end >= 0 else -1
            if 0 <= after < len(sql) and sql[after] == ",":
                name = "__timeGroupAlias"
        args = [a.strip() for a in m.group(2).split(",")]
        return _macro(name, args, ctx)

    return _MACRO.sub(replace, sql)


def interpolate(sql: str, ctx: QueryContext) -> str:
    """A panel's SQL as Grafana would send it to PostgreSQL."""
    return expand_macros(interpolate_variables(sql, ctx), ctx)
