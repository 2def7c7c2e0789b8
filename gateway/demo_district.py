"""The demo district, generated as a district file (``gateway.alerts.district``).

A bureau, two streets, four community stations and one care home; 60 homes with a
wristband, a call button and its receiver, some with smoke and electrical-fire
detectors; a resident per home with family contacts; duty staff on three 8-hour
shifts round the clock at every station and the home, supervisors, street and bureau
users. The four scenario sites (``simulators/scenarios``) are homes (and a care-home
floor) of this district with exactly the scenario's devices, so their real edges
report into it.

Generated rather than committed: 60 homes written out by hand would be 2,000 lines
to keep in step with the scenarios, and the shifts must cover the days the demo runs.
Everything is deterministic (no randomness), so every run shows the same people.

The escalation policy is the demo's own: rungs at 0 / 15 / 30 / 45 s instead of the
defaults' minutes (ARCHITECTURE §5), so an unanswered alert climbs within a minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from gateway.alerts.district import District
from simulators.scenario import Scenario

DEMO_PASSWORD = "eldersafe-demo"
TIMEZONE = ZoneInfo("Asia/Shanghai")
HOMES = 60
ROOMS = ("201", "202", "203", "205", "206", "207")  # the care home's second floor
SHIFT_HOURS = ((0, "night"), (8, "day"), (16, "evening"))  # local start hour, slot name
SHIFT_DAYS = 8  # from yesterday: a demo left running for a week still has staff on duty
LADDER_S = (0, 15, 30, 45)  # the demo's rungs, in seconds
BUREAU = "bureau-donghu"

ORGANISATIONS: tuple[dict[str, Any], ...] = (
    {"id": BUREAU, "kind": "bureau", "name": "东湖区民政局"},
    {"id": "street-huamu", "parent": BUREAU, "kind": "street", "name": "花木街道"},
    {"id": "street-tangqiao", "parent": BUREAU, "kind": "street", "name": "塘桥街道"},
    {"id": "station-xinhua", "parent": "street-huamu", "kind": "station", "name": "新华社区站"},
    {"id": "station-liyuan", "parent": "street-huamu", "kind": "station", "name": "梨园社区站"},
    {"id": "station-nanquan", "parent": "street-tangqiao", "kind": "station",
     "name": "南泉社区站"},
    {"id": "station-pujian", "parent": "street-tangqiao", "kind": "station",
     "name": "浦建社区站"},
    {"id": "inst-anyang", "parent": "street-huamu", "kind": "institution", "name": "安养护理院"},
)  # fmt: skip
STATIONS = ("station-xinhua", "station-liyuan", "station-nanquan", "station-pujian")
STREETS = ("street-huamu", "street-tangqiao")
CARE_UNITS = (*STATIONS, "inst-anyang")

# The scenario sites: which unit answers for them and who lives there (the stories' people).
SCENARIO_HOMES: dict[str, tuple[str, str | None, int]] = {
    "home-li": ("station-xinhua", "李建国", 1940),
    "home-wang": ("station-liyuan", "王秀英", 1942),
    "home-zhao": ("station-nanquan", "赵德明", 1937),
    "anyang-2f": ("inst-anyang", None, 0),  # a shared kitchen: nobody lives there
}

_SURNAMES = "张王李赵刘陈杨黄吴周徐孙马朱胡郭何林高罗"
_GIVEN_OLD = ("秀英", "桂兰", "建国", "玉珍", "德明", "凤英", "志强", "淑珍", "国华", "秀兰",
              "永福", "金花", "文彬", "美华", "宝山")  # fmt: skip
_GIVEN_YOUNG = ("小明", "丽娟", "伟", "静", "磊", "敏", "强", "芳", "杰", "婷")
_ROADS = ("花木路", "梨园路", "南泉路", "浦建路", "东方路", "峨山路")
_PROFILE = {
    "receiver": "es-cb1",
    "button": "es-cb1",
    "wristband": "es-wb1",
    "smoke_detector": "es-sd1",
    "electrical_detector": "es-ef1",
}


@dataclass(frozen=True, slots=True)
class DemoLogin:
    """A demo person worth printing: who to log in as to see each tier's view."""

    username: str
    name: str
    role: str
    unit: str


def _name(i: int, given: tuple[str, ...], salt: int = 0) -> str:
    return _SURNAMES[(i * 7 + salt) % len(_SURNAMES)] + given[(i * 3 + salt) % len(given)]


def _phone(prefix: str, i: int) -> str:
    return f"{prefix}{i:08d}"


