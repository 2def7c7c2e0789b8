"""``state_dir/health.json`` for a local watchdog (the broker may be away), and the
outbox's housekeeping that goes with it (backlog count, expired dedup keys)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.edge.outbox import AsyncOutbox
from gateway.mqtt.client import MqttClient

log = logging.getLogger(__name__)


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
    pending = 0
    while True:
        outbox_error = ""
        try:
            pending = await outbox.pending()
            if tick % purge_every == 0:
                await outbox.purge_expired()
        except sqlite3.Error as exc:
            # a busy or failing disk is reported, not fatal: the alarm path has its own
            # retries, and health.json is how a watchdog learns of the trouble
            outbox_error = f"{type(exc).__name__}: {exc}"
            log.warning("outbox housekeeping failed: %s", outbox_error)
        health = {
            "pid": os.getpid(),
            "time": time.time(),
            "connected": client.connected.is_set(),
            "mqtt_error": client.last_error,
            "outbox_pending": pending,
            "outbox_error": outbox_error,
            "mqtt_outstanding": client.outstanding,
            **snapshot(pending),
        }
        tmp = health_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(health, indent=1, sort_keys=True))
        tmp.replace(health_path)
        tick += 1
        await asyncio.sleep(period_s)
