"""A pymodbus RTU server playing Acme AS-200 units (RTU framing over TCP).

Written from the register map in this package's docstring, not from the
decoder, so a shared misreading cannot hide.
"""

from __future__ import annotations

from functools import partial

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from vendor_acme import BASE, HUSH_COIL, SILENCED_BIT, SMOKE_BIT


class AcmeBus:
    def __init__(self, unit_ids: list[int]) -> None:
        # temperature 21.5 °C, density 0.020 dB/m, all clear, 3000 mV
        self.registers = {uid: [43, 20, 0, 3000] for uid in unit_ids}
        self.coil_writes: list[tuple[int, int, bool]] = []
        self._server: ModbusSerialServer | None = None
        self.url = ""

    async def start(self) -> str:
        devices = [
            SimDevice(
                id=uid,
                simdata=(
                    [SimData(0, values=[False] * 32, datatype=DataType.BITS)],
                    [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                    [SimData(BASE, values=list(regs), datatype=DataType.REGISTERS)],
                    [SimData(0, values=[0], datatype=DataType.REGISTERS)],
                ),
                action=partial(self._action, uid),
            )
            for uid, regs in self.registers.items()
        ]
        self._server = ModbusSerialServer(
            devices, framer=FramerType.RTU, port="socket://127.0.0.1:0", baudrate=9600
        )
        await self._server.serve_forever(background=True)
        port = self._server.transport.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"socket://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    async def _action(
        self,
        unit_id: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        regs = self.registers[unit_id]
        if function_code == 3:
            current_registers[: len(regs)] = regs
        elif function_code == 5 and set_values is not None:
            on = bool(set_values[0])
            self.coil_writes.append((unit_id, address, on))
            if address == HUSH_COIL and on:
                regs[2] |= 1 << SILENCED_BIT
        return None

    def set_smoke(self, unit_id: int, on: bool) -> None:
        regs = self.registers[unit_id]
        regs[1] = 450 if on else 20
        regs[2] = regs[2] | (1 << SMOKE_BIT) if on else regs[2] & ~(1 << SMOKE_BIT)