def scenario_devices(sc: Scenario) -> list[dict[str, Any]]:
    """A scenario's devices as the district registers them (the addresses its edge uses)."""
    rows: list[dict[str, Any]] = []
    for d in sc.devices:
        if d.kind == "receiver":
            address = "receiver"
        elif d.kind == "button":
            assert d.button_id is not None
            address = f"{d.button_id:08x}"
        elif d.kind == "wristband":
            assert d.address is not None
            address = d.address
        else:
            address = f"unit-{d.unit}"
        rows.append({"site": sc.site, "id": d.id, "profile": _PROFILE[d.kind],
                     "address": address})  # fmt: skip
    return rows


def generated_home_ids() -> list[str]:
    """The homes without a scenario (driven by occasional events, see ``gateway.demo``)."""
    return [f"home-{i:03d}" for i in range(1, HOMES - len(_scenario_home_sites()) + 1)]


def care_home_room_ids() -> list[str]:
    """The care home's residents' rooms (also driven by occasional events)."""
    return [f"anyang-{r}" for r in ROOMS]


def _scenario_home_sites() -> list[str]:
    return [s for s, (unit, _, _) in SCENARIO_HOMES.items() if unit != "inst-anyang"]


def _resident(rid: str, site: str, name: str, birth: int, i: int, alone: bool) -> dict[str, Any]:
    # a son or daughter (the resident's surname), sometimes a second contact
    family = [{"name": name[0] + _GIVEN_YOUNG[i % len(_GIVEN_YOUNG)],
               "phone": _phone("139", i * 2 + 1)}]  # fmt: skip
    if i % 3 == 0:
        family.append({"name": _name(i, _GIVEN_YOUNG, 5), "phone": _phone("138", i * 2 + 2)})
    return {"id": rid, "site": site, "name": name, "birth_year": birth, "family": family,
            "phone": _phone("021", 60000000 + i), "lives_alone": alone}  # fmt: skip


def _homes(scenarios: list[Scenario]) -> tuple[list[Any], list[Any], list[Any]]:
    sites: list[dict[str, Any]] = []
    residents: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    by_site = {sc.site: sc for sc in scenarios}
    for n, (site, (unit, person, birth)) in enumerate(SCENARIO_HOMES.items()):
        sc = by_site.get(site)
        kind = "room" if unit == "inst-anyang" else "home"
        address = f"{_ROADS[n % len(_ROADS)]}{100 + n}弄{n + 1}号101室" if person else \
            "东方路88号 安养护理院二楼"
        sites.append({"id": site, "organisation": unit, "kind": kind, "address": address,
                      "name": _home_name(unit, n + 1) if person else "二楼公共厨房"})  # fmt: skip
        rid = f"r-{site}"
        if person:
            # Mrs Wang lives alone (her scenario's story): the welfare check watches her
            residents.append(_resident(rid, site, person, birth, 100 + n,
                                       alone=site == "home-wang"))  # fmt: skip
        if sc:
            for row in scenario_devices(sc):
                if person and row["profile"] == "es-wb1":
                    row["resident"] = rid
                devices.append(row)
    for k, site in enumerate(care_home_room_ids(), start=1):
        i = 100 + k  # device numbers after the homes'
        name = _name(i, _GIVEN_OLD, 4)
        sites.append({"id": site, "organisation": "inst-anyang", "kind": "room",
                      "name": f"护理院 {site.removeprefix('anyang-')}室",
                      "address": "东方路88号 安养护理院二楼"})  # fmt: skip
        rid = f"r-{site}"
        residents.append(_resident(rid, site, name, 1928 + k, i, alone=False))
        devices += [
            {"site": site, "id": f"rx-{i:03d}", "profile": "es-cb1", "address": "receiver"},
            {"site": site, "id": f"btn-{i:03d}", "profile": "es-cb1",
             "address": f"{0x00D00000 + i:08x}", "description": "床头呼叫器"},
            {"site": site, "id": f"wb-{i:03d}", "profile": "es-wb1",
             "address": f"C0:4E:57:02:00:{k:02X}", "resident": rid},
        ]  # fmt: skip
    for i, site in enumerate(generated_home_ids(), start=1):
        unit = STATIONS[i % len(STATIONS)]
        name = _name(i, _GIVEN_OLD)
        address = f"{_ROADS[i % len(_ROADS)]}{i}弄{i % 9 + 1}号{i % 6 + 1}01室"
        sites.append({"id": site, "organisation": unit, "name": _home_name(unit, 10 + i),
                      "address": address})  # fmt: skip
        rid = f"r-{site}"
        residents.append(_resident(rid, site, name, 1930 + i % 19, i, alone=i % 4 == 0))
        devices += [
            {"site": site, "id": f"rx-{i:03d}", "profile": "es-cb1", "address": "receiver"},
            {"site": site, "id": f"btn-{i:03d}", "profile": "es-cb1",
             "address": f"{0x00D00000 + i:08x}", "description": "床头一键呼叫"},
            {"site": site, "id": f"wb-{i:03d}", "profile": "es-wb1",
             "address": f"C0:4E:57:01:00:{i:02X}", "resident": rid},
        ]  # fmt: skip
        if i % 3 == 0:
            devices.append({"site": site, "id": f"sd-{i:03d}", "profile": "es-sd1",
                            "address": "unit-1", "description": "厨房烟感"})  # fmt: skip
        if i % 5 == 0:
            devices.append({"site": site, "id": f"ef-{i:03d}", "profile": "es-ef1",
                            "address": "unit-2", "description": "电气火灾监控"})  # fmt: skip
    return sites, residents, devices


