"""Support for the staff API's tests: a district with two stations of one street, a second
street and the bureau; people with passwords; the app in-process on the real database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
from test_alert_engine import ingest

from gateway.alerts.district import District, import_district
from gateway.api.app import create_app
from gateway.api.security import hash_password
from gateway.config import Settings

T0 = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)  # 11:00 in Shanghai
PASSWORD = "correct horse battery staple"

TENANTS: dict[str, Any] = {
    "organisations": [
        {"id": "bureau", "kind": "bureau", "name": "区民政局"},
        {"id": "street-1", "parent": "bureau", "kind": "street", "name": "一街道"},
        {"id": "street-2", "parent": "bureau", "kind": "street", "name": "二街道"},
        {"id": "station-a", "parent": "street-1", "kind": "station", "name": "甲社区站"},
        {"id": "station-b", "parent": "street-1", "kind": "station", "name": "乙社区站"},
        {"id": "home-c", "parent": "street-2", "kind": "institution", "name": "丙养老院"},
    ],
    "sites": [
        {"id": "site-a", "organisation": "station-a", "name": "王家", "address": "甲路1号"},
        {"id": "site-b", "organisation": "station-b", "name": "李家", "address": "乙路2号"},
        {"id": "site-c", "organisation": "home-c", "kind": "room", "name": "101室",
         "address": "丙路3号"},
    ],
    "residents": [
        {"id": "r-a", "site": "site-a", "name": "王秀英", "birth_year": 1941,
         "phone": "13800000001", "lives_alone": True,
         "family": [{"name": "王小明", "phone": "13800000011"}]},
        {"id": "r-b", "site": "site-b", "name": "李桂兰", "birth_year": 1938,
         "phone": "13800000002", "family": [{"name": "李强", "phone": "13800000022"}]},
        {"id": "r-c", "site": "site-c", "name": "赵德明", "birth_year": 1935},
    ],
    "devices": [
        {"site": "site-a", "id": "wb-a", "profile": "es-wb1", "address": "aa:aa",
         "resident": "r-a"},
        {"site": "site-b", "id": "wb-b", "profile": "es-wb1", "address": "bb:bb",
         "resident": "r-b"},
        {"site": "site-c", "id": "wb-c", "profile": "es-wb1", "address": "cc:cc",
         "resident": "r-c"},
    ],
    "staff": [
        {"id": "duty-a", "organisation": "station-a", "name": "刘护工", "role": "duty"},
        {"id": "duty-b", "organisation": "station-b", "name": "陈护工", "role": "duty"},
        {"id": "sup-a", "organisation": "station-a", "name": "周主管", "role": "supervisor"},
        {"id": "street-1", "organisation": "street-1", "name": "吴主任", "role": "street"},
        {"id": "street-2", "organisation": "street-2", "name": "郑主任", "role": "street"},
        {"id": "bureau-1", "organisation": "bureau", "name": "孙科长", "role": "bureau"},
        {"id": "admin", "organisation": "bureau", "name": "管理员", "role": "admin"},
    ],
    "shifts": [
        {"staff": s, "starts_at": (T0 - timedelta(hours=1)).isoformat(),
         "ends_at": (T0 + timedelta(hours=12)).isoformat()}
        for s in ("duty-a", "duty-b")
    ],
}  # fmt: skip

def seed_tenants(dsn: str, at: datetime = T0) -> None:
    """The district, every person's password, and the engine clock at ``at``."""
    import_district(dsn, District.model_validate(TENANTS))
    hashed = hash_password(PASSWORD)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE staff SET password_hash = %s", (hashed,))
        conn.execute(
            "INSERT INTO engine_clock (now) VALUES (%s) ON CONFLICT (id) DO UPDATE SET now = %s",
            (at, at),
        )


def raise_event(dsn: str, site: str, device: str, kind: str = "sos",
                at: datetime = T0) -> uuid.UUID:
    """An event as ingest commits it (the engine inbox trigger queues it)."""
    return ingest(dsn, site, device, kind, "pulse", at)


def test_settings(dsn: str, **extra: Any) -> Settings:
    return Settings(environment="test", database_url=dsn, engine_clock="database", **extra)


@asynccontextmanager
async def api_client(dsn: str, **extra: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this process (its lifespan run: the pool is real), called over ASGI."""
    app = create_app(test_settings(dsn, **extra))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                          base_url="http://api.test") as client,
    ):
        yield client


async def login(client: httpx.AsyncClient, user: str) -> dict[str, str]:
    """The Authorization header of ``user`` (every test person has PASSWORD)."""
    answer = await client.post("/api/auth/login", json={"username": user, "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


@asynccontextmanager
async def api_server(
    dsn: str, send_buffer: int | None = None, **extra: Any
) -> AsyncIterator[str]:
    """The app served by uvicorn on a free loopback port in this event loop, with
    uvicorn's own WebSocket protocol (frames through ASGI): its ``host:port``."""
    import uvicorn

    from gateway.local.ports import free_port

    port = free_port()
    config = uvicorn.Config(
        create_app(test_settings(dsn, api_port=port, **extra)), host="127.0.0.1", port=port,
        log_level="warning", access_log=False, lifespan="on", ws_max_size=64 * 1024,
    )  # fmt: skip
    async with uvicorn_serving(config, send_buffer):
        yield f"127.0.0.1:{port}"


@asynccontextmanager
async def uvicorn_serving(config: Any, send_buffer: int | None = None) -> AsyncIterator[Any]:
    """``config`` (a ``uvicorn.Config`` on a free loopback port) served in this event loop
    (real sockets: WebSockets work) until the block ends: the ``uvicorn.Server``.
    ``send_buffer`` sets SO_SNDBUF of the listening socket (connections inherit it), so a
    test can fill a connection's buffers with little data."""
    import asyncio
    import socket

    import uvicorn
    from support import until

    server = uvicorn.Server(config)
    sockets = None
    if send_buffer is not None:
        listening = socket.socket()
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        listening.bind((config.host, config.port))
        sockets = [listening]
    serving = asyncio.create_task(server.serve(sockets=sockets))
    await until(lambda: server.started or serving.done(), 30, "the API to start")
    if serving.done():
        serving.result()  # it failed to start: its error
    try:
        yield server
    finally:
        server.should_exit = True
        await serving
