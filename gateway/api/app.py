"""The FastAPI application and how ``eldersafe server`` runs it in its own event loop."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import psycopg
import uvicorn
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from gateway.api.live import LiveFeed
from gateway.api.routes import (
    alerts,
    auth,
    devices,
    feed,
    notify,
    organisations,
    policies,
    privacy,
    residents,
    sites,
    staff,
    stats,
    telemetry,
)
from gateway.api.ws_frames import FramesProtocol
from gateway.config import Settings

log = logging.getLogger(__name__)

ROUTERS = (auth.router, alerts.router, stats.router, feed.router, organisations.router,
           sites.router, residents.router, privacy.router, devices.router, staff.router,
           policies.router, telemetry.router, notify.router)


class Problem(BaseModel):
    """Every 4xx answer: a sentence, or FastAPI's list of what failed validation."""

    detail: str | list[dict[str, Any]]


# Declared for every operation, so /openapi.json describes every answer a client can get
# (the schemathesis contract test holds the app to it).
PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": what} for code, what in (
        (400, "a value the API cannot take"), (401, "not logged in, or the token has ended"),
        (403, "your role may read this but not change it"),
        (404, "no such thing in your part of the tree"),
        (409, "the item's state does not allow it"), (422, "the request is not valid"))
}


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            settings.database_url, min_size=2, max_size=20, open=False,
            kwargs={"autocommit": True}, name="api",
        )
        await pool.open(wait=True, timeout=30)
        app.state.pool = pool
        live = LiveFeed(settings.database_url)  # the WebSocket feed's reader (routes/feed.py)
        try:
            await live.start()
            app.state.live = live
            yield
        finally:
            await live.stop()
            await pool.close()

    app = FastAPI(
        title="eldersafe staff API",
        version="1",
        description="Alerts, residents, sites, devices and the live feed of an eldersafe "
        "district, scoped to the caller's part of the organisation tree.",
        lifespan=lifespan,
        responses=PROBLEMS,
    )
    app.state.settings = settings
    for router in ROUTERS:
        app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each offending input; one holding a lone surrogate
        # cannot be encoded as UTF-8 and the answer became a 500. Where and why suffice.
        def text(value: object) -> str:
            return str(value).encode("utf-8", "replace").decode()

        errors = [{"loc": [text(p) for p in e.get("loc", ())], "msg": text(e.get("msg", "")),
                   "type": text(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(psycopg.errors.DataError)
    async def _bad_value(request: Request, exc: psycopg.errors.DataError) -> JSONResponse:
        # a value PostgreSQL cannot take (out of range, bad encoding): the client's fault
        return JSONResponse({"detail": f"value not accepted: {exc.diag.message_primary}"},
                            status.HTTP_400_BAD_REQUEST)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/console/")

    console = resources.files("gateway.api").joinpath("console")
    if console.is_dir():
        app.mount("/console", StaticFiles(directory=str(console), html=True), name="console")
    return app


def server_config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    """How uvicorn serves the API. WebSockets through ``ws_frames.FramesProtocol``, so the
    live feed writes each frame built once to all its clients; compression off, since
    permessage-deflate would make every client's bytes its own (and cost a deflate per
    client per frame)."""
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
        ws=FramesProtocol, ws_max_size=64 * 1024, ws_per_message_deflate=False,
        timeout_graceful_shutdown=2, proxy_headers=False,
    )  # fmt: skip


async def serve_api(settings: Settings) -> None:
    """Serve until cancelled (the server's other tasks share this loop)."""
    config = server_config(create_app(settings), settings.api_host, settings.api_port)
    server = uvicorn.Server(config)
    log.info("staff API on http://%s:%d", settings.api_host, settings.api_port)
    await server.serve()
