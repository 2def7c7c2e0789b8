"""Pre-built WebSocket frames written straight to a connection's transport, below ASGI.

Why: a server→client frame is not masked (RFC 6455 §5.1), so the bytes of a frame are the
same for every client that gets the same message. The live feed sends one ``changes``
frame per read of the log to every console of a (scope, tier) key; through ASGI each
copy costs a task wake-up, Starlette's send chain, uvicorn's protocol, the ``websockets``
framing, an ``encode()`` and a ``transport.write`` per client (bench/README.md, api.py:
about half of the loop). Built once, the frame needs only the last of these per client.

How: ``FramesProtocol`` is uvicorn's sans-I/O WebSocket protocol (what ``ws="auto"`` picks
with ``websockets`` installed) plus one ASGI scope extension (the ASGI spec puts
server-specific features in ``scope["extensions"]``): ``EXTENSION`` maps to
``{"write", "buffered", "closing"}``. ``RawFrames.of(scope)`` reads it back typed; a
server without it (the in-process ASGI client of the tests, another server) gives None
and the app sends through ASGI as before.

Why a raw write cannot land inside another frame: uvicorn writes every frame of this
protocol (data, ping, pong, close) with one synchronous ``transport.write`` of the whole
frame, on the loop's thread, and so does ``write``; it is refused once a close was sent
or received, so nothing follows a close. It is offered only on a connection without
extensions (permessage-deflate would change a frame's bytes per client): the API serves
with compression off (``app.serve_api``), and a server that negotiates it falls back
to ASGI for that client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State

EXTENSION = "eldersafe.frames"


def text_frame(payload: bytes) -> bytes:
    """One complete, unmasked, unfragmented text frame of ``payload`` (UTF-8 text), as
    the ``websockets`` library frames it (the 7-bit, 16-bit or 64-bit length form)."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


@dataclass(frozen=True, slots=True)
class RawFrames:
    """The extension as the app sees it. ``write(frame)`` puts a complete frame on the
    wire and says whether it did (False: the connection is closing; nothing was written).
    ``buffered()`` is what the transport holds unsent (the app's bound on a slow client).
    ``closing()``: a close was sent or received, or the connection is gone."""

    write: Callable[[bytes], bool]
    buffered: Callable[[], int]
    closing: Callable[[], bool]

    @classmethod
    def of(cls, scope: Mapping[str, Any]) -> RawFrames | None:
        found = (scope.get("extensions") or {}).get(EXTENSION)
        if not isinstance(found, dict):
            return None
        return cls(found["write"], found["buffered"], found["closing"])


class FramesProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol offering ``EXTENSION``; pass the class as
    ``uvicorn.Config(ws=FramesProtocol)``."""

    # After the app has ended, a peer that still has not taken what was written (a
    # shut TCP window) is cut off after this long instead of holding the buffer for
    # as long as its kernel answers (a graceful close waits for the buffer to drain).
    abort_after_s = 10.0

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101 and not self.conn.extensions:
            self.scope.setdefault("extensions", {})[EXTENSION] = {
                "write": self._write_frame,
                "buffered": self._buffered,
                "closing": self._closing,
            }

    def _closing(self) -> bool:
        return (
            self.close_sent
            or self.disconnected
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()
        )

    def _write_frame(self, frame: bytes) -> bool:
        if not self.handshake_complete or self._closing():
            return False
        self.transport.write(frame)
        return True

    def _buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:
            asyncio.get_running_loop().call_later(self.abort_after_s, self._abort_if_stuck)

    def _abort_if_stuck(self) -> None:
        if not self.disconnected and self.transport.get_write_buffer_size():
            self.transport.abort()
