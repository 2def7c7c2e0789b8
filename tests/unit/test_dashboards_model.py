"""The Grafana screens as data: generated, current, valid against Grafana's dashboard model,
provisioned where docker-compose mounts them; and the macro expander the SQL tests rely on,
pinned to Grafana's own expansions.

The model is the one grafana-foundation-sdk generates from Grafana's schema: each
committed dashboard is parsed into its typed classes (panel options into the panel
plugin's own ``Options``, targets into ``SqlQuery``), every attribute's value is checked
against its declared type, and the typed model must write back the very same JSON, so a
key the model does not know, or one at the wrong place, fails instead of vanishing.
"""

from __future__ import annotations

import copy
import enum
import importlib.metadata
import json
import sys
import types
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard as dm

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # grafana/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from grafana import generate  # noqa: E402
from grafana.sql_macros import (  # noqa: E402
    MacroError,
    QueryContext,
    Variable,
    format_interval,
    interpolate,
)

register_default_plugins()
generate.register_sql_query()

GRAFANA = ROOT / "grafana"


def committed() -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads(p.read_text(encoding="utf-8"))
        for p in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


# --- checking a document against the SDK's typed model ---------------------------------------


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    """What of document ``a`` the model's rendering ``b`` lost or changed (a default the
    model adds, such as a panel plugin's empty ``custom`` field config, is no loss)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a, key=str):
            if key not in b:
                out.append(f"{path}.{key}: not in Grafana's model (dropped when parsed)")
            else:
                _diff(a[key], b[key], f"{path}.{key}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{path}[{i}]", out)
    elif a != b or type(a) is not type(b):
        out.append(f"{path}: {a!r} reads back as {b!r}")


def _fits(value: Any, ann: Any, path: str, module: types.ModuleType, out: list[str]) -> bool:
    """Does ``value`` fit the annotation? Appends what does not to ``out``."""
    if isinstance(ann, typing.ForwardRef):
        ann = ann.__forward_arg__
    if isinstance(ann, str):
        ann = eval(ann, vars(module))  # the SDK's forward references, e.g. 'GridPos'
    origin = typing.get_origin(ann)
    if ann is typing.Any or ann is object:
        if hasattr(value, "to_json") and not isinstance(value, enum.Enum):
            _check_object(value, path, out)
        return True
    if origin in (typing.Union, types.UnionType):
        fitting: list[list[str]] = []
        for arg in typing.get_args(ann):
            trial: list[str] = []
            if _fits(value, arg, path, module, trial):
                if not trial:
                    return True
                fitting.append(trial)
        if fitting:  # the right type with flaws inside: report those
            out.extend(fitting[0])
            return True
        out.append(f"{path}: {value!r} is none of {ann}")
        return False
    if ann is type(None):
        return value is None
    if origin is typing.Literal:
        if value in typing.get_args(ann):
            return True
        out.append(f"{path}: {value!r} not one of {typing.get_args(ann)}")
        return False
    if origin is list:
        if not isinstance(value, list):
            out.append(f"{path}: expected a list, got {value!r}")
            return False
        (item,) = typing.get_args(ann)
        return all([_fits(v, item, f"{path}[{i}]", module, out) for i, v in enumerate(value)])
    if origin is dict:
        if not isinstance(value, dict):
            out.append(f"{path}: expected an object, got {value!r}")
            return False
        _, item = typing.get_args(ann)
        return all([_fits(v, item, f"{path}.{k}", module, out) for k, v in value.items()])
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        if value in {e.value for e in ann}:
            return True
        out.append(f"{path}: {value!r} is not a {ann.__name__} ({[e.value for e in ann]})")
        return False
    if ann is bool:
        ok = isinstance(value, bool)
    elif ann is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif ann is str:
        ok = isinstance(value, str)
    elif isinstance(ann, type):
        if isinstance(value, dict) and hasattr(ann, "from_json"):
            # the SDK leaves some members as read (panel transformations): parse them here
            typed = ann.from_json(copy.deepcopy(value))
            _diff(value, json.loads(json.dumps(typed, cls=JSONEncoder)), path, out)
            value = typed
        ok = isinstance(value, ann)
        if ok:
            _check_object(value, path, out)
            return True
    else:
        raise AssertionError(f"{path}: annotation {ann!r} not understood by the checker")
    if not ok:
        out.append(f"{path}: {value!r} is not a {getattr(ann, '__name__', ann)}")
    return ok


def _check_object(obj: Any, path: str, out: list[str]) -> None:
    if isinstance(obj, cogruntime.UnknownDataquery):
        out.append(f"{path}: a target of no known datasource type: {obj.data!r}")
        return
    if isinstance(obj, generate.SqlQuery):
        if obj.datasource is None or obj.datasource.uid != generate.DATASOURCE_UID:
            out.append(f"{path}: not a query of the eldersafe TimescaleDB datasource")
        if obj.format not in ("table", "time_series") or not obj.raw_sql:
            out.append(f"{path}: format {obj.format!r} or empty SQL")
        return
    module = sys.modules[type(obj).__module__]
    annotations: dict[str, Any] = {}
    for klass in reversed(type(obj).__mro__):
        annotations.update(getattr(klass, "__annotations__", {}))
    for name, ann in annotations.items():
        _fits(getattr(obj, name), ann, f"{path}.{name}", module, out)


def model_problems(doc: dict[str, Any]) -> list[str]:
    """What keeps ``doc`` from being a dashboard of Grafana's model (empty: none)."""
    out: list[str] = []
    try:
        model = dm.Dashboard.from_json(copy.deepcopy(doc))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        return [f"does not parse: {type(exc).__name__}: {exc}"]
    _diff(doc, json.loads(json.dumps(model, cls=JSONEncoder)), "$", out)
    _check_object(model, "$", out)
    ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for i, panel in enumerate(model.panels or []):
        where = f"$.panels[{i}]"
        if not isinstance(panel, dm.Panel):
            continue
        if cogruntime.panelcfg_config(panel.type_val) is None:
            out.append(f"{where}: panel type {panel.type_val!r} is no Grafana panel plugin")
        elif isinstance(panel.options, dict):
            out.append(f"{where}: options not parsed into {panel.type_val}'s Options")
        if panel.id_val is None or panel.id_val in ids:
            out.append(f"{where}: panel id {panel.id_val!r} missing or repeated")
        ids.add(panel.id_val or 0)
        pos = panel.grid_pos
        if pos is None or not all(type(v) is int for v in (pos.x, pos.y, pos.w, pos.h)):
            continue  # reported above as a type error
        if pos.x + pos.w > 24:
            out.append(f"{where}: outside the 24-column grid")
            continue
        for x in range(pos.x, pos.x + pos.w):
            for y in range(pos.y, pos.y + pos.h):
                if (x, y) in cells:
                    out.append(f"{where}: overlaps {cells[(x, y)]}")
                    break
                cells[(x, y)] = where
            else:
                continue
            break
    return out


