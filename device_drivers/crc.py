"""CRC-16/MODBUS, shared by the es-cb1 serial frames and anything else that needs it.

Table-driven because a serial reader checks every candidate frame, including
the ones noise produces; the table keeps that cheap.
"""

from __future__ import annotations

__all__ = ["crc16_modbus", "crc16_modbus_bytes"]


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc16_modbus(data: bytes | bytearray | memoryview, crc: int = 0xFFFF) -> int:
    """CRC-16/MODBUS (poly 0x8005 reflected, init 0xFFFF, no final XOR).

    ``crc`` lets a caller continue a running CRC over split buffers.
    """
    for byte in bytes(data):
        crc = (crc >> 8) ^ _TABLE[(crc ^ byte) & 0xFF]
    return crc


def crc16_modbus_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The CRC as it goes on the wire: low byte first."""
    return crc16_modbus(data).to_bytes(2, "little")
