"""The live feed under load: 200 consoles on WebSockets while alerts are raised at 50/s.

A real ``eldersafe server`` (ingest, engine, notifiers, the staff API) on a private
broker and TimescaleDB cluster. SOS events are written as ingest commits them
(``event_ledger`` + ``device_events``, whose trigger fills the engine inbox) at a paced
50/s; the server's engine makes each an alert, logging "opened" and its first rung
("escalated") in ``alert_changes``; every console sees every alert (150 station duty
consoles, 40 of the street, 10 of the bureau: three masking tiers).

* **commit → console**: from the commit of the change row
  (``pg_xact_commit_timestamp(xmin)``, ``track_commit_timestamp = on`` in the private
  cluster; nothing added to the server's path) to its arrival at each of the 200
  consoles (``time.time()`` on the same host). The consoles run in two processes of
  their own as lean clients (``lean_clients``): a console's read of its socket is stamped
  when it happens and parsed after the run, so the hundredth console of a fan-out is
  not stamped after the other ninety-nine were parsed.
* **acknowledge round trip**: one of the consoles (duty-1, on shift) taps acknowledge on
  an alert it was shown, 5 times a second: from writing ``POST .../acknowledge`` (on a
  kept-alive HTTP/1.1 connection) to the "acknowledged" change arriving on its own
  WebSocket; the HTTP answer alone too. It taps the newest alert shown, or with
  ``--ack-after S`` the newest shown at least S seconds ago, as a person would.
* **baselines, same run**: a bare LISTEN client in a process of its own receiving the
  same change rows as NOTIFY payloads from a row trigger added for the bench (the floor
  of any push built on PostgreSQL notifications), and ``GET /healthz`` round trips on
  the same server at the acknowledge cadence (the floor of any HTTP action on it).
* **checks**: every console received every change up to the last one, once; one alert
  per event; every acknowledge answered 200.
* ``--commit-cost``: instead, what commit order costs the writers of the change log
  (migration 0007): 4 connections each committing transactions of 2 change rows as fast
  as they can, with the numbering trigger and with it disabled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from common import services  # noqa: E402
from escalation import ServerProcess, enable_commit_timestamps, quantiles  # noqa: E402

from gateway.alerts.district import District, import_district  # noqa: E402
from gateway.api.security import issue_token  # noqa: E402
from gateway.db.migrate import migrate  # noqa: E402
from gateway.local.ports import free_port  # noqa: E402

SECRET = "bench-api-token-secret-0123456789abcdef"
SITES = 10
INGEST_EVENT = """
WITH fresh AS (
    INSERT INTO event_ledger (event_id, time) VALUES (%s, %s)
    ON CONFLICT (event_id) DO NOTHING RETURNING event_id
)
INSERT INTO device_events (event_id, time, site_id, device_id, type, phase, profile, data)
SELECT event_id, %s, %s, %s, 'sos', 'pulse', 'es-wb1', '{}'::jsonb FROM fresh
"""
# The baseline's payloads: the change rows themselves (bench-only trigger; NOTIFY payloads
# stop at 8000 bytes, far above an alert's size). They carry the insert position: the
# commit_seq is given only at commit, so the results map one to the other afterwards.
BASELINE_TRIGGER = """
CREATE FUNCTION bench_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_changes', json_build_object('position', NEW.position,
        'alert_id', NEW.alert_id, 'seq', NEW.seq, 'action', NEW.action,
        'alert', NEW.alert)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_notify_change AFTER INSERT ON alert_changes
    FOR EACH ROW EXECUTE FUNCTION bench_notify_change();