def _home_name(unit: str, n: int) -> str:
    """A site's name never carries its resident's: the API masks the person's name and
    address above the responsible unit, not the site's name."""
    station = next(o["name"] for o in ORGANISATIONS if o["id"] == unit)
    return f"{station.removesuffix('社区站')} 居家{n:03d}"


def _short(unit: str) -> str:
    return unit.split("-", 1)[1]


def _staff_and_shifts(today: datetime) -> tuple[list[Any], list[Any]]:
    staff: list[dict[str, Any]] = []
    shifts: list[dict[str, Any]] = []
    n = 0
    for unit in CARE_UNITS:
        for hour, slot in SHIFT_HOURS:
            n += 1
            sid = f"duty-{_short(unit)}-{slot}"
            staff.append({"id": sid, "organisation": unit, "name": _name(n, _GIVEN_YOUNG, 3),
                          "role": "duty"})  # fmt: skip
            for day in range(-1, SHIFT_DAYS - 1):
                start = today + timedelta(days=day, hours=hour)
                shifts.append({"staff": sid, "starts_at": start.isoformat(),
                               "ends_at": (start + timedelta(hours=8)).isoformat()})  # fmt: skip
        n += 1
        staff.append({"id": f"sup-{_short(unit)}", "organisation": unit,
                      "name": _name(n, _GIVEN_OLD, 2), "role": "supervisor"})  # fmt: skip
    for k, street in enumerate(STREETS):
        staff.append({"id": street, "organisation": street, "name": _name(40 + k, _GIVEN_OLD),
                      "role": "street"})  # fmt: skip
    staff.append({"id": "bureau-chen", "organisation": BUREAU, "name": "陈科长", "role": "bureau"})
    staff.append({"id": "admin", "organisation": BUREAU, "name": "系统管理员", "role": "admin"})
    return staff, shifts


def demo_policy() -> dict[str, Any]:
    """The default ladder's shape (ARCHITECTURE §5) on a clock of seconds."""
    page = ["console", "messaging", "voice"]
    return {
        "name": "demo-seconds",
        "levels": [
            {"after_s": LADDER_S[0], "roles": ["duty"], "channels": page},
            {"after_s": LADDER_S[1], "roles": ["supervisor", "family"], "channels": page},
            {"after_s": LADDER_S[2], "roles": ["street"], "channels": page},
            {"after_s": LADDER_S[3], "roles": ["bureau"], "channels": ["webhook"]},
        ],
        "repeat_top_every_s": 120,
        "remind_every_s": 60,
        "on_scene_within_s": 120,
    }


def demo_district(scenarios: list[Scenario], now: datetime | None = None) -> District:
    """The whole district, shifts from yesterday's midnight in Shanghai for ``SHIFT_DAYS``."""
    local = (now or datetime.now(UTC)).astimezone(TIMEZONE)
    today = local.replace(hour=0, minute=0, second=0, microsecond=0)
    sites, residents, devices = _homes(scenarios)
    staff, shifts = _staff_and_shifts(today)
    policies = [{"unit": BUREAU, "severity": s, "policy": demo_policy()}
                for s in ("critical", "major", "minor")]  # fmt: skip
    return District.model_validate({
        "organisations": list(ORGANISATIONS), "sites": sites, "residents": residents,
        "devices": devices, "staff": staff, "shifts": shifts, "policies": policies,
    })  # fmt: skip


def on_shift(district: District, at: datetime) -> list[str]:
    """The duty staff whose shift covers ``at`` (one per station and the care home)."""
    return sorted({sh.staff for sh in district.shifts if sh.starts_at <= at < sh.ends_at})


def supervisors(district: District) -> list[str]:
    return [s.id for s in district.staff if s.role == "supervisor"]


def demo_logins(district: District, at: datetime) -> list[DemoLogin]:
    """One login per tier for the print-out: a duty person on shift now, a supervisor,
    a street user and the bureau user (all of the same station's line)."""
    names = {s.id: s for s in district.staff}
    duty = next(s for s in on_shift(district, at) if s.startswith("duty-xinhua-"))
    chosen = (duty, "sup-xinhua", "street-huamu", "bureau-chen")
    units = {o["id"]: o["name"] for o in ORGANISATIONS}
    return [DemoLogin(s, names[s].name, names[s].role, units[names[s].organisation])
            for s in chosen]  # fmt: skip
