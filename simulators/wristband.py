"""A simulated `es-wb1` wristband: a bumble BLE peripheral built from DEVICES.md 1.

It deliberately shares no code with ``device_drivers``: it is a second,
independent reading of the protocol page, so a misreading on either side shows
up as a failing test instead of cancelling out.

In process, give it the ``LocalLink`` the gateway's central sits on. Across
processes, run ``python -m simulators.wristband --expose tcp-server:127.0.0.1:9100``
and point the edge's bumble backend at ``tcp-client:127.0.0.1:9100``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bumble.controller import Controller
from bumble.core import UUID
from bumble.device import Connection, Device
from bumble.gatt import Characteristic, CharacteristicValue, Service
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

log = logging.getLogger(__name__)

# DEVICES.md 1.1 / 1.2, restated here on purpose (see module docstring).
COMPANY_ID = 0xFFFF
SOS, FALL, WORN, CHARGING, BATTERY_LOW, OUTSIDE_GEOFENCE = (1 << i for i in range(6))
EVENT_SOS, EVENT_FALL, EVENT_CANCEL, EVENT_REMOVED, EVENT_GEOFENCE_EXIT = range(1, 6)
ALARM_SERVICE = "5e1a0001-2f6b-4c3e-9d5a-0e5c0a1b2c3d"
ALARM_EVENT = "5e1a0002-2f6b-4c3e-9d5a-0e5c0a1b2c3d"
COMMAND = "5e1a0003-2f6b-4c3e-9d5a-0e5c0a1b2c3d"
_AD_FLAGS, _AD_NAME, _AD_MANUFACTURER = 0x01, 0x09, 0xFF
_LE_GENERAL_DISCOVERABLE_NO_BREDR = 0x06


@dataclass(frozen=True, slots=True)
class ReceivedCommand:
    """One write to the Command characteristic, as the wristband saw it."""

    data: bytes
    at: float  # wristband clock, Unix seconds


class SimulatedWristband:
    """A wristband on a bumble link: adverts, GATT services, scripted events.

    All methods must be called from the event loop the link was created on.
    """

    def __init__(
        self,
        link: LocalLink,
        *,
        address: str = "C0:4E:57:00:00:01",
        advertising_interval_ms: float = 1000.0,
        alarm_advertising_interval_ms: float = 100.0,
        alarm_fast_advertising_s: float = 10.0,
        flag_timeout_s: float = 600.0,
        heart_rate: int = 72,
        spo2: int = 98,
        battery: int = 85,
        steps: int = 0,
        activity: int = 0,
        worn: bool = True,
        charging: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.address = Address(address)
        self.name = "ES-WB1-" + self.address.to_string(False).replace(":", "")[-4:]
        self.advertising_interval_ms = advertising_interval_ms
        self.alarm_advertising_interval_ms = alarm_advertising_interval_ms
        self.alarm_fast_advertising_s = alarm_fast_advertising_s
        self.flag_timeout_s = flag_timeout_s
        self.heart_rate, self.spo2, self.battery = heart_rate, spo2, battery
        self.steps, self.activity = steps, activity
        self.flags = (WORN if worn else 0) | (CHARGING if charging else 0)
        self.flags |= BATTERY_LOW if battery < 20 else 0
        self.event_seq = 0
        self.last_event = bytes(8)  # all zero: no event yet
        self.commands: list[ReceivedCommand] = []
        self.locating = False
        self._clock = clock
        self._clock_offset = 0.0
        self._fast_until = 0.0
        self._silent = False
        self._started = False
        self._advert_lock = asyncio.Lock()
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()

        controller = Controller(self.name, link=link)
        self.device = Device(
            name=self.name, address=self.address, host=Host(controller, AsyncPipeSink(controller))
        )
        self._build_gatt()
        self.device.on(self.device.EVENT_CONNECTION, self._on_connection)

    # ------------------------------------------------------------------ GATT
    def _build_gatt(self) -> None:
        props = Characteristic.Properties
        self._battery_char: Characteristic[bytes] = Characteristic(
            "2A19",
            props.READ | props.NOTIFY,
            Characteristic.READABLE,
            CharacteristicValue(read=lambda _c: bytes([self.battery])),
        )
        self._hr_char: Characteristic[bytes] = Characteristic(
            "2A37", props.NOTIFY, Characteristic.READABLE, self._hr_bytes()
        )
        self._alarm_char: Characteristic[bytes] = Characteristic(
            ALARM_EVENT,
            props.READ | props.NOTIFY,
            Characteristic.READABLE,
            CharacteristicValue(read=lambda _c: self.last_event),
        )
        self._command_char: Characteristic[bytes] = Characteristic(
            COMMAND,
            props.WRITE,
            Characteristic.WRITEABLE,
            CharacteristicValue(write=self._on_write),
        )
        self.device.add_services(
            [
                Service(UUID("180F"), [self._battery_char]),
                Service(UUID("180D"), [self._hr_char]),
                Service(UUID(ALARM_SERVICE), [self._alarm_char, self._command_char]),
            ]
        )

    def _hr_bytes(self) -> bytes:
        if self.heart_rate > 0xFF:
            return struct.pack("<BH", 0x01, self.heart_rate)
        return bytes([0x00, self.heart_rate])

    async def _on_write(self, _connection: Connection, value: bytes) -> None:
        data = bytes(value)
        self.commands.append(ReceivedCommand(data, self.now()))
        log.info("%s: command %s", self.name, data.hex())
        if data == b"\x01":
            self.flags &= ~(SOS | FALL)  # "help is coming"
        elif data == b"\x02":
            self.locating = True
            self._later(10.0, lambda: setattr(self, "locating", False))
        elif len(data) == 5 and data[0] == 0x03:
            (unix_seconds,) = struct.unpack_from("<I", data, 1)
            self._clock_offset = unix_seconds - self._clock()
        await self._update_advert()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.device.power_on()
        self._started = True
        await self._update_advert()

    async def stop(self) -> None:
        """Power off: no more adverts, connections dropped."""
        for timer in self._timers:
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        await self.go_silent()
        self._started = False

    async def go_silent(self) -> None:
        """Out of range: adverts stop and every connection drops."""
        self._silent = True
        async with self._advert_lock:
            await self.device.stop_advertising()
        for connection in list(self.device.connections.values()):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await connection.disconnect()

    async def resume(self) -> None:
        self._silent = False
        await self._update_advert()

    def _on_connection(self, _connection: Connection) -> None:
        # The controller stops advertising on connection; a real wristband keeps
        # advertising so other receivers still hear it.
        self._spawn(self._update_advert())

    # --------------------------------------------------------------- adverts
    def manufacturer_payload(self) -> bytes:
        """The 9 bytes after the company id (DEVICES.md 1.1)."""
        return struct.pack(
            "<BBBBBBHB",
            0x01,
            self.flags,
            self.event_seq,
            self.heart_rate if self.heart_rate <= 0xFF else 0xFF,
            self.spo2,
            self.battery,
            self.steps & 0xFFFF,
            self.activity,
        )

    def advertising_data(self) -> bytes:
        name = self.name.encode()
        mfg = struct.pack("<H", COMPANY_ID) + self.manufacturer_payload()
        return b"".join(
            bytes([len(body) + 1, ad_type]) + body
            for ad_type, body in (
                (_AD_FLAGS, bytes([_LE_GENERAL_DISCOVERABLE_NO_BREDR])),
                (_AD_NAME, name),
                (_AD_MANUFACTURER, mfg),
            )
        )

    async def _update_advert(self) -> None:
        if not self._started or self._silent:
            return
        fast = time.monotonic() < self._fast_until
        interval = self.alarm_advertising_interval_ms if fast else self.advertising_interval_ms
        async with self._advert_lock:
            await self.device.start_advertising(
                advertising_data=self.advertising_data(),
                advertising_interval_min=interval,
                advertising_interval_max=interval,
                auto_restart=True,
            )

    # ------------------------------------------------------------ scenarios
    def now(self) -> float:
        return self._clock() + self._clock_offset

    async def press_sos(self) -> int:
        """The wearer presses the SOS button; returns the new event_seq."""
        return await self._new_alarm(SOS, EVENT_SOS, 100)

    async def fall(self, confidence: int = 90) -> int:
        """The fall detector fires; returns the new event_seq."""
        return await self._new_alarm(FALL, EVENT_FALL, confidence)

    async def cancel(self) -> None:
        """The wearer cancels (long press): GATT event 3, flags clear."""
        self.flags &= ~(SOS | FALL)
        await self._event(EVENT_CANCEL, 100)

    async def remove_from_wrist(self) -> None:
        self.flags &= ~WORN
        await self._event(EVENT_REMOVED, 100)

    async def put_on_wrist(self) -> None:
        self.flags |= WORN
        await self._update_advert()

    async def leave_geofence(self) -> None:
        self.flags |= OUTSIDE_GEOFENCE
        await self._event(EVENT_GEOFENCE_EXIT, 100)

    async def set_heart_rate(self, bpm: int) -> None:
        self.heart_rate = bpm
        await self.device.notify_subscribers(self._hr_char, self._hr_bytes())
        await self._update_advert()

    async def set_battery(self, percent: int) -> None:
        self.battery = percent
        self.flags = (self.flags | BATTERY_LOW) if percent < 20 else (self.flags & ~BATTERY_LOW)
        await self.device.notify_subscribers(self._battery_char, bytes([percent]))
        await self._update_advert()

    async def set_telemetry(
        self, *, spo2: int | None = None, steps: int | None = None, activity: int | None = None
    ) -> None:
        self.spo2 = self.spo2 if spo2 is None else spo2
        self.steps = self.steps if steps is None else steps
        self.activity = self.activity if activity is None else activity
        await self._update_advert()

    async def _new_alarm(self, flag: int, event_type: int, confidence: int) -> int:
        self.event_seq = (self.event_seq + 1) & 0xFF
        self.flags |= flag
        seq = self.event_seq
        self._fast_until = time.monotonic() + self.alarm_fast_advertising_s
        self._later(self.alarm_fast_advertising_s, lambda: self._spawn(self._update_advert()))
        self._later(self.flag_timeout_s, lambda: self._expire_flag(flag, seq))
        await self._event(event_type, confidence)
        return seq

    def _expire_flag(self, flag: int, seq: int) -> None:
        if self.event_seq == seq and self.flags & flag:
            self.flags &= ~flag
            self._spawn(self._update_advert())

    async def _event(self, event_type: int, confidence: int) -> None:
        self.last_event = struct.pack(
            "<BBIBB", event_type, self.event_seq, int(self.now()) & 0xFFFFFFFF, confidence, 0
        )
        await self._update_advert()
        await self.device.notify_subscribers(self._alarm_char, self.last_event)

    def _later(self, delay: float, callback: Callable[[], Any]) -> None:
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            callback()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _serve(args: argparse.Namespace) -> None:
    """Wristbands on a link of their own, exposed as an HCI transport for the edge."""
    from simulators.ble import expose_link

    link = LocalLink()  # type: ignore[no-untyped-call]
    bands = [
        SimulatedWristband(
            link,
            address=f"C0:4E:57:00:00:{i + 1:02X}",
            advertising_interval_ms=args.interval_ms,
        )
        for i in range(args.count)
    ]
    transport = await expose_link(link, args.expose)
    try:
        for band in bands:
            await band.start()
            log.info("advertising %s at %s", band.name, band.address.to_string(False))
        if args.sos_after > 0:
            await asyncio.sleep(args.sos_after)
            for band in bands:
                log.info("%s: SOS, event_seq %d", band.name, await band.press_sos())
        await asyncio.Event().wait()
    finally:
        for band in bands:
            await band.stop()
        await transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Simulated es-wb1 wristbands on a bumble link")
    parser.add_argument("--expose", default="tcp-server:127.0.0.1:9100", help="HCI transport")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--interval-ms", type=float, default=1000.0)
    parser.add_argument("--sos-after", type=float, default=0.0, help="press SOS after N s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
