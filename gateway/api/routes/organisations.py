"""The organisation tree within the caller's scope: their unit and everything below it.

Counts (sites, residents, open alerts) are of each node itself, taken within the
caller's units only, so nothing outside the caller's part of the tree shows in them.
"""

from __future__ import annotations

from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, HTTPException, Path, status
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from gateway.api.deps import Conn, CurrentUser
from gateway.api.principal import Principal

router = APIRouter(prefix="/api/organisations", tags=["organisations"])

OrgId = Annotated[str, Path(max_length=64)]
# Fields clients write: PostgreSQL text holds no NUL; ids as the schema's CHECKs want them.
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
Text = Annotated[str, Field(max_length=2000, pattern=r"^[^\x00]*$")]
Phone = Annotated[str, Field(min_length=3, max_length=32, pattern=r"^\+?[0-9 -]{3,31}$")]
Ident = Annotated[str, Field(pattern=r"^[a-z0-9-]{1,64}$")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such organisation in your part of the tree"}}

_NODES = """
SELECT o.id, o.parent_id, o.kind, o.name,
       (SELECT count(*) FROM sites s WHERE s.organisation_id = o.id) AS sites,
       (SELECT count(*) FROM residents r JOIN sites s ON s.id = r.site_id
        WHERE s.organisation_id = o.id) AS residents,
       (SELECT count(*) FROM alerts a JOIN sites s ON s.id = a.site_id
        WHERE s.organisation_id = o.id AND a.status <> 'resolved') AS open_alerts
FROM organisations o WHERE o.id = ANY(%(units)s)
ORDER BY o.kind = 'bureau' DESC, o.kind = 'street' DESC, o.id
"""
_SUBTREE = """
WITH RECURSIVE sub AS (SELECT id FROM organisations WHERE id = %s
    UNION ALL SELECT o.id FROM organisations o JOIN sub ON o.parent_id = sub.id)
SELECT id FROM sub
"""


class OrganisationNode(BaseModel):
    id: str
    # None for the top of the caller's view: what lies above it is not theirs to see
    parent_id: str | None
    kind: str
    name: str
    sites: int
    residents: int
    open_alerts: int


def org_not_found(org_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no organisation {org_id}")


async def units_under(
    conn: psycopg.AsyncConnection[Any], me: Principal, unit: str | None
) -> list[str]:
    """The caller's units, narrowed to ``unit`` and below when given (someone else's
    unit narrows to nothing, like a unit that does not exist)."""
    if unit is None:
        return me.unit_list
    rows = await (await conn.execute(_SUBTREE, (unit,))).fetchall()
    return sorted(me.units & {r[0] for r in rows})


async def require_unit(me: Principal, org_id: str) -> str:
    if org_id not in me.units:
        raise org_not_found(org_id)
    return org_id


async def _nodes(conn: Conn, me: Principal, units: list[str]) -> list[OrganisationNode]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_NODES, {"units": units})
        rows = await cur.fetchall()
    return [OrganisationNode(**(r | {"parent_id": r["parent_id"] if r["parent_id"] in me.units
                                     else None})) for r in rows]


@router.get("", response_model=list[OrganisationNode])
async def list_organisations(conn: Conn, me: CurrentUser) -> list[OrganisationNode]:
    """The caller's unit and everything below it, parents before children."""
    return await _nodes(conn, me, me.unit_list)


@router.get("/{org_id}", response_model=OrganisationNode, responses=NOT_FOUND)
async def get_organisation(org_id: OrgId, conn: Conn, me: CurrentUser) -> OrganisationNode:
    await require_unit(me, org_id)
    nodes = await _nodes(conn, me, [org_id])
    if not nodes:
        raise org_not_found(org_id)
    return nodes[0]
