"""The voice/SMS provider's callback: a callee keyed in the acknowledge code of a call.

Only an integration's API key may call it (the provider is no person), and only for
notices of alerts in that key's units. A right code confirms the notice
(``outbox.confirm_by_code``: no further channel is tried for it, the audit chain says
so); when the callee is staff and the alert is still open, it is also their
acknowledgement, through the engine's own command path (ladder stops, the wristband
hears "help is coming") — what the spoken text asks them to confirm.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, Field

from alerting.lifecycle import IllegalTransition, acknowledge
from alerting.model import Channel
from gateway.alerts.unit_of_work import command
from gateway.api.deps import Conn, CurrentUser, Now
from gateway.api.idempotency import IdempotencyKey, once
from gateway.notify.outbox import confirm_by_code

router = APIRouter(prefix="/api/notify", tags=["notify"])

_NOTICE = """
SELECT n.alert_id, n.person_id, n.channel FROM notifications n
JOIN alerts a ON a.id = n.alert_id JOIN sites s ON s.id = a.site_id
WHERE n.key = %s AND s.organisation_id = ANY(%s)
"""


class AckCodeBody(BaseModel):
    notification: Annotated[str, Field(min_length=1, max_length=300, pattern=r"^[^\x00]*$",
                                       description="the notice key the call carried")]
    digits: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[0-9 #*]+$")]


class AckCodeAnswer(BaseModel):
    confirmed: bool
    acknowledged: bool


@router.post("/ack-code", response_model=AckCodeAnswer,
             responses={403: {"description": "for an integration's API key only"},
                        404: {"description": "no such notice in the key's units"}})
async def ack_code(body: AckCodeBody, conn: Conn, me: CurrentUser, now: Now, request: Request,
                   key: IdempotencyKey = None) -> Any:
    """``confirmed: false`` for a wrong code (the provider may ask again). The confirmation
    and the acknowledgement commit together; a provider retrying its callback with the
    same Idempotency-Key gets the first answer again."""
    if not me.via_api_key:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the provider's callback takes an API key")
    row = await (await conn.execute(_NOTICE, (body.notification, me.unit_list))).fetchone()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no notice {body.notification}")
    alert_id, person_id, channel = row

    async def run() -> AckCodeAnswer:
        async with conn.transaction():
            if not await confirm_by_code(conn, body.notification, body.digits, now,
                                         worker=f"api:{me.actor}"):
                return AckCodeAnswer(confirmed=False, acknowledged=False)
            if not person_id.startswith("staff:"):
                return AckCodeAnswer(confirmed=True, acknowledged=False)
            try:
                await command(conn, alert_id, lambda a: acknowledge(person_id, Channel(channel)),
                              now, worker=f"api:{me.actor}")
            except IllegalTransition:
                # acknowledged already (or past it): the notice is confirmed all the same
                return AckCodeAnswer(confirmed=True, acknowledged=False)
        return AckCodeAnswer(confirmed=True, acknowledged=True)

    return await once(conn, me, key, "POST", request.url.path, run)
