"""``eldersafe district-import FILE``: load a district's organisation, people and devices.

The file (YAML or JSON) has lists ``organisations``, ``sites``, ``residents``,
``devices``, ``staff``, ``shifts`` and ``policies``. Every row is keyed by its
natural id, so importing the same file twice changes nothing, and importing an
edited file updates what changed (upsert); nothing is deleted. The whole file
is one transaction: a bad row leaves the database as it was, and the error
names the section and row.

Residents carry their own thresholds: ``heart_rate_min`` / ``heart_rate_max``
(bpm, 20-250, min below max) and ``spo2_min`` (%, 50-100); a bound left out is
the default of ``alerting.conditions.DEFAULT_VITAL_RANGES``. A device whose
profile measures vital signs (``es-wb1``) and names a ``resident`` is watched by
the vital-sign sweep; importing it without a resident stops the watch.
"""

from __future__ import annotations

from datetime import time
from pathlib import Path
from typing import Any, Literal

import psycopg
import yaml
from psycopg.types.json import Jsonb
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from gateway.alerts.directory import policy_from_json
from gateway.alerts.vitals import UNWATCH_WRISTBANDS, VITAL_PROFILES, WATCH_WRISTBANDS

_ID = r"^[a-z0-9-]{1,64}$"


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Organisation(_Row):
    id: str = Field(pattern=_ID)
    parent: str | None = None
    kind: Literal["bureau", "street", "station", "institution"]
    name: str
    webhook_url: str | None = None
    apprise_url: str | None = None


class Site(_Row):
    id: str = Field(pattern=_ID)
    organisation: str
    kind: Literal["home", "room"] = "home"
    name: str
    address: str | None = None


class FamilyContact(_Row):
    name: str
    phone: str | None = None
    apprise_url: str | None = None


class Resident(_Row):
    id: str = Field(min_length=1, max_length=64)  # the district's own id (external_id)
    site: str
    name: str
    birth_year: int | None = None
    phone: str | None = None
    lives_alone: bool = False
    inactivity_window_min: int = Field(720, gt=0)
    timezone: str = "Asia/Shanghai"
    night_start: time = time(22, 0)
    night_end: time = time(6, 30)
    # The resident's own vital-sign range (a bound left out is the default's:
    # heart rate 45-120 bpm, SpO2 >= 90 %); held 2 min to raise vital_signs.
    heart_rate_min: int | None = Field(None, ge=20, le=250)
    heart_rate_max: int | None = Field(None, ge=20, le=250)
    spo2_min: int | None = Field(None, ge=50, le=100)
    family: list[FamilyContact] = []

    @model_validator(mode="after")
    def _heart_rate_range(self) -> Resident:
        low, high = self.heart_rate_min, self.heart_rate_max
        if low is not None and high is not None and low >= high:
            raise ValueError(f"heart_rate_min {low} must lie below heart_rate_max {high}")
        return self


class Device(_Row):
    site: str
    id: str = Field(pattern=_ID)
    profile: str
    address: str
    resident: str | None = None
    description: str | None = None


class Staff(_Row):
    id: str = Field(pattern=r"^[a-z0-9._-]{1,64}$")
    organisation: str
    name: str
    role: Literal["duty", "supervisor", "street", "bureau", "admin"]
    phone: str | None = None
    apprise_url: str | None = None
    active: bool = True


class Shift(_Row):
    staff: str
    starts_at: AwareDatetime
    ends_at: AwareDatetime


class Policy(_Row):
    unit: str
    alert_type: str = ""
    severity: Literal["critical", "major", "minor"]
    policy: dict[str, Any]


class District(_Row):
    organisations: list[Organisation] = []
    sites: list[Site] = []
    residents: list[Resident] = []
    devices: list[Device] = []
    staff: list[Staff] = []
    shifts: list[Shift] = []
    policies: list[Policy] = []


class DistrictFileError(ValueError):
    pass


def load(path: Path) -> District:
    text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)  # JSON is YAML too
        return District.model_validate(doc or {})
    except yaml.YAMLError as exc:
        raise DistrictFileError(f"{path}: not YAML or JSON: {exc}") from exc
    except ValidationError as exc:
        raise DistrictFileError(f"{path}: {exc}") from exc


def _parents_first(orgs: list[Organisation]) -> list[Organisation]:
    done: set[str | None] = {None}
    out: list[Organisation] = []
    pending = list(orgs)
    while pending:
        ready = [o for o in pending if o.parent in done or o.parent not in {p.id for p in pending}]
        if not ready:
            raise DistrictFileError(f"organisations form a cycle: {[o.id for o in pending]}")
        for o in ready:
            out.append(o)
            done.add(o.id)
            pending.remove(o)
    return out


