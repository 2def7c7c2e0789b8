"""The Grafana screens as code: ``python -m grafana.generate`` writes grafana/dashboards/*.json.

Built with Grafana's own typed builders (grafana-foundation-sdk of the Grafana
release docker-compose runs, 11.3), so a panel option that Grafana's dashboard
model does not know is a type error here rather than a screen that silently
ignores it. The SDK has no query type
for the PostgreSQL datasource, so ``SqlQuery`` below is that one model, in the
SDK's own ``Dataquery`` shape, and is registered with the SDK's runtime so the
committed JSON parses back through it (tests/unit/test_dashboards_model.py).

Every query is raw SQL over the schema in gateway/db/migrations with Grafana's
PostgreSQL macros (``$__timeFilter``, ``$__timeGroupAlias``, ``$__timeTo()``)
and the template variables ``street`` / ``unit`` / ``institution`` formatted
``${var:sqlstring}`` (quoted, comma-joined: what ``IN (...)`` needs). A panel
whose columns are fixed names them once, in an "organize" transformation that
also gives the bilingual headers; tests/integration/test_dashboards.py runs
each query and compares its columns with that list.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import stat, table, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

DATASOURCE_TYPE = "grafana-postgresql-datasource"
DATASOURCE_UID = "eldersafe-timescaledb"  # provisioning/datasources/timescaledb.yaml
DATASOURCE = dm.DataSourceRef(type_val=DATASOURCE_TYPE, uid=DATASOURCE_UID)
DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"

QueryFormat = Literal["table", "time_series"]

# ARCHITECTURE §4/§5 targets drawn as thresholds, and alerting.conditions' limits.
ACK_TARGET_S = 60
ON_SCENE_TARGET_S = 15 * 60
RESIDUAL_CURRENT_WARNING_MA = 240.0
RESIDUAL_CURRENT_ALARM_MA = 300.0
CABLE_TEMPERATURE_ALARM_C = 70.0
LOW_BATTERY_PCT = 20


# --- the PostgreSQL query model ------------------------------------------------------------


class SqlQuery(cogvariants.Dataquery):
    """A target of Grafana's PostgreSQL datasource in code mode (raw SQL)."""

    def __init__(
        self,
        ref_id: str = "",
        raw_sql: str = "",
        format: QueryFormat = "table",
        datasource: dm.DataSourceRef | None = None,
        raw_query: bool = True,
        editor_mode: Literal["code", "builder"] = "code",
    ) -> None:
        self.ref_id = ref_id
        self.raw_sql = raw_sql
        self.format = format
        self.datasource = datasource
        self.raw_query = raw_query
        self.editor_mode = editor_mode

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "refId": self.ref_id,
            "rawSql": self.raw_sql,
            "format": self.format,
            "rawQuery": self.raw_query,
            "editorMode": self.editor_mode,
        }
        if self.datasource is not None:
            payload["datasource"] = self.datasource
        return payload

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        args: dict[str, Any] = {}
        for key, name in (("refId", "ref_id"), ("rawSql", "raw_sql"), ("format", "format"),
                          ("rawQuery", "raw_query"), ("editorMode", "editor_mode")):  # fmt: skip
            if key in data:
                args[name] = data[key]
        if "datasource" in data:
            args["datasource"] = dm.DataSourceRef.from_json(data["datasource"])
        return cls(**args)


def register_sql_query() -> None:
    """Let the SDK's runtime parse our targets back into ``SqlQuery`` (not an untyped bag)."""
    cogruntime.register_dataquery_variant(
        cogruntime.DataqueryConfig(identifier=DATASOURCE_TYPE, from_json_hook=SqlQuery.from_json)
    )


class Sql(cogbuilder.Builder[SqlQuery]):
    def __init__(self, raw_sql: str, format: QueryFormat = "table", ref_id: str = "A") -> None:
        self._internal = SqlQuery(ref_id, raw_sql.strip(), format, DATASOURCE)

    def build(self) -> SqlQuery:
        return self._internal


# --- panels ---------------------------------------------------------------------------------

Columns = Sequence[tuple[str, str]]  # (SQL column, header shown)


def organize(columns: Columns) -> dm.DataTransformerConfig:
    """The panel's columns in order with their bilingual headers: the shape tests check."""
    return dm.DataTransformerConfig(
        id_val="organize",
        options={
            "excludeByName": {},
            "indexByName": {name: i for i, (name, _) in enumerate(columns)},
            "renameByName": {name: header for name, header in columns},
        },
    )


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


OK_STEPS: tuple[tuple[float | None, str], ...] = ((None, "green"),)


@dataclass(frozen=True, slots=True)
class Place:
    w: int
    h: int


# A share that should be high: red below the first value, orange below the second.
SHARE_STEPS: tuple[tuple[float | None, str], ...] = ((None, "red"), (80, "orange"), (95, "green"))


