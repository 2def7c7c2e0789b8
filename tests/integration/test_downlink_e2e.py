"""The device downlink end to end, with real processes: a simulated wristband (bumble) under a
real ``eldersafe edge``, a real ``eldersafe server`` on a clock the test drives, one broker.

An SOS pressed on the wristband becomes an alert; staff acknowledge it at 90 s (through
``unit_of_work.command``, the function the console API calls); the ladder stops at level
1; the server publishes "help is coming" on its own MQTT session; the wristband records
the acknowledge command (0x01); its result comes back and the alert's audit chain says
the device confirmed. Across a broker killed while the command waits for its PUBACK, the
command is neither lost nor carried out twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import (
    GATEWAY_PASSWORDS,
    SERVER_PASSWORDS,
    Collector,
    ServerProcess,
    scalar,
    until,
)
from test_alert_engine import DISTRICT, T0, ingest, rows
from test_alert_engine_processes import set_clock

from alerting.downlink import COMMAND_NAMESPACE, HELP_COMING
from alerting.lifecycle import acknowledge
from alerting.model import Channel, staff_actor
from gateway.alerts.audit_verify import verify
from gateway.alerts.district import District, import_district
from gateway.alerts.downlink import publish_pending
from gateway.alerts.unit_of_work import command, intake_batch
from gateway.local.mosquitto import MosquittoInstance
from gateway.mqtt.consumer import MqttConsumer, MqttEndpoint
from gateway.simulate import BrokerLogin, RunningSimulation, simulation
from simulators.scenario import Scenario, ScenarioDevice

pytestmark = pytest.mark.timeout(120)

SITE, GATEWAY = "site-a", "gw-site-a"
SCENARIO = Scenario(
    name="downlink",
    title="Staff acknowledge: the wristband is told help is coming",
    site=SITE,
    gateway=GATEWAY,
    duration_s=1,
    devices=[ScenarioDevice(id="wb-1", kind="wristband", address="C0:4E:57:00:00:09")],
)
ENGINE = {"ELDERSAFE_ENGINE_CLOCK": "database", "ELDERSAFE_ENGINE_POLL_S": "0.05"}


def district(t0: datetime) -> District:
    """The engine tests' district, its duty shift around this test's clock."""
    doc = dict(DISTRICT)
    doc["shifts"] = [{"staff": "duty-1", "starts_at": (t0 - timedelta(hours=1)).isoformat(),
                      "ends_at": (t0 + timedelta(hours=12)).isoformat()}]  # fmt: skip
    return District.model_validate(doc)


async def until_true(check: Callable[[], Any], limit_s: float, what: str) -> Any:
    """Poll ``check`` (blocking: run in a thread, the simulated link keeps its loop) until
    it returns something truthy; that value."""
    return await until(lambda: asyncio.to_thread(check), limit_s, what)


async def start(
    database: str, broker: MosquittoInstance, make_server: Any, tmp_path: Path
) -> tuple[datetime, ServerProcess]:
    t0 = datetime.now(UTC).replace(microsecond=0)
    await asyncio.to_thread(import_district, database, district(t0))
    await asyncio.to_thread(set_clock, database, t0)
    server: ServerProcess = make_server(database, broker.port, **ENGINE)
    server.start()
    await asyncio.to_thread(server.wait_session)
    return t0, server


def login(broker: MosquittoInstance) -> BrokerLogin:
    return BrokerLogin("127.0.0.1", broker.port, GATEWAY, GATEWAY_PASSWORDS[GATEWAY])


async def sos_alert(database: str, sim: RunningSimulation) -> uuid.UUID:
    await sim.wait_ready()
    await sim.site.wristbands["wb-1"].press_sos()
    alert_id: uuid.UUID = await until_true(
        lambda: scalar(database, "SELECT id FROM alerts WHERE type = 'sos' AND device_id = 'wb-1'"),
        20,
        "the wristband's sos alert",
    )
    return alert_id


async def acknowledge_at(database: str, alert_id: uuid.UUID, at: datetime) -> None:
    """As the console will: the person's command through the engine's unit of work."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        ack = acknowledge(staff_actor("duty-1"), Channel.CONSOLE)
        await command(conn, alert_id, lambda _a: ack, at)


