"""Escalation policies: the defaults (ARCHITECTURE §5) and the per-unit overrides of the
caller's units, in the JSON the district file and ``escalation_policies`` hold.

An override is validated with ``directory.policy_from_json`` (the engine's own reader),
so what is stored is what the engine will run; a unit's override applies to its
sites and to every unit below that has none of its own (PolicyBook.resolve).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, status
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

from alerting.model import AlertType
from alerting.policy import DEFAULT_BY_SEVERITY, DEFAULT_BY_TYPE, EscalationPolicy
from gateway.alerts.directory import policy_from_json
from gateway.api.deps import Conn, CurrentUser, Manager
from gateway.api.routes.organisations import org_not_found

router = APIRouter(prefix="/api/policies", tags=["policies"])

SeverityName = Literal["critical", "major", "minor"]
TypeName = Annotated[str, Path(max_length=32, description="an alert type, or 'any'")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such unit (or override) in your part of the tree"}}


class LevelDoc(BaseModel):
    after_s: float = Field(ge=0, le=7 * 24 * 3600, allow_inf_nan=False)
    roles: list[Literal["duty", "supervisor", "family", "street", "bureau", "acknowledger"]] = \
        Field(min_length=1, max_length=6)
    channels: list[Literal["console", "messaging", "voice", "sms", "webhook"]] = \
        Field(min_length=1, max_length=5)


class PolicyDoc(BaseModel):
    name: str = Field("override", min_length=1, max_length=64, pattern=r"^[^\x00]*$")
    levels: list[LevelDoc] = Field(min_length=1, max_length=10)
    ladder_until: Literal["acknowledged", "on_scene", "resolved"] = "acknowledged"
    repeat_top_every_s: float | None = Field(None, gt=0, le=7 * 24 * 3600, allow_inf_nan=False)
    remind_every_s: float | None = Field(None, gt=0, le=7 * 24 * 3600, allow_inf_nan=False)
    on_scene_within_s: float | None = Field(None, gt=0, le=7 * 24 * 3600, allow_inf_nan=False)


class PolicyOut(BaseModel):
    unit_id: str | None  # None: the district-wide default
    alert_type: str | None  # None: every type of the severity
    severity: str
    policy: PolicyDoc


def policy_doc(p: EscalationPolicy) -> PolicyDoc:
    def secs(value: Any) -> float | None:
        return None if value is None else value.total_seconds()

    return PolicyDoc.model_validate({
        "name": p.name,
        "levels": [{"after_s": lv.after.total_seconds(), "roles": [r.value for r in lv.roles],
                    "channels": [c.value for c in lv.channels]} for lv in p.levels],
        "ladder_until": p.ladder_until.value,
        "repeat_top_every_s": secs(p.repeat_top_every), "remind_every_s": secs(p.remind_every),
        "on_scene_within_s": secs(p.on_scene_within),
    })  # fmt: skip


def _defaults() -> list[PolicyOut]:
    out = [PolicyOut(unit_id=None, alert_type=None, severity=s.value, policy=policy_doc(p))
           for s, p in DEFAULT_BY_SEVERITY.items()]
    out += [PolicyOut(unit_id=None, alert_type=t.value, severity=s.value, policy=policy_doc(p))
            for (t, s), p in DEFAULT_BY_TYPE.items()]
    return out


@router.get("", response_model=list[PolicyOut])
async def list_policies(conn: Conn, me: CurrentUser) -> list[PolicyOut]:
    """The defaults, then the overrides of your units."""
    cur = await conn.execute(
        "SELECT unit_id, alert_type, severity, policy FROM escalation_policies"
        " WHERE unit_id = ANY(%s) ORDER BY unit_id, alert_type, severity", (me.unit_list,))
    overrides = [PolicyOut(unit_id=u, alert_type=t or None, severity=s,
                           policy=policy_doc(policy_from_json(doc)))
                 for u, t, s, doc in await cur.fetchall()]
    return _defaults() + overrides


def _type_key(alert_type: str) -> str:
    if alert_type == "any":
        return ""
    try:
        return AlertType(alert_type).value
    except ValueError:
        raise HTTPException(422, f"{alert_type!r} is not an alert type or 'any'") from None


@router.put("/{unit_id}/{alert_type}/{severity}", response_model=PolicyOut,
            responses=NOT_FOUND)
async def set_policy(
    unit_id: Annotated[str, Path(max_length=64)], alert_type: TypeName,
    severity: SeverityName, body: PolicyDoc, conn: Conn, me: Manager,
) -> PolicyOut:
    """Set the unit's override for alerts of this type (``any``: every type) and severity."""
    if unit_id not in me.units:
        raise org_not_found(unit_id)
    key = _type_key(alert_type)
    doc = body.model_dump(exclude_none=True)
    try:
        policy = policy_from_json(doc)
    except (KeyError, ValueError, TypeError) as exc:
        raise HTTPException(422, f"not a policy the engine can run: {exc}") from None
    await conn.execute(
        "INSERT INTO escalation_policies (unit_id, alert_type, severity, policy)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (unit_id, alert_type, severity)"
        " DO UPDATE SET policy = excluded.policy", (unit_id, key, severity, Jsonb(doc)))
    return PolicyOut(unit_id=unit_id, alert_type=key or None, severity=severity,
                     policy=policy_doc(policy))


@router.delete("/{unit_id}/{alert_type}/{severity}", status_code=status.HTTP_204_NO_CONTENT,
               responses=NOT_FOUND)
async def delete_policy(
    unit_id: Annotated[str, Path(max_length=64)], alert_type: TypeName,
    severity: SeverityName, conn: Conn, me: Manager,
) -> None:
    """Drop the override: the unit's alerts follow the policy above it again."""
    if unit_id not in me.units:
        raise org_not_found(unit_id)
    cur = await conn.execute(
        "DELETE FROM escalation_policies WHERE unit_id = %s AND alert_type = %s"
        " AND severity = %s RETURNING 1", (unit_id, _type_key(alert_type), severity))
    if await cur.fetchone() is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"no override for {unit_id}/{alert_type}/{severity}")