def stat_panel(
    title: str, description: str, sql: str, columns: Columns, unit: str = "short",
    steps: Sequence[tuple[float | None, str]] = OK_STEPS,
) -> stat.Panel:  # fmt: skip
    """A stat: one row of numbers, each column a value; a column ending in ``_pct`` is a
    share in per cent with its own colours."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(Sql(sql))
        .with_transformation(organize(columns))
        .unit(unit)
        .thresholds(thresholds(*steps))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .color_mode(cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .text_mode(cm.BigValueTextMode.VALUE_AND_NAME)
    )
    for name, header in columns:
        if name.endswith("_pct"):
            panel = panel.override_by_name(header, [
                dm.DynamicConfigValue(id_val="unit", value="percent"),
                dm.DynamicConfigValue(id_val="thresholds", value=thresholds(*SHARE_STEPS).build()),
            ])  # fmt: skip
    return panel


# A table column's unit from its SQL name's suffix (durations shown as "4 min 20 s").
UNIT_BY_SUFFIX = {"_s": "s", "_pct": "percent", "_ma": "mA", "_c": "celsius"}


def table_panel(title: str, description: str, sql: str, columns: Columns) -> table.Panel:
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(Sql(sql))
        .with_transformation(organize(columns))
        .show_header(True)
    )
    for name, header in columns:
        unit = next((u for suffix, u in UNIT_BY_SUFFIX.items() if name.endswith(suffix)), None)
        if unit is not None:
            panel = panel.override_by_name(header, [dm.DynamicConfigValue(id_val="unit",
                                                                          value=unit)])
    return panel


def timeseries_panel(
    title: str, description: str, sql: str, columns: Columns | None, unit: str = "short",
    steps: Sequence[tuple[float | None, str]] = OK_STEPS, bars: bool = False,
) -> timeseries.Panel:  # fmt: skip
    """A time series; ``columns`` None: long format, one series per ``metric`` value."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(Sql(sql, "time_series"))
        .unit(unit)
        .thresholds(thresholds(*steps))
        .legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    if columns is not None:
        panel = panel.with_transformation(organize([("time", "时间 time"), *columns]))
    if len(steps) > 1:
        panel = panel.thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
        )
    if bars:
        panel = panel.draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60)
    return panel


PanelBuilder = stat.Panel | table.Panel | timeseries.Panel


def layout(rows: Sequence[Sequence[tuple[PanelBuilder, int, int]]]) -> list[dm.Panel]:
    """Rows of (panel, width, height) on Grafana's 24-column grid; ids in reading order."""
    panels: list[dm.Panel] = []
    y = 0
    for row in rows:
        x = 0
        for builder, w, h in row:
            if x + w > 24:
                raise ValueError(f"row wider than the grid at {builder.build().title!r}")
            panel = builder.build()
            panel.id_val = len(panels) + 1
            panel.grid_pos = dm.GridPos(h=h, w=w, x=x, y=y)
            panels.append(panel)
            x += w
        y += max(h for _, _, h in row)
    return panels


def query_variable(
    name: str, label: str, sql: str, multi: bool = True, include_all: bool = True
) -> db.QueryVariable:
    """A variable from SQL (``__value`` / ``__text`` columns); All selected at first."""
    variable = (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(sql.strip())
        .refresh(dm.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(multi)
        .include_all(include_all)
    )
    if include_all:
        variable = variable.current(
            dm.VariableOption(selected=True, text=["All"], value=["$__all"])
        )
    return variable


def dashboard(
    uid: str, title: str, description: str, tags: list[str],
    variables: Sequence[db.QueryVariable], panels: list[dm.Panel],
) -> dm.Dashboard:  # fmt: skip
    builder = (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["eldersafe", *tags])
        .timezone("browser")
        .time("now-24h", "now")
        .refresh("30s")
        .readonly()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
    )
    for variable in variables:
        builder = builder.with_variable(variable)
    built = builder.build()
    built.panels = list(panels)
    return built


# --- shared SQL -------------------------------------------------------------------------------

STREET_VARIABLE = query_variable(
    "street", "街道 Street",
    "SELECT id AS __value, name AS __text FROM organisations WHERE kind = 'street'",
)  # fmt: skip
UNIT_VARIABLE = query_variable(
    "unit", "单位 Unit",
    "SELECT id AS __value, name AS __text FROM organisations"
    " WHERE kind IN ('station', 'institution') AND parent_id IN (${street:sqlstring})",
)  # fmt: skip
INSTITUTION_VARIABLE = query_variable(
    "institution", "机构 Institution",
    "SELECT id AS __value, name AS __text FROM organisations WHERE kind = 'institution'",
)  # fmt: skip

# The units a screen shows: the streets and units picked (u = the responsible unit).
IN_UNITS = "u.parent_id IN (${street:sqlstring}) AND u.id IN (${unit:sqlstring})"
IN_INSTITUTION = "u.id IN (${institution:sqlstring})"
ALERTS_BY_UNIT = """alerts a JOIN sites s ON s.id = a.site_id
JOIN organisations u ON u.id = s.organisation_id"""