"""


def consoles() -> list[str]:
    """The 200 console identities: station duty, street and bureau staff."""
    return ([f"duty-{i}" for i in range(1, 151)] + [f"street-{i}" for i in range(1, 41)]
            + [f"bureau-{i}" for i in range(1, 11)])  # fmt: skip


def district(devices: int) -> District:
    now = datetime.now(UTC)
    staff = [
        {"id": who, "name": who, "role": who.split("-")[0],
         "organisation": {"duty": "station-1", "street": "street-1", "bureau": "bureau"}[
             who.split("-")[0]]}
        for who in consoles()
    ] + [{"id": "sup-1", "organisation": "station-1", "name": "sup", "role": "supervisor"}]
    return District.model_validate({
        "organisations": [
            {"id": "bureau", "kind": "bureau", "name": "区民政局"},
            {"id": "street-1", "parent": "bureau", "kind": "street", "name": "街道中心"},
            {"id": "station-1", "parent": "street-1", "kind": "station", "name": "社区站"},
        ],
        "sites": [{"id": f"site-{s}", "organisation": "station-1", "name": f"家 {s}",
                   "address": f"幸福路 {s} 号"} for s in range(SITES)],
        "residents": [{"id": f"r-{s}", "site": f"site-{s}", "name": f"王{s}",
                       "birth_year": 1940} for s in range(SITES)],
        "devices": [{"site": f"site-{d % SITES}", "id": f"wb-{d}", "profile": "es-wb1",
                     "address": f"c0:{d >> 8 & 0xff:02x}:{d & 0xff:02x}",
                     "resident": f"r-{d % SITES}"} for d in range(devices)],
        "staff": staff,
        "shifts": [{"staff": s, "starts_at": (now - timedelta(hours=1)).isoformat(),
                    "ends_at": (now + timedelta(hours=2)).isoformat()}
                   for s in ("duty-1", "duty-2")],
    })  # fmt: skip


def token(staff: str) -> str:
    return issue_token(SECRET, staff, 0, timedelta(hours=2))[0]


# -- worker processes ---------------------------------------------------------------------


async def console_worker(host: str, who: list[str], out: Path) -> None:
    """Consoles of ``who`` (``lean_clients.LeanFeed``: stamped on arrival, parsed after the
    run); prints "ready" when all are, reads "final P" from stdin, writes each console's
    (position, arrival) once it has seen P."""
    from lean_clients import lean_feed

    feeds = await asyncio.gather(*(lean_feed(host, token(staff)) for staff in who))
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    final = int(line.split()[1])
    arrivals: dict[str, list[tuple[int, float]]] = {f"{s}#{i}": [] for i, s in enumerate(who)}
    waiting = dict(zip(arrivals, feeds, strict=True))
    deadline = time.monotonic() + 60
    while waiting and time.monotonic() < deadline:
        for name, feed in list(waiting.items()):
            for at, change in feed.changes():
                arrivals[name].append((change["position"], at))
                if change["position"] == final:
                    del waiting[name]
        await asyncio.sleep(0.05)
    for feed in feeds:
        feed.close()
    await asyncio.to_thread(out.write_text, json.dumps(arrivals))
    print("done", flush=True)


async def listen_worker(dsn: str, out: Path) -> None:
    """The baseline: one bare LISTEN connection; arrival of each change's payload."""
    arrivals: list[tuple[int, float]] = []
    seen: set[int] = set()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("LISTEN bench_changes")
        print("ready", flush=True)
        told = asyncio.create_task(asyncio.to_thread(sys.stdin.readline))
        while not (told.done() and int(told.result().split()[2]) in seen):
            async for n in conn.notifies(timeout=0.5):
                now = time.time()
                position = json.loads(n.payload)["position"]
                arrivals.append((position, now))
                seen.add(position)
    await asyncio.to_thread(out.write_text, json.dumps(arrivals))
    print("done", flush=True)


async def feed_worker(dsn: str, out: Path) -> None:
    """The second baseline: the change log read gap-free as the server's reader does
    (LISTEN, then ``feed.changes_after`` from its own position) with no fan-out at all,
    in a process of its own: the floor of any feed that promises nothing lost."""
    from gateway.alerts.feed import changes_after

    arrivals: list[tuple[int, float]] = []
    seen: set[int] = set()
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listen,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        await listen.execute("LISTEN alert_changes")
        position: int | None = None
        print("ready", flush=True)
        told = asyncio.create_task(asyncio.to_thread(sys.stdin.readline))
        while not (told.done() and int(told.result().split()[1]) in seen):
            while changes := await changes_after(conn, position):
                now = time.time()
                arrivals += [(c.position, now) for c in changes]
                seen.update(c.position for c in changes)
                position = changes[-1].position
            async for _ in listen.notifies(timeout=0.5, stop_after=1):
                pass
    await asyncio.to_thread(out.write_text, json.dumps(arrivals))
    print("done", flush=True)


# -- the run ------------------------------------------------------------------------------


class Worker:
    def __init__(self, args: list[str], log: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log.open("ab"), text=True,
        )  # fmt: skip

    def expect(self, word: str) -> None:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != word:
            raise RuntimeError(f"worker said {line!r}, expected {word!r}")

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


