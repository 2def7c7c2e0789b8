"""Scenarios: a simulated site (receivers, buttons, Modbus detectors, wristbands) and a timeline.

A scenario file (YAML) names the site's devices and what happens to them,
second by second. ``SimulatedSite`` starts the simulators at their transports
(ptys, a Modbus RTU server, a BLE link exposed as an HCI transport) and says
where an edge should connect; ``play`` walks the timeline. What each action
does is a table (``ACTIONS``), not a chain of ifs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from bumble.link import LocalLink
from bumble.transport.common import Transport
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from simulators.callbutton_receiver import CallButtonReceiverSimulator
from simulators.modbus_sensors import (
    SD_BATTERY_LOW,
    SD_FAULT,
    SD_TAMPER,
    ModbusSensorBus,
)
from simulators.wristband import SimulatedWristband

log = logging.getLogger(__name__)

SCENARIO_DIR = Path(__file__).with_name("scenarios")
Id = Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,64}$")]
DeviceKind = Literal["receiver", "button", "wristband", "smoke_detector", "electrical_detector"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScenarioDevice(_Strict):
    id: Id
    kind: DeviceKind
    button_id: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] | None = None
    receivers: list[Id] = Field(default_factory=list)  # buttons: which receivers hear it
    address: str | None = None  # wristbands: BLE address
    unit: Annotated[int, Field(ge=1, le=247)] | None = None  # Modbus detectors

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ScenarioDevice:
        need = {
            "button": "button_id",
            "wristband": "address",
            "smoke_detector": "unit",
            "electrical_detector": "unit",
        }.get(self.kind)
        if need and getattr(self, need) is None:
            raise ValueError(f"device {self.id!r} ({self.kind}) needs {need!r}")
        return self


class Step(_Strict):
    at: Annotated[float, Field(ge=0)]
    device: Id
    action: str
    args: dict[str, int | float | str | bool] = Field(default_factory=dict)
    note: str | None = None


class Scenario(_Strict):
    name: Id
    title: str
    site: Id
    gateway: Id
    story: str = ""
    duration_s: Annotated[float, Field(gt=0)]
    devices: list[ScenarioDevice] = Field(min_length=1)
    steps: list[Step] = Field(default_factory=list)
    expect: list[dict[str, str]] = Field(default_factory=list)  # events a run must produce

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        ids = [d.id for d in self.devices]
        if len(ids) != len(set(ids)):
            raise ValueError("device ids must be unique")
        by_id = {d.id: d for d in self.devices}
        receivers = [d.id for d in self.devices if d.kind == "receiver"]
        for d in self.devices:
            if d.kind == "button":
                if not receivers:
                    raise ValueError(f"button {d.id!r} needs a receiver in the scenario")
                unknown = set(d.receivers) - set(receivers)
                if unknown:
                    raise ValueError(f"button {d.id!r}: unknown receivers {sorted(unknown)}")
        for s in self.steps:
            if s.device not in by_id:
                raise ValueError(f"step at {s.at}s names unknown device {s.device!r}")
            kind = by_id[s.device].kind
            if s.action not in ACTIONS[kind]:
                raise ValueError(
                    f"step at {s.at}s: {kind} has no action {s.action!r}; "
                    f"known: {sorted(ACTIONS[kind])}"
                )
        return self

    def hearing(self, button: ScenarioDevice) -> list[str]:
        """Receivers that hear a button (all of the site's, unless the button names some)."""
        return button.receivers or [d.id for d in self.devices if d.kind == "receiver"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_scenario(name_or_path: str | Path) -> Scenario:
    path = Path(name_or_path)
    if not path.exists():
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no scenario {name_or_path!r}; known: {known}")
    return Scenario.model_validate(yaml.safe_load(path.read_text()))


def all_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


@dataclass
class SimulatedSite:
    """Every simulator of one scenario, running in this process's event loop."""

    scenario: Scenario
    ble_port: int = 0
    advertising_interval_ms: float = 100.0
    receivers: dict[str, CallButtonReceiverSimulator] = field(default_factory=dict)
    bus: ModbusSensorBus | None = None
    wristbands: dict[str, SimulatedWristband] = field(default_factory=dict)
    ble_transport: str | None = None
    _exposed: Transport | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def device(self, device_id: str) -> ScenarioDevice:
        return next(d for d in self.scenario.devices if d.id == device_id)

    async def start(self) -> None:
        sc = self.scenario
        for d in sc.devices:
            if d.kind == "receiver":
                sim = CallButtonReceiverSimulator(status_interval_s=30.0)
                await sim.start()
                self.receivers[d.id] = sim
        for d in sc.devices:
            if d.kind == "button":
                assert d.button_id is not None
                for rx in sc.hearing(d):
                    self.receivers[rx].add_button(d.button_id)
        units = {
            d.unit: ("es-sd1" if d.kind == "smoke_detector" else "es-ef1")
            for d in sc.devices
            if d.unit is not None
        }
        if units:
            self.bus = ModbusSensorBus(units)
            await self.bus.start()
        bands = [d for d in sc.devices if d.kind == "wristband"]
        if bands:
            from simulators.ble import expose_link

            link = LocalLink()  # type: ignore[no-untyped-call]
            for d in bands:
                assert d.address is not None
                band = SimulatedWristband(
                    link, address=d.address, advertising_interval_ms=self.advertising_interval_ms
                )
                await band.start()
                self.wristbands[d.id] = band
            port = self.ble_port or _free_port()
            self.ble_transport = f"tcp-client:127.0.0.1:{port}"
            self._exposed = await expose_link(link, f"tcp-server:127.0.0.1:{port}")
        log.info("simulated site %s started", sc.site)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for band in self.wristbands.values():
            await band.stop()
        if self._exposed is not None:
            await self._exposed.close()
        if self.bus is not None:
            await self.bus.stop()
        for sim in self.receivers.values():
            await sim.stop()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def play(self, *, speed: float = 1.0) -> None:
        """Walk the timeline (``speed`` > 1 runs it faster)."""
        started = time.monotonic()
        for step in sorted(self.scenario.steps, key=lambda s: s.at):
            delay = step.at / speed - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            device = self.device(step.device)
            log.info(
                "t=%5.1fs %s: %s %s%s",
                step.at,
                device.id,
                step.action,
                step.args or "",
                f" — {step.note}" if step.note else "",
            )
            await ACTIONS[device.kind][step.action](self, device, dict(step.args))


Action = Callable[[SimulatedSite, ScenarioDevice, dict[str, Any]], Awaitable[Any]]


def _button(method: str) -> Action:
    async def act(site: SimulatedSite, d: ScenarioDevice, args: dict[str, Any]) -> None:
        assert d.button_id is not None
        # every receiver in range hears the same RF burst
        await asyncio.gather(
            *(getattr(site.receivers[rx], method)(d.button_id) for rx in site.scenario.hearing(d))
        )

    return act


def _receiver(method: str) -> Action:
    async def act(site: SimulatedSite, d: ScenarioDevice, args: dict[str, Any]) -> None:
        result = getattr(site.receivers[d.id], method)(**args)
        if asyncio.iscoroutine(result):
            await result

    return act


def _band(method: str, **fixed: Any) -> Action:
    async def act(site: SimulatedSite, d: ScenarioDevice, args: dict[str, Any]) -> None:
        await getattr(site.wristbands[d.id], method)(**{**fixed, **args})

    return act


def _unit(method: str, **fixed: Any) -> Action:
    async def act(site: SimulatedSite, d: ScenarioDevice, args: dict[str, Any]) -> None:
        assert site.bus is not None and d.unit is not None
        result = getattr(site.bus, method)(d.unit, **{**fixed, **args})
        if asyncio.iscoroutine(result):  # ramps run in the background, like the real world
            site.spawn(result)

    return act


_MODBUS_COMMON: dict[str, Action] = {"silent": _unit("silence"), "resume": _unit("resume")}

ACTIONS: dict[str, dict[str, Action]] = {
    "receiver": {
        "noise": _receiver("inject_noise"),
        "corrupt_frame": _receiver("inject_corrupt_frame"),
        "silent": _receiver("go_silent"),
        "resume": _receiver("resume"),
    },
    "button": {
        "press": _button("press"),
        "cancel": _button("cancel"),
        "low_battery": _button("low_battery"),
        "supervision": _button("supervision"),
        "tamper": _button("tamper"),
    },
    "wristband": {
        "sos": _band("press_sos"),
        "fall": _band("fall"),
        "cancel": _band("cancel"),
        "remove": _band("remove_from_wrist"),
        "put_on": _band("put_on_wrist"),
        "geofence_exit": _band("leave_geofence"),
        "heart_rate": _band("set_heart_rate"),
        "battery": _band("set_battery"),
        "silent": _band("go_silent"),
        "resume": _band("resume"),
    },
    "smoke_detector": {
        "smoke": _unit("smoke_build_up"),
        "clear": _unit("set_smoke", obscuration_db_m=0.0, alarm=False),
        "fault": _unit("set_status_bit", bit=SD_FAULT, on=True),
        "battery_low": _unit("set_status_bit", bit=SD_BATTERY_LOW, on=True),
        "tamper": _unit("set_status_bit", bit=SD_TAMPER, on=True),
        **_MODBUS_COMMON,
    },
    "electrical_detector": {
        "leakage_creep": _unit("leakage_creep"),
        "leakage": _unit("set_residual_current"),
        "cable_heating": _unit("cable_heating"),
        **_MODBUS_COMMON,
    },
}
