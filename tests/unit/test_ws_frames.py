"""Frames built once and written below ASGI (``gateway.api.ws_frames``): the bytes are
what a WebSocket library reads at each length form, and over a real uvicorn with our
protocol a real ``websockets`` client parses them in order among ASGI's own frames;
the extension is absent where a client's bytes would be its own (permessage-deflate),
and refuses to write once a close was sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
from support import until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.api.live import OutFrame, changes_payload
from gateway.api.ws_frames import FramesProtocol, RawFrames, text_frame
from gateway.local.ports import free_port

pytestmark = pytest.mark.timeout(60)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# 7-bit, 16-bit and 64-bit length forms, at and around each boundary (RFC 6455 §5.2)
LENGTHS = (0, 1, 125, 126, 127, 65_535, 65_536, 70_000)


def parsed(data: bytes) -> Frame:
    """``data`` read back by the websockets library's own parser, as a client reads it."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("the frame was incomplete")


@pytest.mark.parametrize("length", LENGTHS)
def test_a_text_frame_reads_back_whole_at_every_length_form(length: int) -> None:
    payload = (b"0123456789abcdef" * (length // 16 + 1))[:length]
    data = text_frame(payload)
    header = 2 if length < 126 else 4 if length < 65_536 else 10
    assert len(data) == header + length  # unmasked: no masking key
    assert data[0] == 0x81  # FIN, text
    assert data[1] == (length if length < 126 else 126 if length < 65_536 else 127)
    frame = parsed(data)
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)


def test_a_frame_of_chinese_text_is_escaped_ascii_and_shared_by_its_clients() -> None:
    element = json.dumps({"name": "王秀英", "address": "甲路1号", "note": "😀"},
                         ensure_ascii=False).encode()  # fmt: skip
    frame = OutFrame(changes_payload([element] * 3), 3)
    assert frame.payload.isascii()
    assert frame.wire is frame.wire and frame.text is frame.text  # built once
    got = parsed(frame.wire)
    assert json.loads(got.data) == {"type": "changes", "changes": [json.loads(element)] * 3}
    assert got.data.decode() == frame.text


# -- over a real uvicorn --------------------------------------------------------------------


Script = Callable[[RawFrames | None, Send], Awaitable[None]]


@asynccontextmanager
async def served(script: Script, deflate: bool = False) -> AsyncIterator[str]:
    """uvicorn with ``FramesProtocol`` on a free loopback port, in this loop, serving one
    ASGI app that accepts each WebSocket, runs ``script`` with the connection's extension
    (or None) and then waits for the client to go."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "websocket"
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await script(RawFrames.of(scope), send)
        while (await receive())["type"] != "websocket.disconnect":
            pass

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, ws=FramesProtocol,
                            ws_per_message_deflate=deflate, lifespan="off",
                            log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    await until(lambda: server.started or serving.done(), 30, "uvicorn to start")
    if serving.done():
        serving.result()
    try:
        yield f"ws://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        await serving


def text(body: str) -> MutableMapping[str, Any]:
    return {"type": "websocket.send", "text": body}


async def test_raw_frames_arrive_whole_and_in_order_among_asgis_own() -> None:
    """Raw frames of every length form, Chinese text escaped and not, between frames sent
    through ASGI and before a close through it: the client's parser gets each message
    whole, in the order written, then the close code."""
    bodies = [json.dumps({"n": n, "pad": "x" * n, "name": "王秀英"}, ensure_ascii=ascii)
              for n in (0, 200, 70_000) for ascii in (True, False)]  # fmt: skip
    written: list[bool] = []

    async def script(raw: RawFrames | None, send: Send) -> None:
        assert raw is not None and not raw.closing()
        await send(text("through ASGI first"))
        for body in bodies:
            written.append(raw.write(OutFrame(body.encode()).wire))
            await send(text(f"through ASGI after {len(body)}"))
        assert raw.buffered() >= 0
        await send({"type": "websocket.close", "code": 4000, "reason": "done"})
        assert raw.closing()
        written.append(raw.write(text_frame(b"after the close")))

    got: list[str | bytes] = []
    async with served(script) as url, connect(url, max_size=None) as ws:
        with pytest.raises(ConnectionClosed):
            while True:
                got.append(await ws.recv())
        assert ws.close_code == 4000 and ws.close_reason == "done"
    expected = ["through ASGI first"]
    for body in bodies:
        expected += [body, f"through ASGI after {len(body)}"]
    assert got == expected
    assert written == [True] * len(bodies) + [False]  # nothing after the close


async def test_no_raw_writes_where_compression_makes_each_clients_bytes_its_own() -> None:
    """On a server that negotiates permessage-deflate, a client that takes it gets no
    extension (the app falls back to ASGI); one that declines it gets the raw writes."""
    offered: list[bool] = []

    async def script(raw: RawFrames | None, send: Send) -> None:
        offered.append(raw is not None)
        if raw is None:
            await send(text("through ASGI"))
        else:
            assert raw.write(text_frame(b"raw"))

    async with served(script, deflate=True) as url:
        async with connect(url, compression="deflate") as ws:
            assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
            assert await ws.recv() == "through ASGI"
        async with connect(url, compression=None) as ws:
            assert ws.protocol.extensions == []
            assert await ws.recv() == "raw"
    assert offered == [False, True]
