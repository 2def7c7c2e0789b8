"""Metrics as an operator sees them: a real Prometheus scraping a real server and edge.

Also the district collector against the database on its own: a change committed
after a later one is counted once, never skipped (the interleaving is forced by
holding the earlier transaction open), and a database that is away never fails
a scrape.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from support import GATEWAY_PASSWORDS, publish_all, scalar, sos_events, until
from test_alert_engine import DISTRICT, T0, drain, ingest, rows

from alerting.lifecycle import acknowledge, on_scene
from alerting.model import Channel, staff_actor
from gateway.alerts.district import District, import_district
from gateway.alerts.unit_of_work import command
from gateway.local.ports import free_port, wait_listening
from gateway.metrics_district import DistrictCollector
from simulators.callbutton_receiver import CallButtonReceiverSimulator

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
BUTTON = 0x00A00001


class Prometheus:
    """Debian's ``prometheus`` as a plain process on a free port, in a temporary directory."""

    def __init__(self, directory: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        self.directory = directory
        config = {
            # the first sample still appears only ~6 s after start, whatever the interval
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in targets.items()
            ],
        }
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.directory / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_listening(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query: each series' labels (without __name__) → its value."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return {
            tuple(sorted((k, v) for k, v in s["metric"].items() if k != "__name__")): float(
                s["value"][1]
            )
            for s in body["data"]["result"]
        }

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` (None while Prometheus has no sample)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} has {len(result)} series: {result}"
        return next(iter(result.values()), None)


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "prometheus"


def edge_config(tmp_path: Path, broker_port: int, serial_port: str, metrics_port: int) -> Path:
    config = {
        "site": "site-a",
        "gateway": "gw-a",
        "state_dir": str(tmp_path / "edge-state"),
        "broker": {
            "port": broker_port,
            "username": "gw-site-a",
            "password_env": "EDGE_TEST_PASSWORD",
            "reconnect_max_s": 1,
        },
        "metrics": {"port": metrics_port},
        "drivers": [
            {
                "name": "cb",
                "kind": "callbutton",
                "port": serial_port,
                "devices": [
                    {"id": "receiver-1", "address": "receiver"},
                    {"id": "btn-1", "address": f"{BUTTON:08x}"},
                ],
            }
        ],
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def edge_health(tmp_path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((tmp_path / "edge-state" / "health.json").read_text()))
    except (OSError, ValueError):
        return {}


async def acknowledge_at(dsn: str, alert_id: Any, at: Any, *, scene: bool = False) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        make = on_scene if scene else acknowledge
        await command(conn, alert_id, lambda a: make(staff_actor("duty-1"), Channel.CONSOLE), at)


async def test_prometheus_finds_ingest_alert_and_acknowledge_series(
    database: str, broker: Any, make_server: Any, tmp_path: Path, prometheus_dir: Path
) -> None:
    """Three SOS alerts (one through a real edge, two published to the broker), two
    acknowledged 42 s and 130 s after they opened and one of those on scene at 300 s:
    Prometheus has exactly those figures, and the ingest and edge counters the
    database agrees with."""
    # This server runs on the system clock: duty-1 is on shift now (DISTRICT's shifts are
    # set around the engine tests' fixed T0, and nobody is on duty a day after it).
    now = datetime.now(UTC)
    on_shift = {"staff": "duty-1", "starts_at": (now - timedelta(hours=1)).isoformat(),
                "ends_at": (now + timedelta(hours=12)).isoformat()}  # fmt: skip
    import_district(database, District.model_validate({**DISTRICT, "shifts": [on_shift]}))
    rows(database, "INSERT INTO devices (site_id, id, profile, address) VALUES"
                   " ('site-a', 'btn-1', 'es-cb1', '00a00001') RETURNING id")  # fmt: skip
    server_metrics, edge_metrics = free_port(), free_port()
    server = make_server(
        database,
        broker.port,
        ELDERSAFE_METRICS_PORT=str(server_metrics),
        ELDERSAFE_METRICS_DISTRICT_CACHE_S="0.2",
    )
    server.start()
    await asyncio.to_thread(server.wait_session)
    prometheus = Prometheus(prometheus_dir, {"server": server_metrics, "edge": edge_metrics})
    edge: asyncio.subprocess.Process | None = None
    async with CallButtonReceiverSimulator(status_interval_s=0.5) as receiver:
        receiver.add_button(BUTTON)
        config = edge_config(tmp_path, broker.port, receiver.slave_path, edge_metrics)
        with (tmp_path / "edge.log").open("wb") as out:
            edge = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "gateway.cli", "edge", "--config", str(config)),
                cwd=REPO,
                env={**os.environ, "EDGE_TEST_PASSWORD": GATEWAY_PASSWORDS["gw-site-a"]},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            prometheus.start()

            def edge_ready() -> bool:
                h = edge_health(tmp_path)
                drivers = h.get("drivers") or {}
                return bool(
                    h.get("pid") == edge.pid
                    and h.get("connected")
                    and drivers.get("cb", {}).get("observations", 0) > 0
                )

            await until(edge_ready, 30, "the edge hearing its receiver")
            await receiver.press(BUTTON)
            _, messages = sos_events(2, site="site-b")
            rcs = await asyncio.to_thread(
                publish_all, broker.port, "gw-site-b-2", GATEWAY_PASSWORDS["gw-site-b-2"], messages
            )
            assert rcs == [0, 0]
            count = "SELECT count(*) FROM alerts WHERE type = 'sos'"
            await until(
                lambda: scalar(database, count) == 3, 30, f"three alerts; {server.log_tail()}"
            )
            def delivered() -> int:
                return int(
                    scalar(
                        database,
                        "SELECT count(*) FROM notifications WHERE delivered_at IS NOT NULL",
                    )
                )

            # The duty officer's console notices go out before anyone acknowledges: an
            # acknowledgement closes the alert's pending notices, and a delivery count
            # of 0 in Prometheus and in the database would prove nothing.
            await until(lambda: delivered() > 0, 20, "a notice delivered to the console")
            alerts = rows(
                database,
                "SELECT id, escalation_anchor FROM alerts ORDER BY site_id DESC, device_id",
            )
            (a_id, a_anchor), (b_id, b_anchor), _ = alerts  # site-a's (the edge's) first
            await acknowledge_at(database, a_id, a_anchor + timedelta(seconds=42))
            await acknowledge_at(database, b_id, b_anchor + timedelta(seconds=130))
            await acknowledge_at(database, b_id, b_anchor + timedelta(seconds=300), scene=True)

            def stored() -> tuple[int, int]:
                """Events the database holds; of them and command results, the edge's."""
                events = scalar(database, "SELECT count(*) FROM device_events")
                from_edge = scalar(
                    database,
                    "SELECT (SELECT count(*) FROM device_events WHERE site_id = 'site-a')"
                    " + (SELECT count(*) FROM command_results WHERE site_id = 'site-a')",
                )
                return events, from_edge

            ack = "eldersafe_alert_time_to_acknowledge_seconds"
            scene = "eldersafe_alert_time_to_on_scene_seconds"
            sos = '{type="sos",severity="critical"}'
            expected: dict[str, float] = {
                'up{job="server"}': 1,
                'up{job="edge"}': 1,
                'eldersafe_edge_outbox_pending{job="edge"}': 0,
                'eldersafe_alerts_opened_total{type="sos",severity="critical",unit="station-1"}': 3,
                'eldersafe_alert_escalations_total{level="0",kind="level"}': 3,
                f"{ack}_count{sos}": 2,
                f"{ack}_sum{sos}": 172,
                f'{ack}_bucket{{type="sos",le="30"}}': 0,
                f'{ack}_bucket{{type="sos",le="45"}}': 1,
                f'{ack}_bucket{{type="sos",le="120"}}': 1,
                f'{ack}_bucket{{type="sos",le="180"}}': 2,
                f'{ack}_bucket{{type="sos",le="+Inf"}}': 2,
                f"{scene}_count{sos}": 1,
                f"{scene}_sum{sos}": 300,
                f'{scene}_bucket{{type="sos",le="120"}}': 0,
                f'{scene}_bucket{{type="sos",le="300"}}': 1,
                'eldersafe_alerts_unresolved{status="open",unit="station-1"}': 1,
                'eldersafe_district_metrics_up{job="server"}': 1,
            }

            def differences() -> dict[str, tuple[float, float | None]]:
                events, from_edge = stored()
                expected["eldersafe_ingest_events_total{job='server'}"] = events
                # the edge's outbox carries its command results with its events
                expected["eldersafe_edge_pipeline_total{job='edge',counter='events_sent'}"] = (
                    from_edge
                )
                # each notice's first delivery, timed from its step (this one server)
                expected[
                    'sum(eldersafe_notify_time_to_deliver_seconds_count{job="server"}) or vector(0)'
                ] = delivered()
                found = {expr: prometheus.value(expr) for expr in expected}
                return {e: (want, found[e]) for e, want in expected.items() if found[e] != want}

            wrong: list[dict[str, tuple[float, float | None]]] = [{}]

            def all_found() -> bool:
                wrong[0] = differences()
                return not wrong[0]

            try:
                await until(all_found, 40, "the series in Prometheus", interval=0.5)
            except AssertionError:
                raise AssertionError(
                    f"want, found: {wrong[0]}\nserver log:\n{server.log_tail()}"
                ) from None
            # Per-process ingest series sit beside the district's: messages in, batch times.
            events, _ = stored()
            assert events == 3  # the edge's press and the two published
            messages_in = prometheus.value('eldersafe_ingest_messages_total{job="server"}')
            assert messages_in is not None and messages_in >= events
            assert prometheus.query('eldersafe_ingest_batch_seconds_count{job="server"}')
            # Devices by class: every status row the database holds, online or not.
            devices = prometheus.value('sum(eldersafe_devices{job="server"})')
            assert devices == scalar(database, "SELECT count(*) FROM device_status")
        finally:
            prometheus.stop()
            if edge.returncode is None:
                edge.terminate()
                await edge.wait()


async def test_district_collector_counts_a_change_committed_late_exactly_once(
    database: str,
) -> None:
    """An acknowledgement whose transaction commits after a later alert opened: a reader
    that followed insert positions would pass it and never count it. In commit order the
    later opening counts at once and the acknowledgement, numbered at its commit, after
    it, once — and a second server's collector has the same figures."""
    # This server runs on the system clock: duty-1 is on shift now (DISTRICT's shifts are
    # set around the engine tests' fixed T0, and nobody is on duty a day after it).
    now = datetime.now(UTC)
    on_shift = {"staff": "duty-1", "starts_at": (now - timedelta(hours=1)).isoformat(),
                "ends_at": (now + timedelta(hours=12)).isoformat()}  # fmt: skip
    import_district(database, District.model_validate({**DISTRICT, "shifts": [on_shift]}))
    ingest(database, "site-a", "wb-1", "sos")
    assert await drain(database, T0) == 1
    (alert_id,) = rows(database, "SELECT id FROM alerts")[0]
    collector = DistrictCollector(database, cache_s=0)

    def figures(c: DistrictCollector = collector) -> tuple[int, int]:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in c.collect()
            for s in family.samples
        }
        opened = sum(v for (n, _), v in samples.items() if n == "eldersafe_alerts_opened_total")
        acked = sum(
            v
            for (n, _), v in samples.items()
            if n == "eldersafe_alert_time_to_acknowledge_seconds_count"
        )
        return int(opened), int(acked)

    assert figures() == (1, 0)
    # the acknowledgement's transaction stays open
    async with await psycopg.AsyncConnection.connect(database) as held, held.transaction():
        await command(
            held, alert_id, lambda a: acknowledge(staff_actor("duty-1"), Channel.CONSOLE),
            T0 + timedelta(seconds=20),
        )  # fmt: skip
        ingest(database, "site-b", "btn-9", "sos")  # commits after it, later position
        assert await drain(database, T0 + timedelta(seconds=21)) == 1
        cur = await held.execute("SELECT position FROM alert_changes WHERE action = 'acknowledged'")
        (ack_position,) = await cur.fetchone() or (None,)
        opened_later = scalar(
            database,
            "SELECT max(position) FROM alert_changes WHERE action = 'opened'",
        )
        assert ack_position is not None and opened_later > ack_position
        assert figures() == (2, 0)  # the later opening, committed; not the open ack
    # committed now
    order = "SELECT commit_seq FROM alert_changes WHERE action = %s ORDER BY commit_seq DESC"
    assert scalar(database, order, ("acknowledged",)) > scalar(database, order, ("opened",))
    assert figures() == (2, 1)
    assert figures() == (2, 1)  # read once, never again
    second_server = DistrictCollector(database, cache_s=0)
    assert figures(second_server) == (2, 1)
    collector.close()
    second_server.close()


def test_district_collector_keeps_scraping_while_the_database_is_away() -> None:
    port = free_port()  # nothing listens there
    collector = DistrictCollector(f"postgresql://postgres@127.0.0.1:{port}/none", cache_s=0)
    samples = {s.name: s.value for family in collector.collect() for s in family.samples}
    assert samples["eldersafe_district_metrics_up"] == 0
    assert samples["eldersafe_district_metrics_errors_total"] == 1


async def test_district_collector_leaves_alert_series_out_until_it_has_read_the_log(
    database: str,
) -> None:
    """A restarted server reads the log from its start, page by page within a budget per
    scrape: a counter climbing through that would look like a burst of alerts, so the
    series are absent until the whole count is known."""
    # This server runs on the system clock: duty-1 is on shift now (DISTRICT's shifts are
    # set around the engine tests' fixed T0, and nobody is on duty a day after it).
    now = datetime.now(UTC)
    on_shift = {"staff": "duty-1", "starts_at": (now - timedelta(hours=1)).isoformat(),
                "ends_at": (now + timedelta(hours=12)).isoformat()}  # fmt: skip
    import_district(database, District.model_validate({**DISTRICT, "shifts": [on_shift]}))
    ingest(database, "site-a", "wb-1", "sos")
    ingest(database, "site-b", "btn-1", "sos")
    assert await drain(database, T0) == 2
    changes = scalar(database, "SELECT count(*) FROM alert_changes")
    assert changes >= 2
    collector = DistrictCollector(database, cache_s=0, page=1, budget_s=0)

    def scrape() -> dict[str, float]:
        return {
            s.name: s.value
            for family in collector.collect()
            for s in family.samples
            if s.name in ("eldersafe_alerts_opened_total", "eldersafe_district_metrics_catching_up")
        }

    seen = [scrape() for _ in range(changes + 1)]  # one change per scrape, then the end
    for partial in seen[:changes]:
        assert partial == {"eldersafe_district_metrics_catching_up": 1}
    assert seen[changes] == {
        "eldersafe_district_metrics_catching_up": 0,
        "eldersafe_alerts_opened_total": 2,
    }
    collector.close()


def test_change_facts_count_a_direct_on_scene_as_acknowledged_and_time_a_reopened_ladder() -> None:
    """Pure: what one change-log row contributes (no database needed)."""
    from gateway.metrics_district import AlertFact, facts_from_change

    opened = "2026-11-23T03:00:00+00:00"
    alert = {"type": "fall", "severity": "critical", "opened_at": opened,
             "escalation_anchor": opened, "acknowledged_at": "2026-11-23T03:02:00+00:00",
             "on_scene_at": "2026-11-23T03:02:00+00:00"}  # fmt: skip
    assert facts_from_change("on_scene", alert) == (
        AlertFact("acknowledged", "fall", "critical", seconds=120.0),
        AlertFact("on_scene", "fall", "critical", seconds=120.0),
    )
    reopened = {**alert, "escalation_anchor": "2026-11-23T05:00:00+00:00",
                "acknowledged_at": "2026-11-23T05:00:30+00:00"}  # fmt: skip
    assert facts_from_change("acknowledged", reopened) == (
        AlertFact("acknowledged", "fall", "critical", seconds=30.0),
    )
    assert facts_from_change("opened", alert) == (AlertFact("opened", "fall", "critical"),)
    assert facts_from_change("opened", alert, "station-1")[0].unit == "station-1"
    assert facts_from_change("repeated", alert) == ()
    # a row that is not what the engine writes gives nothing rather than a failed scrape
    assert facts_from_change("acknowledged", {"type": "fall"}) == ()
    assert facts_from_change("acknowledged", {**alert, "acknowledged_at": "yesterday"}) == ()
    assert facts_from_change("acknowledged", {**alert, "acknowledged_at": 7}) == ()