# --- the dashboards -------------------------------------------------------------------------


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    want = generate.rendered()
    got = {name: (GRAFANA / "dashboards" / name).read_text(encoding="utf-8")
           for name in committed()}  # fmt: skip
    assert sorted(got) == sorted(want), "a dashboard file without generator code, or missing"
    stale = [name for name in want if got[name] != want[name]]
    assert not stale, f"run `python -m grafana.generate`: {stale} drifted from the code"


@pytest.mark.parametrize("name", sorted(generate.DASHBOARDS))
def test_each_dashboard_fits_grafanas_dashboard_model(name: str) -> None:
    doc = committed()[name]
    assert model_problems(doc) == []
    assert doc["uid"].startswith("eldersafe-") and 8 <= len(doc["uid"]) <= 40
    title = doc["title"]
    bilingual = any("\u4e00" <= c <= "\u9fff" for c in title) and any(
        c.isascii() and c.isalpha() for c in title
    )
    assert bilingual, title
    for panel in doc["panels"]:
        assert panel["datasource"]["uid"] == generate.DATASOURCE_UID, panel["title"]
        assert any("\u4e00" <= c <= "\u9fff" for c in panel["title"]), panel["title"]


def test_the_model_check_fails_on_what_grafana_would_not_take() -> None:
    """The check is no stub: each flaw below is a screen Grafana would break or ignore."""
    good = committed()["district.json"]
    assert model_problems(good) == []

    def flawed(change: Any) -> list[str]:
        doc = copy.deepcopy(good)
        change(doc)
        return model_problems(doc)

    def unknown_option(d: Any) -> None:
        d["panels"][0]["options"]["colourMode"] = "value"

    def string_width(d: Any) -> None:
        d["panels"][0]["gridPos"]["w"] = "8"

    def bad_enum(d: Any) -> None:
        d["panels"][0]["options"]["graphMode"] = "sparkline"

    def unknown_panel(d: Any) -> None:
        d["panels"][1]["type"] = "singlestat"

    def foreign_target(d: Any) -> None:
        d["panels"][0]["targets"][0]["datasource"] = {"type": "mysql", "uid": "x"}

    def overlap(d: Any) -> None:
        d["panels"][1]["gridPos"]["x"] = 4

    def misplaced(d: Any) -> None:
        d["panels"][0]["fieldConfig"]["defaults"]["thresholds"]["steps"][0]["colour"] = "red"

    def bad_query_key(d: Any) -> None:
        d["panels"][0]["targets"][0]["rawSQL"] = d["panels"][0]["targets"][0].pop("rawSql")

    for change, says in [
        (unknown_option, "colourMode: not in Grafana's model"),
        (string_width, "grid_pos.w: '8' is not a int"),
        (bad_enum, "'sparkline' is not a BigValueGraphMode"),
        (unknown_panel, "'singlestat' is no Grafana panel plugin"),
        (foreign_target, "not a query of the eldersafe TimescaleDB datasource"),
        (overlap, "overlaps $.panels[0]"),
        (misplaced, "colour: not in Grafana's model"),
        (bad_query_key, "rawSQL: not in Grafana's model"),
    ]:
        problems = flawed(change)
        assert any(says in p for p in problems), (change.__name__, problems)