def open_alerts_sql(scope: str) -> str:
    return f"""
SELECT count(*) FILTER (WHERE a.severity = 'critical') AS critical,
       count(*) FILTER (WHERE a.severity = 'major') AS major,
       count(*) FILTER (WHERE a.severity = 'minor') AS minor,
       count(*) AS total
FROM {ALERTS_BY_UNIT}
WHERE a.status <> 'resolved' AND {scope}"""


OPEN_ALERTS_COLUMNS = [("critical", "危急 Critical"), ("major", "重要 Major"),
                       ("minor", "一般 Minor"), ("total", "合计 Total")]  # fmt: skip


def response_sql(scope: str, reached: str, target_s: int) -> str:
    """Seconds from opening to a person's response for critical alerts opened in the range;
    an alert still waiting past the target counts as missed, one within it as not yet known."""
    return f"""
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY r.seconds) AS p50_s,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY r.seconds) AS p90_s,
       100.0 * count(*) FILTER (WHERE r.seconds <= {target_s})
         / nullif(count(*) FILTER (WHERE r.seconds IS NOT NULL
                                   OR r.opened_at < $__timeTo()::timestamptz
                                      - interval '{target_s} seconds'), 0) AS within_target_pct
FROM (
  SELECT a.opened_at, extract(epoch FROM {reached} - a.opened_at)::float8 AS seconds
  FROM {ALERTS_BY_UNIT}
  WHERE a.severity = 'critical' AND $__timeFilter(a.opened_at) AND {scope}
) r"""


ACK = "least(a.acknowledged_at, a.on_scene_at)"  # arriving without an ack is a response too
ON_SCENE = "a.on_scene_at"


def response_columns(target: str) -> list[tuple[str, str]]:
    return [("p50_s", "中位 p50"), ("p90_s", "p90"), ("within_target_pct", f"{target} 内 within")]


def devices_online_sql(scope: str) -> str:
    """Registered devices by their latest retained status (never reported: unknown)."""
    return f"""
SELECT count(*) FILTER (WHERE ds.online) AS online,
       count(*) FILTER (WHERE NOT ds.online) AS offline,
       count(*) FILTER (WHERE ds.online IS NULL) AS never_seen,
       100.0 * count(*) FILTER (WHERE ds.online) / nullif(count(*), 0) AS online_pct
FROM devices d JOIN sites s ON s.id = d.site_id
JOIN organisations u ON u.id = s.organisation_id
LEFT JOIN device_status ds ON ds.site_id = d.site_id AND ds.device_id = d.id
WHERE {scope}"""


DEVICES_ONLINE_COLUMNS = [("online", "在线 Online"), ("offline", "离线 Offline"),
                          ("never_seen", "未上报 Never seen"),
                          ("online_pct", "在线率 Online %")]  # fmt: skip


def alerts_over_time_sql(scope: str) -> str:
    return f"""
SELECT $__timeGroupAlias(a.opened_at, $__interval),
       count(*) FILTER (WHERE a.severity = 'critical') AS critical,
       count(*) FILTER (WHERE a.severity = 'major') AS major,
       count(*) FILTER (WHERE a.severity = 'minor') AS minor
FROM {ALERTS_BY_UNIT}
WHERE $__timeFilter(a.opened_at) AND {scope}
GROUP BY 1 ORDER BY 1"""


# --- 区级安全总览 District safety -------------------------------------------------------------


