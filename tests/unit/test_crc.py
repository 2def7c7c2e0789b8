"""CRC-16/MODBUS against the DEVICES.md check values and its algebra."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from device_drivers.crc import crc16_modbus, crc16_modbus_bytes


def _reference(data: bytes) -> int:
    """Bit-by-bit definition: poly 0x8005 reflected (0xA001), init 0xFFFF, no xorout."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def test_check_value() -> None:
    assert crc16_modbus(b"123456789") == 0x4B37
    assert crc16_modbus_bytes(b"123456789") == bytes([0x37, 0x4B])


def test_worked_example_from_devices_md() -> None:
    body = bytes.fromhex("09 01 00 01 E2 40 01 57 C3 07")
    assert crc16_modbus(body) == 0x2B0A
    assert crc16_modbus_bytes(body) == bytes.fromhex("0A 2B")


def test_empty_input_is_the_initial_value() -> None:
    assert crc16_modbus(b"") == 0xFFFF


def test_accepts_bytearray_and_memoryview() -> None:
    assert crc16_modbus(bytearray(b"123456789")) == crc16_modbus(memoryview(b"123456789"))


@given(st.binary(max_size=300))
def test_matches_bitwise_reference(data: bytes) -> None:
    assert crc16_modbus(data) == _reference(data)


@given(st.binary(max_size=100), st.binary(max_size=100))
def test_running_crc_over_split_buffers(a: bytes, b: bytes) -> None:
    assert crc16_modbus(b, crc16_modbus(a)) == crc16_modbus(a + b)


@given(st.binary(max_size=200))
def test_message_followed_by_its_crc_has_zero_residue(data: bytes) -> None:
    assert crc16_modbus(data + crc16_modbus_bytes(data)) == 0
