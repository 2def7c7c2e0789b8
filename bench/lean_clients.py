"""Measuring clients that cost the bench machine as little as they can.

Two hundred consoles are two hundred phones, each with a CPU of its own; in the bench
they share two processes with each other and two cores with the server. A full client
(the ``websockets`` library, a JSON parse per frame, ``httpx``) spends ≈ 50 µs or more on
each frame before it can look at the clock, so the hundredth console of a fan-out was
stamped after the other ninety-nine had been parsed: the bench measured its own queue.

* ``LeanFeed``: a WebSocket client (RFC 6455) that stamps each read of its socket the
  moment it gets it and keeps the frames' payloads as they came; they are parsed after
  the run (``changes``). Only the frame headers are read on arrival, to answer the
  server's pings at once (the server closes a client that does not).
* ``LeanHttp``: HTTP/1.1 requests on one kept-alive connection, as a console's page
  sends them, with no client library in between.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Iterator
from typing import Any

import orjson

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked frame, as a client must send (RFC 6455 §5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class LeanFeed(asyncio.Protocol):
    """One console on ``WS /api/feed``: ``frames`` holds (arrival, payload) of each text
    frame, in order; nothing is decoded on arrival but the frame headers."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.frames: list[tuple[float, bytes]] = []
        self.upgraded = asyncio.get_running_loop().create_future()
        self.first = asyncio.get_running_loop().create_future()  # the first text frame
        self.closed = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self._upgrading = True
        self._parsed = 0  # frames already handed out by ``changes``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(  # type: ignore[union-attr]
            f"GET /api/feed HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self._buf
        buf += data
        if self._upgrading:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(RuntimeError(bytes(buf[:200]).decode(errors="replace")))
                return
            del buf[: end + 4]
            self._upgrading = False
            self.upgraded.set_result(None)
        while len(buf) >= 2:
            opcode, n, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + n:
                return
            payload = bytes(buf[at : at + n])
            del buf[: at + n]
            if opcode == OP_TEXT:
                self.frames.append((now, payload))
                if not self.first.done():
                    self.first.set_result(payload)
            elif opcode == OP_PING and self.transport is not None:
                self.transport.write(client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE and not self.closed.done():
                self.closed.set_result(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(b"")

    def send_text(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(OP_TEXT, text.encode()))

    def changes(self) -> Iterator[tuple[float, dict[str, Any]]]:
        """The changes of the frames not handed out yet, each with its frame's arrival."""
        frames, self._parsed = self.frames[self._parsed :], len(self.frames)
        for at, payload in frames:
            if payload.startswith(b'{"type":"changes",'):
                for change in orjson.loads(payload)["changes"]:
                    yield at, change

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def lean_feed(host: str, token: str, within_s: float = 60) -> LeanFeed:
    """A console authenticated on the feed with ``after: null``, past its ``ready``."""
    name, port = host.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    _, feed = await loop.create_connection(lambda: LeanFeed(host), name, int(port))
    async with asyncio.timeout(within_s):
        await feed.upgraded
        feed.send_text(orjson.dumps({"type": "auth", "token": token, "after": None}).decode())
        ready = orjson.loads(await feed.first)
    if ready.get("type") != "ready":
        raise RuntimeError(f"feed answered {ready}")
    feed.frames.clear()
    return feed


class LeanHttp:
    """Requests on one kept-alive HTTP/1.1 connection, one at a time."""

    def __init__(self, host: str, headers: dict[str, str]) -> None:
        self.host = host
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None
                      ) -> tuple[int, bytes]:  # fmt: skip
        if self._conn is None:
            name, port = self.host.rsplit(":", 1)
            self._conn = await asyncio.open_connection(name, int(port))
        reader, writer = self._conn
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.headers}{extra}"
                     "Content-Length: 0\r\n\r\n".encode())  # fmt: skip
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name_, _, value = line.decode().partition(":")
            if name_.strip().lower() == "content-length":
                length = int(value)
        return status, await reader.readexactly(length)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None