def district() -> dm.Dashboard:
    by_unit = table_panel(
        "按街道和单位的未结警情 Open alerts by street and unit",
        "Every unit picked, with its unresolved alerts by severity and how long the oldest "
        "has waited (seconds at the end of the time range).",
        f"""
SELECT st.name AS street, u.name AS unit,
       count(a.id) FILTER (WHERE a.severity = 'critical') AS critical,
       count(a.id) FILTER (WHERE a.severity = 'major') AS major,
       count(a.id) FILTER (WHERE a.severity = 'minor') AS minor,
       count(a.id) AS total,
       max(extract(epoch FROM $__timeTo()::timestamptz - a.opened_at))::float8 AS oldest_s
FROM organisations u JOIN organisations st ON st.id = u.parent_id
LEFT JOIN sites s ON s.organisation_id = u.id
LEFT JOIN alerts a ON a.site_id = s.id AND a.status <> 'resolved'
WHERE u.kind IN ('station', 'institution') AND {IN_UNITS}
GROUP BY st.name, u.name
ORDER BY total DESC, street, unit""",
        [("street", "街道 Street"), ("unit", "单位 Unit"), ("critical", "危急 Critical"),
         ("major", "重要 Major"), ("minor", "一般 Minor"), ("total", "合计 Total"),
         ("oldest_s", "最久等待 Oldest (s)")],
    )  # fmt: skip
    fire = table_panel(
        "火灾与电气事件 Fire and electrical incidents",
        "Smoke (one incident per site) and electrical alerts opened in the range, "
        "with their response and how they closed.",
        f"""
SELECT a.opened_at, st.name AS street, u.name AS unit, s.name AS site, a.type, a.severity,
       a.status, a.level,
       extract(epoch FROM {ACK} - a.opened_at)::float8 AS ack_s,
       a.resolved_at, a.outcome
FROM {ALERTS_BY_UNIT} JOIN organisations st ON st.id = u.parent_id
WHERE a.type IN ('smoke', 'electrical') AND $__timeFilter(a.opened_at) AND {IN_UNITS}
ORDER BY a.opened_at DESC""",
        [("opened_at", "发生 Opened"), ("street", "街道 Street"), ("unit", "单位 Unit"),
         ("site", "地点 Site"), ("type", "类型 Type"), ("severity", "级别 Severity"),
         ("status", "状态 Status"), ("level", "升级 Level"), ("ack_s", "接警 Ack (s)"),
         ("resolved_at", "闭环 Closed"), ("outcome", "结果 Outcome")],
    )  # fmt: skip
    closure = stat_panel(
        "火灾与电气闭环 Fire and electrical closure",
        "Of the smoke and electrical alerts opened in the range: how many are closed.",
        f"""
SELECT count(*) AS opened,
       count(*) FILTER (WHERE a.status = 'resolved') AS closed,
       count(*) FILTER (WHERE a.status <> 'resolved') AS still_open,
       100.0 * count(*) FILTER (WHERE a.status = 'resolved') / nullif(count(*), 0) AS closed_pct
FROM {ALERTS_BY_UNIT}
WHERE a.type IN ('smoke', 'electrical') AND $__timeFilter(a.opened_at) AND {IN_UNITS}""",
        [("opened", "发生 Opened"), ("closed", "闭环 Closed"), ("still_open", "未闭环 Open"),
         ("closed_pct", "闭环率 Closed %")],
    )  # fmt: skip
    escalations = stat_panel(
        "升级 Escalations",
        "Alerts that climbed the ladder in the range, by the highest rung reached: "
        "1 unit supervisor and family, 2 street centre, 3 district bureau; and alerts "
        "acknowledged with nobody on scene within 15 minutes.",
        f"""
SELECT count(DISTINCT x.alert_id) FILTER (WHERE x.kind = 'level' AND x.level = 1) AS level_1,
       count(DISTINCT x.alert_id) FILTER (WHERE x.kind = 'level' AND x.level = 2) AS level_2,
       count(DISTINCT x.alert_id) FILTER (WHERE x.kind = 'level' AND x.level = 3) AS level_3,
       count(DISTINCT x.alert_id) FILTER (WHERE x.kind = 'service_circle') AS service_circle
FROM alert_steps x JOIN {ALERTS_BY_UNIT} ON a.id = x.alert_id
WHERE $__timeFilter(x.fired_at) AND {IN_UNITS}""",
        [("level_1", "单位主管 Level 1"), ("level_2", "街道 Level 2"), ("level_3", "区局 Level 3"),
         ("service_circle", "15 分钟未到场 No one on scene")],
    )  # fmt: skip
    seconds = f"extract(epoch FROM {ACK} - a.opened_at)::float8"
    ack_trend = timeseries_panel(
        "接警用时趋势 Time to acknowledge over time",
        "The slowest and the p90 acknowledgement of critical alerts opened in each "
        "interval, against the 60-second target.",
        f"""
SELECT $__timeGroupAlias(a.opened_at, $__interval),
       max({seconds}) AS slowest_s,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY {seconds}) AS p90_s
FROM {ALERTS_BY_UNIT}
WHERE a.severity = 'critical' AND {ACK} IS NOT NULL AND $__timeFilter(a.opened_at)
  AND {IN_UNITS}
GROUP BY 1 ORDER BY 1""",
        [("slowest_s", "最慢 Slowest"), ("p90_s", "p90")], unit="s",
        steps=((None, "green"), (ACK_TARGET_S, "red")),
    )  # fmt: skip
    panels = layout([
        [(stat_panel("未结警情 Open alerts", "Unresolved alerts now, by severity.",
                     open_alerts_sql(IN_UNITS), OPEN_ALERTS_COLUMNS,
                     steps=((None, "green"), (1, "red"))), 8, 5),
         (stat_panel(
             "危急警情接警用时 Time to acknowledge (critical)",
             f"Seconds from a critical alert to its acknowledgement (or arrival), "
             f"target {ACK_TARGET_S} s, for alerts opened in the range.",
             response_sql(IN_UNITS, ACK, ACK_TARGET_S), response_columns("60 s"),
             unit="s", steps=((None, "green"), (ACK_TARGET_S, "red"))), 8, 5),
         (stat_panel(
             "危急警情到场用时 Time to on scene (critical)",
             "Seconds from a critical alert to staff on scene: the 15-minute service "
             "circle, for alerts opened in the range.",
             response_sql(IN_UNITS, ON_SCENE, ON_SCENE_TARGET_S),
             response_columns("15 min"), unit="s",
             steps=((None, "green"), (ON_SCENE_TARGET_S, "red"))), 8, 5)],
        [(by_unit, 14, 10),
         (timeseries_panel("警情趋势 Alerts over time", "Alerts opened, by severity.",
                           alerts_over_time_sql(IN_UNITS),
                           [("critical", "危急 Critical"), ("major", "重要 Major"),
                            ("minor", "一般 Minor")], bars=True), 10, 10)],
        [(ack_trend, 12, 8),
         (stat_panel("设备在线 Devices online",
                     "Registered devices by their latest status.",
                     devices_online_sql(IN_UNITS), DEVICES_ONLINE_COLUMNS), 6, 8),
         (escalations, 6, 8)],
        [(fire, 16, 9), (closure, 8, 9)],
    ])  # fmt: skip
    return dashboard(
        "eldersafe-district",
        "区级安全总览 District safety",
        "一屏统览: the whole district on one screen — open alerts by street and unit, "
        "response times against the 60-second and 15-minute targets, devices online, fire "
        "and electrical incidents and their closure.",
        ["district"],
        [STREET_VARIABLE, UNIT_VARIABLE],
        panels,
    )


