"""The notifier runner over real PostgreSQL with real HTTP receivers on loopback.

The engine (gateway.alerts.unit_of_work) writes the notices; ``deliver_due`` delivers
them. Time is a ManualClock handed to both, so minutes of outage and fallback windows
run in seconds. Receivers are small asyncio HTTP/1.1 servers in the test's own loop:
the bureau's safety network (checks the HMAC, keeps the first of each idempotency key,
checks the order per alert), Apprise's generic JSON target, the voice provider.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import httpx
import psycopg
import pytest

from alerting.ports import ManualClock
from gateway.alerts.audit_verify import verify
from gateway.alerts.district import District, import_district
from gateway.alerts.unit_of_work import intake_batch, timers_tick
from gateway.notify.outbox import confirm_by_code
from gateway.notify.runner import Notifiers, deliver_due

T0 = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)  # 11:00 in Shanghai
SECRET = b"bureau-test-key"

# As ingest writes an event: the trigger on device_events fills the engine inbox.
INGEST_EVENT = """
INSERT INTO device_events (event_id, time, site_id, device_id, type, phase, profile, data)
VALUES (%s, %s, %s, %s, %s, %s, 'es-wb1', '{}')
"""


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: datetime

    def json(self) -> Any:
        return json.loads(self.body)


Answer = Callable[[Request], Awaitable[int | None]]  # a status, or None: hang up unanswered


@dataclass
class Receiver:
    """One HTTP/1.1 endpoint on loopback; every connection answers one request and closes."""

    answer: Answer
    clock: ManualClock
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Down: new connections are refused."""
        assert self.server is not None
        self.server.close()
        self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            headers = {}
            for line in head[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Request(path, headers, body, self.clock.now())
            self.requests.append(request)
            status = await self.answer(request)
            if status is not None:
                writer.write(
                    f"HTTP/1.1 {status} -\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                    .encode()
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def district(
    bureau_url: str,
    sites: int = 1,
    apprise: str | None = None,
    family_apprise: str | None = None,
    policies: list[dict[str, Any]] | None = None,
) -> District:
    staff: list[dict[str, Any]] = [
        {"id": "duty-1", "organisation": "station-1", "name": "李", "role": "duty",
         "phone": "+8613900000001", "apprise_url": apprise},
    ]  # fmt: skip
    return District.model_validate({
        "organisations": [
            {"id": "bureau", "kind": "bureau", "name": "区民政局", "webhook_url": bureau_url},
            {"id": "street-1", "parent": "bureau", "kind": "street", "name": "街道中心"},
            {"id": "station-1", "parent": "street-1", "kind": "station", "name": "社区站"},
        ],
        "sites": [
            {"id": f"site-{i}", "organisation": "station-1", "name": f"家 {i}",
             "address": f"幸福路{i}号3栋201"}
            for i in range(sites)
        ],
        "residents": [
            {"id": "r-0", "site": "site-0", "name": "王奶奶",
             "family": [{"name": "王小明", "phone": "+8613800000001",
                         "apprise_url": family_apprise}]},
        ],
        "staff": staff,
        "shifts": [{"staff": "duty-1", "starts_at": (T0 - timedelta(hours=1)).isoformat(),
                    "ends_at": (T0 + timedelta(hours=12)).isoformat()}],
        "policies": policies or [],
    })  # fmt: skip


async def raise_alert(dsn: str, site: str, kind: str, at: datetime) -> None:
    phase = "raise" if kind == "smoke" else "pulse"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(INGEST_EVENT, (uuid.uuid4(), at, site, f"dev-{site}", kind, phase))
        while (await intake_batch(conn, at)).events:
            pass


def rows(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
async def http_client() -> Any:
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as client:
        yield client


def notifiers(http: httpx.AsyncClient, voice_url: str | None = None) -> Notifiers:
    return Notifiers(http, SECRET, voice_url, None, send_timeout_s=2.0)


# --- the acceptance point: 5 × HTTP 500, then 2 minutes refused ------------------------

# The bureau hears of a fire at once and again every 20 s while nobody acknowledges:
# messages pile up behind the first one during the outage.
BUREAU_EVERY_20_S = {
    "unit": "bureau", "alert_type": "smoke", "severity": "critical",
    "policy": {"name": "bureau-every-20s", "repeat_top_every_s": 20, "levels": [
        {"after_s": 0, "roles": ["bureau"], "channels": ["webhook"]},
        {"after_s": 20, "roles": ["bureau"], "channels": ["webhook"]},
    ]},
}  # fmt: skip


@dataclass
class SafetyNetwork:
    """The bureau's receiver: checks signature and order, keeps the first of each key."""

    clock: ManualClock
    failures_left: int = 5
    down_for: timedelta = timedelta(minutes=2)
    down_at: datetime | None = None
    lose_one_answer: bool = True
    processed: list[dict[str, Any]] = field(default_factory=list)  # first of each key
    keys: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    statuses: list[int | None] = field(default_factory=list)
    receiver: Receiver | None = None

    async def answer(self, r: Request) -> int | None:
        status = self._decide(r)
        self.statuses.append(status)
        return status

    def _decide(self, r: Request) -> int | None:
        ts, sig = r.headers.get("x-eldersafe-timestamp", ""), r.headers.get(
            "x-eldersafe-signature", ""
        )
        # The bureau's check, written from the documented scheme (not the sender's code).
        mac = hmac.new(SECRET, ts.encode() + b"." + r.body, hashlib.sha256).hexdigest()
        if not ts.isdigit() or not hmac.compare_digest(sig, "sha256=" + mac):
            self.problems.append(f"bad signature on {r.body[:80]!r}")
            return 401
        doc = r.json()
        key = unquote(r.headers.get("idempotency-key", ""))
        if not key or key != doc.get("idempotency_key"):
            self.problems.append(f"idempotency key missing or not the body's: {key!r}")
            return 400
        if self.failures_left > 0:
            self.failures_left -= 1
            if self.failures_left == 0:
                self.down_at = self.clock.now()
                asyncio.get_running_loop().call_soon(self._go_down)
            return 500
        if self.down_at is not None and self.clock.now() < self.down_at + self.down_for:
            return None  # a request that slipped in as the listener closed: reset
        if key in self.keys:
            return 200  # a retry of a message kept before: acknowledged, not kept again
        done = {(m["alert_id"], m["sequence"]) for m in self.processed}
        seq = doc["sequence"]
        if seq > 1 and (doc["alert_id"], seq - 1) not in done:
            self.problems.append(f"alert {doc['alert_id']}: message {seq} before {seq - 1}")
        self.keys.add(key)
        self.processed.append(doc)
        if self.lose_one_answer:  # kept, but the answer is lost: the sender must retry
            self.lose_one_answer = False
            return None
        return 200

    def _go_down(self) -> None:
        assert self.receiver is not None
        asyncio.get_running_loop().create_task(self.receiver.stop())

    async def tick(self) -> None:
        """Back up once the outage is over (by the test's clock)."""
        assert self.receiver is not None
        back = self.down_at is not None and self.clock.now() >= self.down_at + self.down_for
        if back and self.receiver.server is None:
            await self.receiver.start()


async def test_bureau_webhook_survives_500s_and_two_minutes_down_exactly_once_in_order(
    database: str, http_client: httpx.AsyncClient
) -> None:
    dsn = database
    clock = ManualClock(T0)
    network = SafetyNetwork(clock)
    receiver = Receiver(network.answer, clock)
    network.receiver = receiver
    await receiver.start()
    import_district(dsn, district(receiver.url + "/bureau", sites=3, policies=[BUREAU_EVERY_20_S]))
    for site in ("site-0", "site-1", "site-2"):
        await raise_alert(dsn, site, "smoke", T0)
    ch = notifiers(http_client)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for second in range(0, 400):
            clock.set(T0 + timedelta(seconds=second))
            await network.tick()
            if second <= 150:  # the engine keeps adding messages until 150 s
                await timers_tick(conn, clock.now())
            while (await deliver_due(conn, clock.now(), ch)).claimed:
                pass
            pending = rows(dsn, "SELECT count(*) FROM notifications WHERE status = 'pending'"
                           " AND channel = 'webhook'")[0][0]  # fmt: skip
            if second > 150 and pending == 0:
                break
    assert network.problems == []
    assert network.down_at is not None and network.down_at <= T0 + timedelta(seconds=2)
    assert network.statuses[:5] == [500] * 5
    # During the outage every attempt was refused (recorded as a recoverable failure).
    refused = rows(dsn, "SELECT count(*) FROM alert_audit WHERE action = 'delivery_failed'"
                   " AND detail->>'error' LIKE 'ConnectError%%'")[0][0]  # fmt: skip
    assert refused >= 10, refused
    sent = rows(dsn, "SELECT key, alert_id::text, lane_seq, status FROM notifications"
                " WHERE channel = 'webhook' ORDER BY alert_id, lane_seq")  # fmt: skip
    assert len(sent) >= 3 * 7, "messages piled up behind the first during the outage"
    assert {s for *_, s in sent} == {"sent"}
    # Exactly once by idempotency key, each of the alert's messages once, in order.
    assert sorted(m["idempotency_key"] for m in network.processed) == sorted(k for k, *_ in sent)
    steps = [(m["alert_id"], m["step_id"]) for m in network.processed]
    assert len(steps) == len(set(steps)), "one message kept twice under two keys"
    for alert in {a for _, a, *_ in sent}:
        got = [m["sequence"] for m in network.processed if m["alert_id"] == alert]
        assert got == list(range(1, len(got) + 1)), f"alert {alert} out of order: {got}"
    # The lost answer made the sender retry with the same key: asked twice, kept once.
    asked = [r.headers["idempotency-key"] for r in receiver.requests if r.headers]
    assert any(asked.count(k) > 1 for k in network.keys)
    # Every attempt is in the audit chains, which verify.
    attempts = rows(dsn, "SELECT sum(attempts) FROM notifications WHERE channel = 'webhook'")
    audited = rows(dsn, "SELECT count(*) FROM alert_audit WHERE channel = 'webhook'"
                   " AND action IN ('notified', 'delivery_failed')")  # fmt: skip
    assert attempts == audited
    assert verify(dsn)[1] == ()
    if receiver.server is not None:
        await receiver.stop()


# --- fallback: console → messaging → voice, each switch within 30 s ---------------------


async def test_fallback_console_messaging_voice_within_30_s_and_the_code_confirms(
    database: str, http_client: httpx.AsyncClient
) -> None:
    dsn = database
    clock = ManualClock(T0)

    async def answer(r: Request) -> int | None:
        return 500 if r.path.startswith("/msg/family") else 200

    svc = Receiver(answer, clock)
    await svc.start()
    base = f"json://127.0.0.1:{svc.port}"
    import_district(dsn, district("http://127.0.0.1:9/bureau", apprise=f"{base}/msg/duty-1",
                                  family_apprise=f"{base}/msg/family"))  # fmt: skip
    await raise_alert(dsn, "site-0", "sos", T0)
    ch = notifiers(http_client, voice_url=svc.url + "/voice")
    wrong_code_refused = None
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for second in range(0, 131):
            clock.set(T0 + timedelta(seconds=second))
            await timers_tick(conn, clock.now())
            while (await deliver_due(conn, clock.now(), ch)).claimed:
                pass
            calls = [r.json() for r in svc.requests if r.path == "/voice"]
            duty = [c for c in calls if c["to"] == "+8613900000001"]
            if duty and wrong_code_refused is None:  # the callee keys in a code
                key, code = duty[0]["notification"], duty[0]["ack_code"]
                wrong = "000000" if code != "000000" else "111111"
                wrong_code_refused = not await confirm_by_code(conn, key, wrong, clock.now())
                assert await confirm_by_code(conn, key, code, clock.now())

    def attempts(person: str) -> list[tuple[str, str, float]]:
        return [
            (channel, action, (at - T0).total_seconds())
            for channel, action, at in rows(
                dsn, "SELECT channel, action, time FROM alert_audit WHERE detail->>'person' = %s"
                " AND action IN ('notified', 'delivery_failed') ORDER BY seq", (person,))
        ]  # fmt: skip

    duty_attempts = attempts("staff:duty-1")
    assert [c for c, a, _ in duty_attempts if a == "notified"] == ["console", "messaging", "voice"]
    times = {c: t for c, a, t in duty_attempts if a == "notified"}
    assert times["console"] == 0
    assert 0 < times["messaging"] - times["console"] <= 30
    assert 0 < times["voice"] - times["messaging"] <= 30
    # Apprise's JSON target got the message: the place and the resident, in Chinese.
    msg = [r for r in svc.requests if r.path == "/msg/duty-1"]
    assert len(msg) == 1 and msg[0].headers.get("idempotency-key")
    assert "幸福路0号3栋201" in msg[0].json()["message"]
    assert "王奶奶" in msg[0].json()["message"] and "请立即处理" in msg[0].json()["message"]
    # The provider got the spoken Chinese text and the code the callee keys in.
    calls = [r.json() for r in svc.requests if r.path == "/voice"]
    duty_call = next(c for c in calls if c["to"] == "+8613900000001")
    assert duty_call["kind"] == "voice" and duty_call["language"] == "zh-CN"
    assert "请立即处理" in duty_call["text"] and "王奶奶" in duty_call["text"]
    assert " ".join(duty_call["ack_code"]) in duty_call["text"]
    stored = rows(dsn, "SELECT ack_code, status FROM notifications WHERE key = %s",
                  (duty_call["notification"],))  # fmt: skip
    assert stored == [(duty_call["ack_code"], "confirmed")]
    assert wrong_code_refused
    # Confirmed with the code: no SMS follows for that person.
    assert not [c for c in calls if c["to"] == "+8613900000001" and c["kind"] == "sms"]
    # The family's messaging fails: retried, then voice within 30 s of the first attempt.
    family = attempts("family:1:王小明")
    first = family[0]
    assert first[:2] == ("messaging", "delivery_failed") and first[2] == 60
    voice = next(t for c, a, t in family if c == "voice" and a == "notified")
    assert voice - first[2] <= 30
    assert sum(1 for c, a, _ in family if (c, a) == ("messaging", "delivery_failed")) >= 2
    assert verify(dsn)[1] == ()
    await svc.stop()


# --- two runners on one database ---------------------------------------------------------


async def test_two_runners_never_deliver_a_notice_twice(
    database: str, http_client: httpx.AsyncClient
) -> None:
    """Runner A holds its claimed rows while one send hangs; runner B meanwhile takes only
    the other rows (SKIP LOCKED: it neither waits for A nor sends A's notices)."""
    dsn = database
    clock = ManualClock(T0)
    release = asyncio.Event()
    held = asyncio.Event()

    async def answer(r: Request) -> int | None:
        if r.path == "/bureau/hold" and not held.is_set():
            held.set()
            await release.wait()
        return 200

    receiver = Receiver(answer, clock)
    await receiver.start()
    import_district(dsn, district(receiver.url + "/bureau/hold", sites=3))
    for site in ("site-0", "site-1"):  # smoke: the bureau and the duty staff at once
        await raise_alert(dsn, site, "smoke", T0)
    first = {k for (k,) in rows(dsn, "SELECT key FROM notifications")}
    assert len(first) == 4
    ch = notifiers(http_client)
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn_a,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn_b,
    ):
        runner_a = asyncio.create_task(deliver_due(conn_a, T0, ch, worker="a"))
        await asyncio.wait_for(held.wait(), 10)  # A is mid-send, its rows locked
        with psycopg.connect(dsn) as admin:
            admin.execute("UPDATE organisations SET webhook_url = %s WHERE id = 'bureau'",
                          (receiver.url + "/bureau/free",))  # fmt: skip
        await raise_alert(dsn, "site-2", "smoke", T0)  # two more notices, for B
        out_b = await asyncio.wait_for(deliver_due(conn_b, T0, ch, worker="b"), 10)
        assert out_b.claimed == 2, "B took A's rows or missed the new ones"
        assert not runner_a.done()
        release.set()
        out_a = await asyncio.wait_for(runner_a, 10)
        assert out_a.claimed == 4
        assert (await deliver_due(conn_b, T0, ch, worker="b")).claimed == 0
    keys = [r.headers["idempotency-key"] for r in receiver.requests]
    assert len(keys) == len(set(keys)) == 3, "a notice was delivered twice"
    # Each delivered once (the console rows wait for their fallback window: still pending).
    assert rows(dsn, "SELECT count(*), count(delivered_at) FROM notifications") == [(6, 6)]
    notified = rows(dsn, "SELECT detail->>'step', detail->>'person', count(*) FROM alert_audit"
                    " WHERE action = 'notified' GROUP BY 1, 2")  # fmt: skip
    assert len(notified) == 6 and {n for *_, n in notified} == {1}
    await receiver.stop()


async def test_an_unreadable_row_is_closed_with_its_reason_and_stalls_nothing(
    database: str, http_client: httpx.AsyncClient
) -> None:
    dsn = database
    clock = ManualClock(T0)

    async def answer(r: Request) -> int | None:
        return 200

    receiver = Receiver(answer, clock)
    await receiver.start()
    import_district(dsn, district(receiver.url + "/bureau", sites=2))
    await raise_alert(dsn, "site-0", "smoke", T0)
    await raise_alert(dsn, "site-1", "smoke", T0)
    with psycopg.connect(dsn) as conn:  # two rows spoiled behind the engine's back
        conn.execute("UPDATE notifications SET channel = 'pager' WHERE person_id = 'staff:duty-1'"
                     " AND alert_id = (SELECT id FROM alerts WHERE site_id = 'site-0')")
        conn.execute("UPDATE notifications SET fallback = '[[\"voice\"]]'"
                     " WHERE person_id = 'staff:duty-1'"
                     " AND alert_id = (SELECT id FROM alerts WHERE site_id = 'site-1')")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while (await deliver_due(conn, T0, notifiers(http_client))).claimed:
            pass
    got = rows(dsn, "SELECT person_id, status, closed_reason IS NOT NULL FROM notifications"
               " ORDER BY person_id, status")  # fmt: skip
    assert got == [("bureau:bureau", "sent", False), ("bureau:bureau", "sent", False),
                   ("staff:duty-1", "failed", True), ("staff:duty-1", "failed", True)]
    assert len(receiver.requests) == 2
    await receiver.stop()
