"""health.json keeps coming while the outbox's database is busy; the trouble is reported in it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from support import until

from gateway.edge.health import housekeeping_loop
from gateway.edge.outbox import AsyncOutbox, Outbox
from gateway.mqtt.client import MqttClient, MqttSettings


async def _health_where(path: Path, predicate, within_s: float = 20.0) -> dict:  # type: ignore[no-untyped-def, type-arg]
    def matching() -> dict | None:  # type: ignore[type-arg]
        try:
            doc = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return doc if predicate(doc) else None  # type: ignore[no-any-return]

    return await until(matching, within_s, f"a health document as wanted in {path}")  # type: ignore[no-any-return]


async def test_a_locked_outbox_is_reported_in_health_and_housekeeping_goes_on(
    tmp_path: Path,
) -> None:
    db = tmp_path / "outbox.sqlite3"
    outbox = AsyncOutbox(Outbox(db))
    client = MqttClient(MqttSettings(host="127.0.0.1", port=1, client_id="gw-test"))
    health = tmp_path / "health.json"
    task = asyncio.create_task(
        housekeeping_loop(health, outbox, client, lambda pending: {}, period_s=0.05, purge_every=1)
    )
    try:
        await _health_where(health, lambda d: d["outbox_error"] == "")
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            busy = await _health_where(health, lambda d: d["outbox_error"] != "")
            assert "locked" in busy["outbox_error"]
            assert not task.done()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await _health_where(health, lambda d: d["outbox_error"] == "")
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await outbox.close()
