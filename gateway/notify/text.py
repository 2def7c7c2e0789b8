"""The Chinese text a message shows and a call speaks, built from the alert's place.

The engine's notice text names only the site id (``alerting.pipeline.render``);
here the site's address and the residents' names replace it, with the same
sentences (``pipeline.TEXTS``) so the wording lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from alerting.pipeline import ESCALATED_PREFIX, REMINDER_PREFIX, TEXTS, Notice

LABELS = {
    "sos": "紧急呼叫",
    "fall": "跌倒报警",
    "smoke": "火警",
    "electrical": "电气火灾预警",
    "vital_signs": "体征异常",
    "inactivity": "无活动提醒",
    "wandering": "走失预警",
    "device_offline": "设备离线",
    "low_battery": "电量低",
    "tamper": "设备异常",
    "device_fault": "设备故障",
}


@dataclass(frozen=True, slots=True)
class Place:
    """Where an alert is: the site's name and address, who lives there."""

    site_id: str
    name: str | None = None
    address: str | None = None
    residents: tuple[str, ...] = ()


def describe(notice: Notice, place: Place | None) -> str:
    """The message text: the alert's sentence at the address, then the residents."""
    if notice.members or place is None:  # a group summary keeps its own text
        return notice.text
    prefix = next((p for p in (REMINDER_PREFIX, ESCALATED_PREFIX) if notice.text.startswith(p)), "")
    where = place.address or place.name or place.site_id
    text = prefix + TEXTS[notice.alert_type].format(site=where)
    if place.residents:
        text += f"老人：{'、'.join(place.residents)}。"
    return text


def spoken(text: str, ack_code: str) -> str:
    """What the call says: the message, then the code, digit by digit (for TTS)."""
    return f"{text}确认收到请按键输入确认码 {' '.join(ack_code)}。"


def title(notice: Notice) -> str:
    return f"【{LABELS.get(notice.alert_type.value, notice.alert_type.value)}】{notice.site_id}"