# --- 机构安全 Institution ---------------------------------------------------------------------


def institution() -> dm.Dashboard:
    scope = IN_INSTITUTION
    open_list = table_panel(
        "未结警情列表 Open alerts by room",
        "Unresolved alerts of the institution's rooms, oldest first.",
        f"""
SELECT a.opened_at, s.name AS room, a.type, a.severity, a.status, a.level,
       extract(epoch FROM $__timeTo()::timestamptz - a.opened_at)::float8 AS waiting_s,
       a.acknowledged_by
FROM {ALERTS_BY_UNIT}
WHERE a.status <> 'resolved' AND {scope}
ORDER BY a.opened_at""",
        [("opened_at", "发生 Opened"), ("room", "房间 Room"), ("type", "类型 Type"),
         ("severity", "级别 Severity"), ("status", "状态 Status"), ("level", "升级 Level"),
         ("waiting_s", "等待 Waiting (s)"), ("acknowledged_by", "接警人 Acknowledged by")],
    )  # fmt: skip
    people = stat_panel(
        "在院与值班 Residents and staff on duty",
        "Residents in the institution's rooms and staff whose shift covers the end of the range.",
        f"""
SELECT (SELECT count(*) FROM residents r JOIN sites s ON s.id = r.site_id
        JOIN organisations u ON u.id = s.organisation_id WHERE {scope}) AS residents,
       (SELECT count(DISTINCT sh.staff_id) FROM shifts sh JOIN staff p ON p.id = sh.staff_id
        JOIN organisations u ON u.id = p.organisation_id
        WHERE p.active AND {scope}
          AND $__timeTo()::timestamptz >= sh.starts_at
          AND $__timeTo()::timestamptz < sh.ends_at) AS staff_on_duty""",
        [("residents", "在院老人 Residents"), ("staff_on_duty", "值班人员 On duty")],
    )  # fmt: skip
    by_type = timeseries_panel(
        "按类型的警情 Alerts by type",
        "Alerts opened, one series per alert type.",
        f"""
SELECT $__timeGroupAlias(a.opened_at, $__interval), a.type AS metric, count(*) AS alerts
FROM {ALERTS_BY_UNIT}
WHERE $__timeFilter(a.opened_at) AND {scope}
GROUP BY 1, 2 ORDER BY 1""",
        None, bars=True,
    )  # fmt: skip
    welfare = table_panel(
        "看护警情 Welfare, vital signs and wandering",
        "Inactivity (the welfare check), vital-sign and wandering alerts opened in the range.",
        f"""
SELECT a.opened_at, s.name AS room, a.type, a.status,
       extract(epoch FROM {ACK} - a.opened_at)::float8 AS ack_s, a.outcome
FROM {ALERTS_BY_UNIT}
WHERE a.type IN ('inactivity', 'vital_signs', 'wandering') AND $__timeFilter(a.opened_at)
  AND {scope}
ORDER BY a.opened_at DESC""",
        [("opened_at", "发生 Opened"), ("room", "房间 Room"), ("type", "类型 Type"),
         ("status", "状态 Status"), ("ack_s", "接警 Ack (s)"), ("outcome", "结果 Outcome")],
    )  # fmt: skip
    panels = layout([
        [(stat_panel("未结警情 Open alerts", "Unresolved alerts now, by severity.",
                     open_alerts_sql(scope), OPEN_ALERTS_COLUMNS,
                     steps=((None, "green"), (1, "red"))), 8, 5),
         (stat_panel("危急警情接警用时 Time to acknowledge (critical)",
                     f"Seconds to acknowledgement, target {ACK_TARGET_S} s.",
                     response_sql(scope, ACK, ACK_TARGET_S), response_columns("60 s"),
                     unit="s", steps=((None, "green"), (ACK_TARGET_S, "red"))), 8, 5),
         (people, 8, 5)],
        [(open_list, 16, 10),
         (stat_panel("设备在线 Devices online",
                     "Registered devices by their latest status.",
                     devices_online_sql(scope), DEVICES_ONLINE_COLUMNS), 8, 10)],
        [(by_type, 12, 9), (welfare, 12, 9)],
    ])  # fmt: skip
    return dashboard(
        "eldersafe-institution",
        "机构安全 Institution safety",
        "One care institution: its open alerts room by room, response times, residents and "
        "staff on duty, devices online.",
        ["institution"],
        [INSTITUTION_VARIABLE],
        panels,
    )


