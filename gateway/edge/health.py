"""``state_dir/health.json`` for a local watchdog (the broker may be away), and the
outbox's housekeeping that goes with it (backlog count, expired dedup keys)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.edge.outbox import AsyncOutbox
from gateway.mqtt.client import MqttClient


async def housekeeping_loop(
    health_path: Path,
    outbox: AsyncOutbox,
    client: MqttClient,
    snapshot: Callable[[int], Mapping[str, Any]],
    *,
    period_s: float = 0.5,
    purge_every: int = 60,
) -> None:
    """Refresh the outbox count, purge old dedup keys, write ``health.json`` atomically.

    ``snapshot(outbox_pending)`` supplies the pipeline's part of the document.
    """
    tick = 0
    while True:
        pending = await outbox.pending()
        if tick % purge_every == 0:
            await outbox.purge_expired()
        health = {
            "pid": os.getpid(),
            "time": time.time(),
            "connected": client.connected.is_set(),
            "mqtt_error": client.last_error,
            "outbox_pending": pending,
            "mqtt_outstanding": client.outstanding,
            **snapshot(pending),
        }
        tmp = health_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(health, indent=1, sort_keys=True))
        tmp.replace(health_path)
        tick += 1
        await asyncio.sleep(period_s)