# --- provisioning ---------------------------------------------------------------------------


def test_provisioning_names_the_datasource_the_panels_use_and_the_mounted_dashboards() -> None:
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/timescaledb.yaml").read_text())
    (ds,) = source["datasources"]
    assert ds["uid"] == generate.DATASOURCE_UID and ds["type"] == generate.DATASOURCE_TYPE
    assert ds["jsonData"]["timescaledb"] is True, "the macro expansion tests assume time_bucket"
    # credentials come from the environment, never from the file
    assert ds["secureJsonData"]["password"] == "${ELDERSAFE_DB_PASSWORD}"
    assert ds["user"].startswith("${") and ds["jsonData"]["database"].startswith("${")
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/eldersafe.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"  # compose's mount


def test_the_model_is_that_of_the_grafana_docker_compose_runs() -> None:
    """A dashboard of a newer model (schemaVersion, keys) is not one an older Grafana reads."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["services"]["grafana"]["image"]
    sdk = importlib.metadata.version("grafana-foundation-sdk").split("!")[-1]
    assert image.rsplit(":", 1)[1].split(".")[:2] == sdk.split(".")[:2], (image, sdk)


# --- Grafana's macro and variable expansion -------------------------------------------------

CTX = QueryContext(
    time_from=datetime(2026, 11, 23, 3, 0, tzinfo=UTC),
    time_to=datetime(2026, 11, 23, 5, 30, 15, 250000, tzinfo=UTC),
    interval=timedelta(minutes=5),
    variables={"street": Variable(("street-1", "o'brien")),
               "site": Variable(("home-1",), multi=False, include_all=False)},
)  # fmt: skip


@pytest.mark.parametrize(
    ("sql", "expanded"),
    [
        ("$__timeFilter(a.opened_at)",
         "a.opened_at BETWEEN '2026-11-23T03:00:00Z' AND '2026-11-23T05:30:15.25Z'"),
        ("$__timeFrom() / $__timeTo()", "'2026-11-23T03:00:00Z' / '2026-11-23T05:30:15.25Z'"),
        ("SELECT $__timeGroupAlias(t.time, $__interval), 1",
         "SELECT time_bucket('300.000s',t.time) AS \"time\", 1"),
        ("SELECT $__timeGroup(t.time, '1h'), 1",
         "SELECT time_bucket('3600.000s',t.time) AS \"time\", 1"),
        ("GROUP BY $__timeGroup(t.time, 30s)", "GROUP BY time_bucket('30.000s',t.time)"),
        ("$__time(t.time)", 't.time AS "time"'),
        ("IN (${street:sqlstring})", "IN ('street-1','o''brien')"),
        ("IN ($street)", "IN ('street-1','o''brien')"),
        ("= '$site' AND $__interval_ms", "= 'home-1' AND 300000"),
        ("$nosuchvar stays", "$nosuchvar stays"),
    ],
)  # fmt: skip
def test_expansions_are_grafanas(sql: str, expanded: str) -> None:
    assert interpolate(sql, CTX) == expanded


def test_interval_formatting_and_refusals_follow_grafana() -> None:
    assert [format_interval(timedelta(seconds=s)) for s in (0.02, 20, 90, 3600, 86400 * 2)] == [
        "20ms", "20s", "1m", "1h", "2d",
    ]  # fmt: skip
    without = QueryContext(CTX.time_from, CTX.time_to, timescaledb=False)
    assert interpolate("$__timeGroup(x, 5m)", without) == "floor(extract(epoch from x)/300)*300"
    for bad in ("$__timeFliter(x)", "$__timeGroup(x)", "$__timeGroup(x, soon)"):
        with pytest.raises(MacroError):
            interpolate(bad, CTX)