# --- 设备健康 Device health -------------------------------------------------------------------


def device_health() -> dm.Dashboard:
    offline = table_panel(
        "离线设备 Offline devices",
        "Registered devices whose latest status says offline, longest first.",
        f"""
SELECT st.name AS street, u.name AS unit, s.name AS site, d.id AS device, d.profile,
       ds.time AS last_status,
       extract(epoch FROM $__timeTo()::timestamptz - ds.time)::float8 AS offline_s,
       ds.battery
FROM devices d JOIN sites s ON s.id = d.site_id
JOIN organisations u ON u.id = s.organisation_id JOIN organisations st ON st.id = u.parent_id
JOIN device_status ds ON ds.site_id = d.site_id AND ds.device_id = d.id
WHERE NOT ds.online AND {IN_UNITS}
ORDER BY ds.time""",
        [("street", "街道 Street"), ("unit", "单位 Unit"), ("site", "地点 Site"),
         ("device", "设备 Device"), ("profile", "型号 Profile"),
         ("last_status", "最后状态 Last status"), ("offline_s", "离线 Offline (s)"),
         ("battery", "电量 Battery %")],
    )  # fmt: skip
    batteries = table_panel(
        "低电量 Low batteries",
        f"Devices whose latest status reports {LOW_BATTERY_PCT} % or less.",
        f"""
SELECT u.name AS unit, s.name AS site, d.id AS device, d.profile, ds.battery,
       ds.time AS reported
FROM devices d JOIN sites s ON s.id = d.site_id
JOIN organisations u ON u.id = s.organisation_id
JOIN device_status ds ON ds.site_id = d.site_id AND ds.device_id = d.id
WHERE ds.battery <= {LOW_BATTERY_PCT} AND {IN_UNITS}
ORDER BY ds.battery, site, device""",
        [("unit", "单位 Unit"), ("site", "地点 Site"), ("device", "设备 Device"),
         ("profile", "型号 Profile"), ("battery", "电量 Battery %"),
         ("reported", "上报 Reported")],
    )  # fmt: skip
    battery_trend = timeseries_panel(
        "最低电量 Lowest battery by device profile",
        "The lowest battery reading (battery_pct telemetry) in each interval, per profile.",
        f"""
SELECT $__timeGroupAlias(t.time, $__interval), d.profile AS metric,
       min(t.value) AS battery_pct
FROM telemetry t JOIN devices d ON d.site_id = t.site_id AND d.id = t.device_id
JOIN sites s ON s.id = d.site_id JOIN organisations u ON u.id = s.organisation_id
WHERE t.metric = 'battery_pct' AND $__timeFilter(t.time) AND {IN_UNITS}
GROUP BY 1, 2 ORDER BY 1""",
        None, unit="percent", steps=((None, "red"), (LOW_BATTERY_PCT, "green")),
    )  # fmt: skip
    # The edge's retained gateway status: device_id 'gateway:<id>', detail 'driver=state,...'
    # (gateway/ingest/batch.py); a driver not 'running' is a line or bus in trouble.
    gateways = table_panel(
        "网关与驱动 Gateways and drivers",
        "Each edge gateway's last status: online, and its drivers that are not running "
        "(a serial line, Modbus bus or BLE adapter in back-off).",
        f"""
SELECT u.name AS unit, s.name AS site, substr(g.device_id, 9) AS gateway, g.online,
       coalesce(dr.drivers, 0) AS drivers,
       coalesce(dr.not_running, 0) AS not_running,
       dr.troubled, g.time AS reported
FROM device_status g JOIN sites s ON s.id = g.site_id
JOIN organisations u ON u.id = s.organisation_id
LEFT JOIN LATERAL (
  SELECT count(*) AS drivers,
         count(*) FILTER (WHERE split_part(e, '=', 2) <> 'running') AS not_running,
         string_agg(e, ', ' ORDER BY e) FILTER (WHERE split_part(e, '=', 2) <> 'running')
           AS troubled
  FROM unnest(string_to_array(g.detail, ',')) AS e WHERE e LIKE '%=%'
) dr ON true
WHERE g.device_id LIKE 'gateway:%' AND {IN_UNITS}
ORDER BY g.online, not_running DESC, site""",
        [("unit", "单位 Unit"), ("site", "地点 Site"), ("gateway", "网关 Gateway"),
         ("online", "在线 Online"), ("drivers", "驱动 Drivers"),
         ("not_running", "异常驱动 Not running"), ("troubled", "异常 Troubled"),
         ("reported", "上报 Reported")],
    )  # fmt: skip
    dead = timeseries_panel(
        "无效报文 Rejected messages",
        "Messages the server refused (dead letters), by reason: topic, JSON, schema, range. "
        "Not tied to a unit: a malformed message may name no valid site.",
        """
SELECT $__timeGroupAlias(received_at, $__interval), coalesce(reason_class, 'other') AS metric,
       sum(occurrences)::bigint AS messages
FROM dead_letters
WHERE $__timeFilter(received_at)
GROUP BY 1, 2 ORDER BY 1""",
        None, bars=True,
    )  # fmt: skip
    commands = stat_panel(
        "下行指令 Downlink commands",
        "The edge's answers to commands (wristband 'help is coming', button LED, hush) "
        "in the range: unreachable means the device did not answer.",
        f"""
SELECT count(*) FILTER (WHERE r.outcome = 'executed') AS executed,
       count(*) FILTER (WHERE r.outcome = 'refused') AS refused,
       count(*) FILTER (WHERE r.outcome = 'unreachable') AS unreachable
FROM command_results r JOIN sites s ON s.id = r.site_id
JOIN organisations u ON u.id = s.organisation_id
WHERE $__timeFilter(r.time) AND {IN_UNITS}""",
        [("executed", "已执行 Executed"), ("refused", "拒绝 Refused"),
         ("unreachable", "不可达 Unreachable")],
        steps=((None, "green"),),
    )  # fmt: skip
    device_alerts = table_panel(
        "设备类警情 Device alerts",
        "Unresolved maintenance alerts: offline, low battery, tamper, device fault.",
        f"""
SELECT a.opened_at, u.name AS unit, s.name AS site, a.device_id AS device, a.type,
       a.count, a.last_seen_at
FROM {ALERTS_BY_UNIT}
WHERE a.type IN ('device_offline', 'low_battery', 'tamper', 'device_fault')
  AND a.status <> 'resolved' AND {IN_UNITS}
ORDER BY a.opened_at""",
        [("opened_at", "发生 Opened"), ("unit", "单位 Unit"), ("site", "地点 Site"),
         ("device", "设备 Device"), ("type", "类型 Type"), ("count", "次数 Count"),
         ("last_seen_at", "最近 Last seen")],
    )  # fmt: skip
    panels = layout([
        [(stat_panel("设备在线 Devices online",
                     "Registered devices by their latest status.",
                     devices_online_sql(IN_UNITS), DEVICES_ONLINE_COLUMNS), 12, 5),
         (commands, 12, 5)],
        [(offline, 14, 9), (batteries, 10, 9)],
        [(gateways, 14, 8), (battery_trend, 10, 8)],
        [(device_alerts, 14, 8), (dead, 10, 8)],
    ])  # fmt: skip
    return dashboard(
        "eldersafe-devices",
        "设备健康 Device health",
        "Offline devices, batteries, the edge gateways' drivers and lines, rejected "
        "messages and the downlink's answers.",
        ["devices"],
        [STREET_VARIABLE, UNIT_VARIABLE],
        panels,
    )