def help_coming(alert_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(COMMAND_NAMESPACE, f"{alert_id}/0/{HELP_COMING}")


def device_audit(database: str, alert_id: uuid.UUID) -> list[tuple[Any, ...]]:
    return rows(
        database,
        "SELECT action, detail->>'result', detail->>'command_id', detail->>'action', actor"
        " FROM alert_audit WHERE alert_id = %s AND channel = 'device' AND detail ? 'command_id'"
        " ORDER BY seq",
        (alert_id,),
    )


async def test_acknowledged_at_90_s_stops_at_level_1_and_the_wristband_is_told_help_is_coming(
    database: str, broker: MosquittoInstance, make_server: Any, tmp_path: Path
) -> None:
    t0, server = await start(database, broker, make_server, tmp_path)
    async with simulation(SCENARIO, login(broker), tmp_path / "sim",
                          log_path=tmp_path / "edge.log") as sim:  # fmt: skip
        band = sim.site.wristbands["wb-1"]
        alert_id = await sos_alert(database, sim)
        # The band's clock is the real one, a little ahead of the engine's: its ladder
        # still starts at the engine's now (a future time never delays the first rung).
        anchor = scalar(database, "SELECT escalation_anchor FROM alerts WHERE id = %s", (alert_id,))
        assert anchor == t0
        # A second, unacknowledged sos shows the timers really ran at each clock below.
        control = await asyncio.to_thread(ingest, database, "site-b", "btn-9", "sos", "pulse", t0)

        def levels(device: str) -> list[int]:
            return [r[0] for r in rows(
                database,
                "SELECT s.level FROM alert_steps s JOIN alerts a ON a.id = s.alert_id"
                " WHERE a.device_id = %s ORDER BY s.level", (device,))]  # fmt: skip

        await until_true(lambda: levels("wb-1") == [0] and levels("btn-9") == [0], 15, "rung 0")
        await asyncio.to_thread(set_clock, database, t0 + timedelta(seconds=60))
        await until_true(lambda: levels("wb-1") == [0, 1], 15, "the supervisor rung at 60 s")

        await acknowledge_at(database, alert_id, t0 + timedelta(seconds=90))
        for second in (180, 300):
            await asyncio.to_thread(set_clock, database, t0 + timedelta(seconds=second))
            want = [0, 1, 2] if second == 180 else [0, 1, 2, 3]
            await until_true(lambda want=want: levels("btn-9") == want, 15, f"control at {second}")
        assert levels("wb-1") == [0, 1], "escalation went on after the acknowledgement"
        assert scalar(database, "SELECT level FROM alerts WHERE id = %s", (alert_id,)) == 1

        # The wristband was told: the acknowledge command (0x01) reached it, once.
        await until_true(lambda: [c.data for c in band.commands] == [b"\x01"], 20, "0x01")
        ack_id = help_coming(alert_id)
        confirmed = ("notified", "device_confirmed", str(ack_id), "acknowledge",
                     f"device:{SITE}/wb-1")  # fmt: skip
        await until_true(lambda: confirmed in device_audit(database, alert_id), 20, "confirmed")
        # "alarm received" at the opening is a call-button command: a wristband's
        # profile lacks it, so the engine never queues it for the band.
        refused = [r for r in device_audit(database, alert_id) if r[0] == "delivery_failed"]
        assert refused == []
        shown = rows(
            database,
            "SELECT action, alert->'device_command'->>'command_id', alert->>'status'"
            " FROM alert_changes WHERE alert_id = %s AND action LIKE 'device_%%'",
            (alert_id,),
        )
        assert ("device_confirmed", str(ack_id), "acknowledged") in shown
        assert rows(
            database,
            "SELECT action, published_at IS NOT NULL, last_error FROM downlink_outbox"
            " WHERE alert_id = %s ORDER BY created_at",
            (alert_id,),
        ) == [("acknowledge", True, None)]
        assert control is not None
        read, problems = await asyncio.to_thread(verify, database)
        assert read > 0 and problems == ()
        assert (sim.health().get("commands") or {}).get("duplicate", 0) == 0
    assert server.proc is not None and server.proc.poll() is None, server.log_tail()


def persisted_at(broker: MosquittoInstance) -> int:
    """When the broker last wrote its persistence file (ns; -1: never)."""
    db = broker.data_dir / "mosquitto.db"
    return db.stat().st_mtime_ns if db.exists() else -1


async def test_a_command_waiting_for_its_puback_survives_a_broker_killed_and_runs_once(
    database: str, broker: MosquittoInstance, make_server: Any, tmp_path: Path
) -> None:
    t0, server = await start(database, broker, make_server, tmp_path)
    assert broker.process is not None
    async with simulation(SCENARIO, login(broker), tmp_path / "sim",
                          log_path=tmp_path / "edge.log") as sim:  # fmt: skip
        band = sim.site.wristbands["wb-1"]
        alert_id = await sos_alert(database, sim)
        # A first command (locate) is published, acknowledged by the broker, answered by
        # the edge: the whole path is up before the broker is frozen.
        await asyncio.to_thread(
            rows, database,
            "INSERT INTO downlink_outbox (command_id, alert_id, site_id, device_id, action,"
            " created_at) VALUES (%s, %s, %s, 'wb-1', 'locate', now()) RETURNING command_id",
            (uuid.uuid4(), alert_id, SITE),
        )  # fmt: skip
        await until_true(lambda: len(device_audit(database, alert_id)) == 1, 20, "first result")
        # The broker writes its sessions (the edge's subscription, the server's session)
        # to disk now, so the restarted broker still has them.
        before = persisted_at(broker)
        os.kill(broker.process.pid, signal.SIGUSR1)
        await until_true(lambda: persisted_at(broker) > before, 10, "the broker's persistence")

        os.kill(broker.process.pid, signal.SIGSTOP)  # no PUBACK will come
        await acknowledge_at(database, alert_id, t0 + timedelta(seconds=90))
        ack_id = help_coming(alert_id)

        def outbox() -> tuple[Any, ...] | None:
            found = rows(database, "SELECT attempts, published_at, last_error FROM downlink_outbox"
                                   " WHERE command_id = %s", (ack_id,))  # fmt: skip
            return found[0] if found else None

        # A whole publishing pass went by without a PUBACK: the command is still pending.
        _attempts, published_at, error = await until_true(
            lambda: (o := outbox()) is not None and o[0] >= 1 and o, 30, "a pass without PUBACK"
        )
        assert published_at is None, "marked published without the broker's PUBACK"
        assert "no PUBACK" in error
        # The broker dies with the PUBLISH unread in its socket, and comes back.
        broker.kill()
        await asyncio.to_thread(broker.start)

        await until_true(
            lambda: [c.data for c in band.commands] == [b"\x02", b"\x01"], 40, "0x01"
        )
        await until_true(lambda: (o := outbox()) is not None and o[1] is not None, 20, "PUBACK")
        await until_true(lambda: len(device_audit(database, alert_id)) == 2, 20, "second result")

        # One more command on the same session and path: when the band has it, anything
        # sent twice before it (a re-send of what was acknowledged) has reached the edge.
        locate = uuid.uuid4()
        await asyncio.to_thread(
            rows, database,
            "INSERT INTO downlink_outbox (command_id, alert_id, site_id, device_id, action,"
            " created_at) VALUES (%s, %s, %s, 'wb-1', 'locate', now()) RETURNING command_id",
            (locate, alert_id, SITE),
        )  # fmt: skip
        await until_true(
            lambda: [c.data for c in band.commands] == [b"\x02", b"\x01", b"\x02"], 20, "0x02"
        )
        await until_true(lambda: len(device_audit(database, alert_id)) == 3, 20, "third result")
        commands = sim.health().get("commands") or {}
        assert commands.get("duplicate", 0) == 0, f"the edge saw a command twice: {commands}"
        assert [r[3] for r in device_audit(database, alert_id)] == [
            "locate", "acknowledge", "locate"]  # fmt: skip
    assert server.proc is not None and server.proc.poll() is None, server.log_tail()


async def test_servers_share_the_outbox_a_row_another_holds_is_skipped_never_sent_twice(
    database: str, broker: MosquittoInstance
) -> None:
    """Another server is mid-pass on one row (its lock held here): this server publishes
    the other row at once, not that one; once released, it goes out too, each once."""
    await asyncio.to_thread(import_district, database, District.model_validate(DISTRICT))
    await asyncio.to_thread(ingest, database, SITE, "wb-1", "sos")
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as work:
        await intake_batch(work, T0)
        # a wristband's SOS queues nothing at its opening: two commands by hand
        (alert_id,) = await (await work.execute("SELECT id FROM alerts")).fetchone()
        held, other = uuid.uuid4(), uuid.uuid4()
        for command_id in (held, other):
            await work.execute(
                "INSERT INTO downlink_outbox (command_id, alert_id, site_id, device_id, action,"
                " created_at) VALUES (%s, %s, %s, 'wb-1', 'locate', now())",
                (command_id, alert_id, SITE),
            )  # fmt: skip
        watcher = Collector(broker.port, "server-2", SERVER_PASSWORDS["server-2"],
                            f"eldersafe/v1/{SITE}/+/command")  # fmt: skip
        session = MqttConsumer(
            MqttEndpoint("127.0.0.1", broker.port, "server", SERVER_PASSWORDS["server"]),
            client_id="server", filters=[f"eldersafe/v1/{SITE}/+/status"],
            on_publish=lambda _epoch, _packet: None,
        )  # fmt: skip
        running = asyncio.create_task(session.run())
        try:
            await asyncio.wait_for(session.connected.wait(), 10)

            def seen() -> list[str]:
                return [json.loads(p)["command_id"] for _, p in list(watcher.messages)]

            async with await psycopg.AsyncConnection.connect(database) as other_server:
                await other_server.execute(
                    "SELECT 1 FROM downlink_outbox WHERE command_id = %s FOR UPDATE", (held,)
                )
                claimed = await asyncio.wait_for(publish_pending(work, session, 16, 5), 10)
                assert claimed == 1
                await until_true(lambda: seen() == [str(other)], 10, "the free row published")
                assert await (await work.execute(
                    "SELECT published_at FROM downlink_outbox WHERE command_id = %s", (held,)
                )).fetchone() == (None,)  # fmt: skip
                await other_server.rollback()  # the other server's pass ends without it
            assert await asyncio.wait_for(publish_pending(work, session, 16, 5), 10) == 1
            await until_true(lambda: sorted(seen()) == sorted([str(other), str(held)]), 10,
                             "the released row published")  # fmt: skip
            assert await asyncio.wait_for(publish_pending(work, session, 16, 5), 10) == 0
            assert sorted(seen()) == sorted([str(other), str(held)])  # each once
        finally:
            running.cancel()
            await session.close()
            watcher.close()