async def drive(dsn: str, host: str, rate: float, seconds: float, ack_every_s: float,
                ack_after_s: float,
                tell_final: Callable[[int, int], None]) -> dict[str, Any]:  # fmt: skip
    """Raise the events at ``rate``; meanwhile duty-1's console acknowledges alerts. Once
    the engine took every event in, the last change is told to the other processes and
    this console reads on until it has it too. Times are ``time.time()``: a frame's is
    its arrival (``lean_clients``), a tap's when its request is written."""
    from lean_clients import LeanHttp, lean_feed

    shown: deque[tuple[str, float]] = deque()  # (alert, when it arrived), oldest first
    tapped_at: dict[str, float] = {}
    ack_rtt: list[float] = []
    http_rtt: list[float] = []
    health_rtt: list[float] = []
    statuses: list[int] = []
    my_arrivals: list[tuple[int, float]] = []
    done = asyncio.Event()

    async def raise_events() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            start = time.monotonic()
            for i in range(int(rate * seconds)):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                at = datetime.now(UTC)
                await conn.execute(INGEST_EVENT, (uuid.uuid4(), at, at, f"site-{i % SITES}",
                                                  f"wb-{i}"))  # fmt: skip
        done.set()

    feed = await lean_feed(host, token("duty-1"))
    api = LeanHttp(host, {"Authorization": f"Bearer {token('duty-1')}"})

    def read() -> None:
        for at, change in feed.changes():
            my_arrivals.append((change["position"], at))
            if change["action"] == "opened":
                shown.append((change["alert_id"], at))
            elif change["action"] == "acknowledged" and change["alert_id"] in tapped_at:
                ack_rtt.append((at - tapped_at.pop(change["alert_id"])) * 1e3)

    async def acknowledge() -> None:
        while not done.is_set():
            await asyncio.sleep(ack_every_s)
            read()  # between taps: what arrived meanwhile is stamped already
            # the newest alert on the screen for ack_after_s at least: what a person taps
            alert_id, seen_by = None, time.time() - ack_after_s
            while shown and shown[0][1] <= seen_by:
                alert_id = shown.popleft()[0]
            if alert_id is None:
                continue
            started = time.time()
            tapped_at[alert_id] = started
            status, _ = await api.request("POST", f"/api/alerts/{alert_id}/acknowledge",
                                          {"Idempotency-Key": str(uuid.uuid4())})  # fmt: skip
            http_rtt.append((time.time() - started) * 1e3)
            statuses.append(status)
            started = time.time()
            await api.request("GET", "/healthz")
            health_rtt.append((time.time() - started) * 1e3)

    try:
        await asyncio.gather(raise_events(), acknowledge())
        final = await asyncio.to_thread(settle, dsn, int(rate * seconds))
        await asyncio.to_thread(tell_final, *final)
        deadline = time.monotonic() + 60
        while final[0] not in {p for p, _ in my_arrivals} and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            read()
    finally:
        feed.close()
        await api.close()
    return {"ack_rtt": ack_rtt, "http_rtt": http_rtt, "health_rtt": health_rtt,
            "statuses": statuses, "arrivals": my_arrivals, "lost_acks": len(tapped_at),
            "final": final[0]}  # fmt: skip


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process used so far: the server's work
    for the same load, which a busy machine delays but does not make larger."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_up(port: int, within_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + within_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError("the staff API did not come up")
        time.sleep(0.1)


def settle(dsn: str, events: int, within_s: float = 120) -> tuple[int, int]:
    """Wait until the engine took every event in; the last change in feed order (its
    commit_seq and its insert position)."""
    deadline = time.monotonic() + within_s
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            inbox = conn.execute("SELECT count(*) FROM engine_inbox").fetchone()
            alerts = conn.execute("SELECT count(*) FROM alerts").fetchone()
            if (inbox and inbox[0] == 0 and alerts and alerts[0] >= events) or (
                time.monotonic() > deadline
            ):
                break
            time.sleep(0.2)
        last = conn.execute(
            "SELECT commit_seq, position FROM alert_changes ORDER BY commit_seq DESC LIMIT 1"
        ).fetchone()
        assert last is not None
        return int(last[0]), int(last[1])


