"""Who is calling and which part of the organisation tree they may see.

ARCHITECTURE §7: a person (or an API key) acts with one role inside one
organisation and sees that organisation and everything below it. Anything
outside answers 404 — the same answer as for something that does not exist,
so a list, a count or an error never tells that another unit's item exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class StaffRole(StrEnum):
    DUTY = "duty"
    SUPERVISOR = "supervisor"
    STREET = "street"
    BUREAU = "bureau"
    ADMIN = "admin"


# Roles that may act on alerts of their units (acknowledge, on scene, resolve...).
ACTING_ROLES = frozenset(StaffRole)
# Roles that may change the directory (staff, shifts, residents, devices, policies).
MANAGING_ROLES = frozenset({StaffRole.SUPERVISOR, StaffRole.ADMIN})


def _with_units(caller: str) -> str:
    """The caller's row with its organisation's kind and every unit at or below it: one
    statement, so authenticating a request is one round trip (every request does it)."""
    return f"""
WITH RECURSIVE caller AS ({caller}),
sub (id) AS (
    SELECT o.id FROM organisations o JOIN caller ON o.id = caller.organisation_id
    UNION ALL
    SELECT o.id FROM organisations o JOIN sub ON o.parent_id = sub.id
)
SELECT caller.id, caller.name, caller.role, caller.organisation_id, caller.token_version,
       o.kind, ARRAY(SELECT id FROM sub)
FROM caller LEFT JOIN organisations o ON o.id = caller.organisation_id
"""


STAFF_PRINCIPAL = _with_units(
    "SELECT id, name, role, organisation_id, token_version FROM staff WHERE id = %s AND active"
)
KEY_PRINCIPAL = _with_units(
    "SELECT id, name, role, organisation_id, NULL::int AS token_version FROM api_keys"
    " WHERE key_sha256 = %s AND revoked_at IS NULL"
)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``units`` is their organisation and all below it."""

    id: str
    name: str
    role: StaffRole
    organisation_id: str
    organisation_kind: str
    units: frozenset[str]
    via_api_key: bool = False

    @property
    def actor(self) -> str:
        """The audit actor: ``staff:<id>`` (alerting.model.staff_actor) or ``apikey:<id>``."""
        return f"apikey:{self.id}" if self.via_api_key else f"staff:{self.id}"

    @property
    def unit_list(self) -> list[str]:
        return sorted(self.units)

    def manages(self) -> bool:
        return self.role in MANAGING_ROLES

    def above_units(self) -> bool:
        """Whether the caller sits above the responsible units (street, bureau): names,
        addresses, phones and health readings are masked for them until an alert
        escalates to their level."""
        return self.organisation_kind in ("street", "bureau")


def principal_from_row(row: Sequence[Any], via_api_key: bool = False) -> Principal:
    """The caller of a row of ``STAFF_PRINCIPAL`` or ``KEY_PRINCIPAL``."""
    pid, name, role, organisation_id, _version, kind, units = row
    return Principal(pid, name, StaffRole(role), organisation_id, kind or "station",
                     frozenset(units), via_api_key)


def mask_name(name: str | None) -> str | None:
    """张三丰 → 张** ; Zhang San → Z*** (keeps the first character, as Chinese
    desensitisation practice (GB/T 35273 §3.14 de-identification) shows names)."""
    if not name:
        return name
    return name[0] + "*" * max(len(name) - 1, 1)


def mask_phone(phone: str | None) -> str | None:
    """13812345678 → 138****5678: enough to recognise, not to call."""
    if not phone:
        return phone
    digits = phone.strip()
    if len(digits) <= 7:
        return "*" * len(digits)
    return digits[:3] + "*" * (len(digits) - 7) + digits[-4:]


def mask_address(address: str | None) -> str | None:
    if not address:
        return address
    return address[: max(len(address) // 3, 2)] + "…"