# --- 电气火灾风险 Electrical risk -------------------------------------------------------------

# One electrical-fire detector guards one circuit: its readings are that circuit's.
TELEMETRY_BY_UNIT = """telemetry t JOIN sites s ON s.id = t.site_id
JOIN organisations u ON u.id = s.organisation_id"""


def electrical() -> dm.Dashboard:
    residual = timeseries_panel(
        "剩余电流 Residual current per circuit",
        f"The highest residual current per detector in each interval; early warning at "
        f"{RESIDUAL_CURRENT_WARNING_MA:g} mA, alarm at {RESIDUAL_CURRENT_ALARM_MA:g} mA.",
        f"""
SELECT $__timeGroupAlias(t.time, $__interval), s.name || ' / ' || t.device_id AS metric,
       max(t.value) AS residual_current_ma
FROM {TELEMETRY_BY_UNIT}
WHERE t.metric = 'residual_current_ma' AND $__timeFilter(t.time) AND {IN_UNITS}
GROUP BY 1, 2 ORDER BY 1""",
        None, unit="mA",
        steps=((None, "green"), (RESIDUAL_CURRENT_WARNING_MA, "orange"),
               (RESIDUAL_CURRENT_ALARM_MA, "red")),
    )  # fmt: skip
    cable = timeseries_panel(
        "线缆温度 Cable temperature per circuit",
        f"The highest temperature of each cable sensor in each interval; alarm at "
        f"{CABLE_TEMPERATURE_ALARM_C:g} °C.",
        f"""
SELECT $__timeGroupAlias(t.time, $__interval),
       s.name || ' / ' || t.device_id || ' / ' || replace(t.metric, 'cable_temp_c_', 'T')
         AS metric,
       max(t.value) AS cable_temp_c
FROM {TELEMETRY_BY_UNIT}
WHERE t.metric IN ('cable_temp_c_1', 'cable_temp_c_2', 'cable_temp_c_3', 'cable_temp_c_4')
  AND $__timeFilter(t.time) AND {IN_UNITS}
GROUP BY 1, 2 ORDER BY 1""",
        None, unit="celsius",
        steps=((None, "green"), (CABLE_TEMPERATURE_ALARM_C, "red")),
    )  # fmt: skip
    circuits = table_panel(
        "线路现状 Circuits now",
        "Each detector's latest residual current and hottest cable in the range, as a share "
        "of its alarm limit.",
        f"""
SELECT u.name AS unit, s.name AS site, l.device_id AS device,
       max(l.value) FILTER (WHERE l.metric = 'residual_current_ma') AS residual_current_ma,
       max(l.value) FILTER (WHERE l.metric LIKE 'cable_temp_c_%') AS cable_temp_c,
       greatest(
         100 * max(l.value) FILTER (WHERE l.metric = 'residual_current_ma')
           / {RESIDUAL_CURRENT_ALARM_MA},
         100 * max(l.value) FILTER (WHERE l.metric LIKE 'cable_temp_c_%')
           / {CABLE_TEMPERATURE_ALARM_C}) AS of_limit_pct,
       max(l.time) AS reported
FROM (
  SELECT DISTINCT ON (t.site_id, t.device_id, t.metric) t.site_id, t.device_id, t.metric,
         t.value, t.time
  FROM telemetry t
  WHERE t.metric IN ('residual_current_ma', 'cable_temp_c_1', 'cable_temp_c_2',
                     'cable_temp_c_3', 'cable_temp_c_4') AND $__timeFilter(t.time)
  ORDER BY t.site_id, t.device_id, t.metric, t.time DESC
) l JOIN sites s ON s.id = l.site_id JOIN organisations u ON u.id = s.organisation_id
WHERE {IN_UNITS}
GROUP BY u.name, s.name, l.device_id
ORDER BY of_limit_pct DESC NULLS LAST""",
        [("unit", "单位 Unit"), ("site", "地点 Site"), ("device", "探测器 Detector"),
         ("residual_current_ma", "剩余电流 mA"), ("cable_temp_c", "最高线温 °C"),
         ("of_limit_pct", "占限值 Of limit %"), ("reported", "上报 Reported")],
    )  # fmt: skip
    warnings = table_panel(
        "电气预警与告警 Electrical early warnings and alarms",
        "Electrical alerts opened in the range: minor is an early warning (residual current "
        "at 80 % of the alarm), major an alarm; sources name the readings behind them.",
        f"""
SELECT a.opened_at, u.name AS unit, s.name AS site, a.device_id AS device, a.severity,
       a.status, a.count, array_to_string(a.sources, ', ') AS sources, a.resolved_at
FROM {ALERTS_BY_UNIT}
WHERE a.type = 'electrical' AND $__timeFilter(a.opened_at) AND {IN_UNITS}
ORDER BY a.opened_at DESC""",
        [("opened_at", "发生 Opened"), ("unit", "单位 Unit"), ("site", "地点 Site"),
         ("device", "探测器 Detector"), ("severity", "级别 Severity"),
         ("status", "状态 Status"), ("count", "次数 Count"), ("sources", "来源 Sources"),
         ("resolved_at", "闭环 Closed")],
    )  # fmt: skip
    open_now = stat_panel(
        "电气风险 Electrical risk now",
        "Unresolved electrical alerts: early warnings (minor) and alarms.",
        f"""
SELECT count(*) FILTER (WHERE a.severity = 'minor') AS early_warnings,
       count(*) FILTER (WHERE a.severity <> 'minor') AS alarms
FROM {ALERTS_BY_UNIT}
WHERE a.type = 'electrical' AND a.status <> 'resolved' AND {IN_UNITS}""",
        [("early_warnings", "预警 Early warnings"), ("alarms", "告警 Alarms")],
        steps=((None, "green"), (1, "orange")),
    )  # fmt: skip
    panels = layout([
        [(open_now, 6, 5), (circuits, 18, 5)],
        [(residual, 12, 9), (cable, 12, 9)],
        [(warnings, 24, 8)],
    ])  # fmt: skip
    return dashboard(
        "eldersafe-electrical",
        "电气火灾风险 Electrical risk",
        "Residual current and cable temperature per circuit from the electrical-fire "
        "detectors, early warnings and alarms.",
        ["electrical"],
        [STREET_VARIABLE, UNIT_VARIABLE],
        panels,
    )


DASHBOARDS = {
    "district.json": district,
    "institution.json": institution,
    "device-health.json": device_health,
    "electrical-risk.json": electrical,
}


def render(model: dm.Dashboard) -> str:
    """The dashboard's JSON as committed: stable key order, UTF-8 kept readable."""
    return json.dumps(model, cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    return {name: render(build()) for name, build in DASHBOARDS.items()}


def main(argv: Sequence[str] = ()) -> int:
    """Write the dashboards; ``--check`` only says whether the committed files are current."""
    check = "--check" in argv
    stale = []
    for name, text in rendered().items():
        path = DASHBOARDS_DIR / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not check:
            DASHBOARDS_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if check and stale:
        print("out of date, run python -m grafana.generate: " + ", ".join(stale), file=sys.stderr)
        return 1
    for name in stale:
        print(f"wrote grafana/dashboards/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