def commits(dsn: str, final: int) -> tuple[dict[int, float], dict[int, int]]:
    """Commit time (epoch s) of every change up to ``final`` in feed order, by position
    (commit_seq); and the insert position to commit_seq."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT commit_seq, position, extract(epoch FROM pg_xact_commit_timestamp(xmin))"
            " FROM alert_changes WHERE commit_seq <= %s",
            (final,),
        ).fetchall()
    return {int(c): float(t) for c, _, t in rows}, {int(p): int(c) for c, p, _ in rows}


COMMIT_COST_WRITE = """
INSERT INTO alert_changes (alert_id, seq, time, action, alert)
SELECT gen_random_uuid(), s, now(), 'opened', '{"bench": true}' FROM generate_series(1, 2) s
"""


async def commit_cost(dsn: str, writers: int = 4, per_writer: int = 500) -> dict[str, float]:
    """Commits/s and commit latency of ``writers`` connections writing change rows."""
    latencies: list[float] = []

    async def writer() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            for _ in range(per_writer):
                await conn.execute(COMMIT_COST_WRITE)
                started = time.perf_counter()
                await conn.commit()
                latencies.append((time.perf_counter() - started) * 1e3)

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - started
    return {"commits_per_s": writers * per_writer / elapsed, **quantiles(latencies)}


def run_commit_cost() -> int:
    with services() as (_, pg):
        assert pg is not None
        migrate(pg.dsn)
        print(f"{'change-writing commits, 4 writers':<44}{'per s':>9}{'p50':>9}{'p99':>9}"
              f"{'max':>9}")  # fmt: skip
        for label, trigger in (("numbered at commit (0007)", "ENABLE"),
                               ("trigger disabled", "DISABLE"),
                               ("numbered at commit (0007), again", "ENABLE")):  # fmt: skip
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                conn.execute(f"ALTER TABLE alert_changes {trigger} TRIGGER"
                             " alert_changes_commit_order")  # fmt: skip
            d = asyncio.run(commit_cost(pg.dsn))
            print(f"{label:<44}{d['commits_per_s']:>9.0f}{d['p50']:>9.2f}{d['p99']:>9.2f}"
                  f"{d['max']:>9.2f}")  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consoles", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="alerts raised per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--ack-every", type=float, default=0.2, help="seconds between taps")
    parser.add_argument("--ack-after", type=float, default=0.0,
                        help="tap the newest alert shown at least this long ago (s)")
    parser.add_argument("--processes", type=int, default=2, help="console processes")
    parser.add_argument("--commit-cost", action="store_true",
                        help="measure what numbering at commit costs the log's writers")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.commit_cost:
        return run_commit_cost()
    if args.worker:
        kind, *rest = args.worker
        if kind == "consoles":
            host, out, *who = rest
            asyncio.run(console_worker(host, who, Path(out)))
        else:
            dsn, out = rest
            asyncio.run((listen_worker if kind == "listen" else feed_worker)(dsn, Path(out)))
        return 0

    events = int(args.rate * args.seconds)
    with services() as (broker, pg), tempfile.TemporaryDirectory() as tmp:
        assert pg is not None
        logs = Path(tmp)
        enable_commit_timestamps(pg)
        migrate(pg.dsn)
        import_district(pg.dsn, district(events))
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(BASELINE_TRIGGER)
        port = free_port()
        host = f"127.0.0.1:{port}"
        server = ServerProcess(broker.port, pg.dsn, logs / "server.log",
                               ELDERSAFE_API_PORT=str(port),
                               ELDERSAFE_API_TOKEN_SECRET=SECRET)  # fmt: skip
        workers: list[Worker] = []
        try:
            api_up(port)
            listener = Worker(["--worker", "listen", pg.dsn, str(logs / "listen.json")],
                              logs / "listen.log")  # fmt: skip
            ordered_reader = Worker(["--worker", "feed", pg.dsn, str(logs / "feed.json")],
                            logs / "feed.log")  # fmt: skip
            listener.expect("ready")
            ordered_reader.expect("ready")
            who = (consoles() * (args.consoles // 200 + 1))[1 : args.consoles]  # duty-1: drive
            share = -(-len(who) // args.processes)
            for p in range(args.processes):
                part = who[p * share : (p + 1) * share]
                workers.append(Worker(["--worker", "consoles", host,
                                       str(logs / f"consoles-{p}.json"), *part],
                                      logs / f"consoles-{p}.log"))  # fmt: skip
            for w in workers:
                w.expect("ready")
            print(f"{args.consoles} consoles connected; raising {events} alerts at "
                  f"{args.rate:.0f}/s", flush=True)  # fmt: skip
            others = [listener, ordered_reader, *workers]

            def tell_final(position: int, inserted_at: int) -> None:
                for w in others:
                    w.tell(f"final {position} {inserted_at}")
                for w in others:
                    w.expect("done")

            load_before = os.getloadavg()
            cpu_before, wall_before = cpu_s(server.proc.pid), time.monotonic()
            drove = asyncio.run(drive(pg.dsn, host, args.rate, args.seconds, args.ack_every,
                                      args.ack_after, tell_final))  # fmt: skip
            server_cpu = cpu_s(server.proc.pid) - cpu_before
            wall = time.monotonic() - wall_before
            final = drove["final"]
            with psycopg.connect(pg.dsn) as conn:
                alerts = conn.execute("SELECT count(*) FROM alerts").fetchone()
                dead = conn.execute("SELECT count(*) FROM engine_dead_letters").fetchone()
            committed, by_insert = commits(pg.dsn, final)
        finally:
            for w in workers:
                w.proc.kill()
            server.stop()
        per_console: dict[str, list[tuple[int, float]]] = {"duty-1#drive": drove["arrivals"]}
        for p in range(len(workers)):
            per_console.update(json.loads((logs / f"consoles-{p}.json").read_text()))
        baseline = json.loads((logs / "listen.json").read_text())
        gap_free = json.loads((logs / "feed.json").read_text())

    lat: list[float] = []
    missing = doubled = 0
    for arrivals in per_console.values():
        got = [p for p, _ in arrivals if p in committed]
        doubled += len(got) - len(set(got))
        missing += len(committed.keys() - set(got))
        lat += [(t - committed[p]) * 1e3 for p, t in arrivals if p in committed]
    base = [(t - committed[by_insert[p]]) * 1e3 for p, t in baseline
            if by_insert.get(p) in committed]  # fmt: skip
    ordered = [(t - committed[p]) * 1e3 for p, t in gap_free if p in committed]
    print(f"alerts {alerts[0] if alerts else 0} of {events}; changes {len(committed)}; "
          f"consoles {len(per_console)}; engine dead letters {dead[0] if dead else '?'}"
          )  # fmt: skip
    print(f"{'latency, ms':<44}{'n':>7}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for name, values in (
        ("baseline: commit -> bare LISTEN client", base),
        ("baseline: commit -> gap-free feed reader", ordered),
        ("commit -> each of the consoles", lat),
        ("baseline: GET /healthz round trip", drove["health_rtt"]),
        ("acknowledge: POST answered", drove["http_rtt"]),
        ("acknowledge: tap -> change on the console", drove["ack_rtt"]),
    ):
        d = quantiles(values) if values else {"n": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
        print(f"{name:<44}{int(d['n']):>7}{d['p50']:>9.1f}{d['p90']:>9.1f}{d['p99']:>9.1f}"
              f"{d['max']:>9.1f}")  # fmt: skip
    firsts = ", ".join(f"{v:.0f}" for v in drove["ack_rtt"][:3])
    print(f"acknowledge: the first three taps, tap -> change on the console: {firsts} ms")
    p99, ack99 = quantiles(lat)["p99"], quantiles(drove["ack_rtt"])["p99"]
    print(f"commit -> console p99 {p99:.1f} ms (target 100 ms: "
          f"{'met' if p99 <= 100 else 'MISSED'}); acknowledge round trip p99 {ack99:.1f} ms "
          f"(target 50 ms: {'met' if ack99 <= 50 else 'MISSED'})")  # fmt: skip
    ok = (missing == 0 and doubled == 0 and alerts and alerts[0] == events
          and set(drove["statuses"]) <= {200} and drove["lost_acks"] == 0)  # fmt: skip
    print(f"checks {'ok' if ok else 'FAILED'}: missing {missing}, doubled {doubled}, "
          f"acks {len(drove['statuses'])} answered {sorted(set(drove['statuses']))}, "
          f"unseen acks {drove['lost_acks']}")  # fmt: skip
    print(f"server process CPU {server_cpu:.1f} s in {wall:.1f} s ({server_cpu / wall:.0%} of a "
          f"core); load average {load_before[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at "
          f"the end")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