def import_district(dsn: str, district: District) -> dict[str, int]:
    """Upsert everything in one transaction; returns rows written per section."""
    for p in district.policies:
        try:
            policy_from_json(p.policy)
        except (KeyError, ValueError, TypeError) as exc:
            raise DistrictFileError(f"policy for {p.unit}/{p.severity}: {exc}") from exc
    counts: dict[str, int] = {}
    with psycopg.connect(dsn) as conn, conn.transaction():
        for o in _parents_first(district.organisations):
            conn.execute(
                "INSERT INTO organisations (id, parent_id, kind, name, webhook_url, apprise_url)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                " parent_id = excluded.parent_id, kind = excluded.kind, name = excluded.name,"
                " webhook_url = excluded.webhook_url, apprise_url = excluded.apprise_url",
                (o.id, o.parent, o.kind, o.name, o.webhook_url, o.apprise_url),
            )
        for s in district.sites:
            conn.execute(
                "INSERT INTO sites (id, organisation_id, kind, name, address)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                " organisation_id = excluded.organisation_id, kind = excluded.kind,"
                " name = excluded.name, address = excluded.address",
                (s.id, s.organisation, s.kind, s.name, s.address),
            )
        resident_ids: dict[str, int] = {}
        for r in district.residents:
            row = conn.execute(
                "INSERT INTO residents (external_id, site_id, name, birth_year, phone,"
                " lives_alone, inactivity_window_min, timezone, night_start, night_end,"
                " heart_rate_min, heart_rate_max, spo2_min)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (external_id) DO UPDATE SET site_id = excluded.site_id,"
                " name = excluded.name, birth_year = excluded.birth_year, phone = excluded.phone,"
                " lives_alone = excluded.lives_alone,"
                " inactivity_window_min = excluded.inactivity_window_min,"
                " timezone = excluded.timezone, night_start = excluded.night_start,"
                " night_end = excluded.night_end, heart_rate_min = excluded.heart_rate_min,"
                " heart_rate_max = excluded.heart_rate_max, spo2_min = excluded.spo2_min"
                " RETURNING id",
                (r.id, r.site, r.name, r.birth_year, r.phone, r.lives_alone,
                 r.inactivity_window_min, r.timezone, r.night_start, r.night_end,
                 r.heart_rate_min, r.heart_rate_max, r.spo2_min),
            ).fetchone()  # fmt: skip
            assert row is not None
            resident_ids[r.id] = row[0]
            if r.lives_alone:  # the welfare check watches whoever lives alone
                conn.execute(
                    "INSERT INTO inactivity_watch (resident_id) VALUES (%s)"
                    " ON CONFLICT DO NOTHING", (row[0],),
                )  # fmt: skip
            else:
                conn.execute("DELETE FROM inactivity_watch WHERE resident_id = %s", (row[0],))
            conn.execute("DELETE FROM family_contacts WHERE resident_id = %s", (row[0],))
            for rank, f in enumerate(r.family):
                conn.execute(
                    "INSERT INTO family_contacts (resident_id, name, phone, apprise_url, rank)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (row[0], f.name, f.phone, f.apprise_url, rank),
                )
        for d in district.devices:
            resident = None
            if d.resident is not None:
                found = resident_ids.get(d.resident) or _resident_id(conn, d.resident)
                if found is None:
                    raise DistrictFileError(f"device {d.site}/{d.id}: no resident {d.resident!r}")
                resident = found
            conn.execute(
                "INSERT INTO devices (site_id, id, profile, address, resident_id, description)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (site_id, id) DO UPDATE SET"
                " profile = excluded.profile, address = excluded.address,"
                " resident_id = excluded.resident_id, description = excluded.description",
                (d.site, d.id, d.profile, d.address, resident, d.description),
            )
        # The vital-sign sweep watches every wristband given to a resident (gateway.alerts.vitals).
        conn.execute(WATCH_WRISTBANDS, {"profiles": list(VITAL_PROFILES)})
        conn.execute(UNWATCH_WRISTBANDS, {"profiles": list(VITAL_PROFILES)})
        for st in district.staff:
            conn.execute(
                "INSERT INTO staff (id, organisation_id, name, role, phone, apprise_url, active)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                " organisation_id = excluded.organisation_id, name = excluded.name,"
                " role = excluded.role, phone = excluded.phone,"
                " apprise_url = excluded.apprise_url, active = excluded.active",
                (st.id, st.organisation, st.name, st.role, st.phone, st.apprise_url, st.active),
            )
        for sh in district.shifts:
            if sh.ends_at <= sh.starts_at:
                raise DistrictFileError(f"shift of {sh.staff} at {sh.starts_at}: ends before start")
            conn.execute(
                "INSERT INTO shifts (staff_id, starts_at, ends_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (staff_id, starts_at) DO UPDATE SET ends_at = excluded.ends_at",
                (sh.staff, sh.starts_at, sh.ends_at),
            )
        for p in district.policies:
            conn.execute(
                "INSERT INTO escalation_policies (unit_id, alert_type, severity, policy)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (unit_id, alert_type, severity)"
                " DO UPDATE SET policy = excluded.policy",
                (p.unit, p.alert_type, p.severity, Jsonb(p.policy)),
            )
        for section in District.model_fields:
            counts[section] = len(getattr(district, section))
    return counts


def _resident_id(conn: psycopg.Connection[Any], external_id: str) -> int | None:
    row = conn.execute("SELECT id FROM residents WHERE external_id = %s", (external_id,)).fetchone()
    return int(row[0]) if row else None

