"""A bleak backend over bumble: bleak's public API on bumble's BLE host stack.

Code written against ``BleakScanner``/``BleakClient`` runs unchanged over BlueZ
and over this backend on any HCI controller bumble opens (a USB dongle, a
controller in another process, the simulators' virtual link), so the wire
(adverts, ATT reads, writes, notifications) is real even without a kernel radio.

Which bumble central to use is passed as the ``bumble_central=`` keyword, which
bleak forwards to the backend; ``set_default_central`` is a fallback for code
that cannot pass keywords.

Addresses are reported like BlueZ does: ``AA:BB:CC:DD:EE:FF``, upper case,
without bumble's ``/P`` type suffix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from bleak.args import SizedBuffer
from bleak.assigned_numbers import CHARACTERISTIC_PROPERTIES, CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError
from bleak.uuids import normalize_uuid_str
from bumble.controller import Controller
from bumble.core import UUID, AdvertisingData
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt_client import CharacteristicProxy
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink, Transport

log = logging.getLogger(__name__)

_RSSI_NOT_AVAILABLE = 127


def address_str(address: Address) -> str:
    return address.to_string(False).upper()


def _uuid_str(uuid: UUID) -> str:
    return normalize_uuid_str(uuid.to_hex_str("-"))


class BumbleCentral:
    """One bumble host + controller acting as the gateway's BLE adapter.

    Shared by every scanner and client of one driver, as an adapter is.
    """

    def __init__(self, device: Device, transport: Transport | None = None) -> None:
        self.device = device
        self._transport = transport
        self._scanners: list[BumbleScanner] = []
        self._power_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()  # LE allows one pending connection
        self._powered = False
        self.addresses: dict[str, Address] = {}  # as reported -> typed bumble address
        device.on(device.EVENT_ADVERTISEMENT, self._on_advertisement)

    @classmethod
    def on_link(cls, link: LocalLink, address: str = "F0:F0:F0:F0:F0:F0") -> BumbleCentral:
        """In process: a new controller on ``link`` (the simulators' link)."""
        controller = Controller("eldersafe-central", link=link)
        host = Host(controller, AsyncPipeSink(controller))
        return cls(Device(name="eldersafe-edge", address=Address(address), host=host))

    @classmethod
    async def open(cls, transport_name: str, address: str = "F0:F0:F0:F0:F0:F0") -> BumbleCentral:
        """Across processes: a bumble HCI transport by name, e.g. ``tcp-client:127.0.0.1:9100``."""
        transport = await open_transport(transport_name)
        device = Device.with_hci(
            "eldersafe-edge", Address(address), transport.source, transport.sink
        )
        return cls(device, transport)

    async def power_on(self) -> None:
        async with self._power_lock:
            if not self._powered:
                await self.device.power_on()
                self._powered = True

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._powered:
                async with asyncio.timeout(5.0):
                    await self.device.power_off()
        if self._transport is not None:
            await self._transport.close()

    def bleak_kwargs(self) -> dict[str, Any]:
        """Keyword arguments to hand to BleakScanner/BleakClient (or a driver)."""
        return {"bumble_central": self}

    async def _add_scanner(self, scanner: BumbleScanner) -> None:
        await self.power_on()
        self._scanners.append(scanner)
        if not self.device.is_scanning:
            await self.device.start_scanning(active=scanner.active, filter_duplicates=False)

    async def _remove_scanner(self, scanner: BumbleScanner) -> None:
        with contextlib.suppress(ValueError):
            self._scanners.remove(scanner)
        if not self._scanners and self.device.is_scanning:
            await self.device.stop_scanning()

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        self.addresses[address_str(advertisement.address)] = advertisement.address
        for scanner in list(self._scanners):
            scanner._on_advertisement(advertisement)


_default_central: BumbleCentral | None = None


def set_default_central(central: BumbleCentral | None) -> None:
    global _default_central
    _default_central = central


def _resolve(central: BumbleCentral | None) -> BumbleCentral:
    if central is not None:
        return central
    if _default_central is None:
        raise BleakError("no bumble central: pass bumble_central= or call set_default_central()")
    return _default_central


def _advertisement_data(adv: Advertisement) -> AdvertisementData:
    data: AdvertisingData = adv.data
    name = data.get(AdvertisingData.COMPLETE_LOCAL_NAME) or data.get(
        AdvertisingData.SHORTENED_LOCAL_NAME
    )
    manufacturer: dict[int, bytes] = {}
    for ad_type, body in data.ad_structures:
        if ad_type == AdvertisingData.MANUFACTURER_SPECIFIC_DATA and len(body) >= 2:
            manufacturer[int.from_bytes(body[:2], "little")] = bytes(body[2:])
    service_data: dict[str, bytes] = {}
    service_uuids: list[str] = []
    for ad_type, body in data.ad_structures:
        obj = AdvertisingData.ad_data_to_object(ad_type, body)
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], UUID):
            service_data[_uuid_str(obj[0])] = bytes(obj[1])
        elif isinstance(obj, list) and all(isinstance(u, UUID) for u in obj):
            service_uuids.extend(_uuid_str(u) for u in obj)
    tx_power = data.get(AdvertisingData.TX_POWER_LEVEL)
    return AdvertisementData(
        local_name=name if isinstance(name, str) else None,
        manufacturer_data=manufacturer,
        service_data=service_data,
        service_uuids=service_uuids,
        tx_power=tx_power if isinstance(tx_power, int) else None,
        rssi=adv.rssi if adv.rssi != _RSSI_NOT_AVAILABLE else -127,
        platform_data=(adv,),
    )


class BumbleScanner(BaseBleakScanner):
    """``BleakScanner(backend=BumbleScanner, bumble_central=central)``."""

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        *,
        bumble_central: BumbleCentral | None = None,
        **_kwargs: Any,  # bluez=, cb=: other backends' options
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self._central = _resolve(bumble_central)
        self.active = scanning_mode != "passive"

    async def start(self) -> None:
        self.seen_devices = {}
        await self._central._add_scanner(self)

    async def stop(self) -> None:
        await self._central._remove_scanner(self)

    def _on_advertisement(self, adv: Advertisement) -> None:
        data = _advertisement_data(adv)
        if not self.is_allowed_uuid(data.service_uuids):
            return
        address = address_str(adv.address)
        device = self.create_or_update_device(address, address, data.local_name, adv.address, data)
        self.call_detection_callbacks(device, data)


class BumbleClient(BaseBleakClient):
    """``BleakClient(device, backend=BumbleClient, bumble_central=central)``."""

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None,
        timeout: float,
        bumble_central: BumbleCentral | None = None,
        **_kwargs: Any,  # services=, bluez=, winrt=: not used here
    ) -> None:
        super().__init__(
            address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout
        )
        self._central = _resolve(bumble_central)
        details = getattr(address_or_ble_device, "details", None)
        self._peer_address: Address | None = details if isinstance(details, Address) else None
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._subscribers: dict[int, Callable[[bytes], None]] = {}

    @property
    def name(self) -> str:
        return self.address.replace(":", "-")

    @property
    def mtu_size(self) -> int:
        return self._connection.att_mtu if self._connection else 23

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        central = self._central
        await central.power_on()
        peer_address = self._peer_address or central.addresses.get(self.address.upper())
        if peer_address is None:  # never heard: assume a random static address
            peer_address = Address(self.address, Address.RANDOM_DEVICE_ADDRESS)
        try:
            async with central._connect_lock:
                connection = await central.device.connect(peer_address, timeout=self._timeout)
        except Exception as exc:
            raise BleakError(f"connect to {self.address} failed: {exc!r}") from exc
        self._connection = connection
        connection.on(connection.EVENT_DISCONNECTION, self._on_disconnection)
        try:
            peer = Peer(connection)
            await peer.discover_all()  # type: ignore[no-untyped-call]
            self._peer = peer
            self.services = self._service_collection(peer)
        except BaseException:
            await self.disconnect()
            raise

    def _service_collection(self, peer: Peer) -> BleakGATTServiceCollection:
        collection = BleakGATTServiceCollection()
        max_write = lambda: self.mtu_size - 3  # noqa: E731
        for service in peer.services:
            bleak_service = BleakGATTService(service, service.handle, _uuid_str(service.uuid))
            collection.add_service(bleak_service)
            for char in service.characteristics:
                props: list[CharacteristicPropertyName] = [
                    name for bit, name in CHARACTERISTIC_PROPERTIES.items() if char.properties & bit
                ]
                bleak_char = BleakGATTCharacteristic(
                    char, char.handle, _uuid_str(char.uuid), props, max_write, bleak_service
                )
                collection.add_characteristic(bleak_char)
                for desc in char.descriptors:
                    collection.add_descriptor(
                        BleakGATTDescriptor(desc, desc.handle, _uuid_str(desc.type), bleak_char)
                    )
        return collection

    def _on_disconnection(self, _reason: int) -> None:
        was_connected = self._connection is not None
        self._connection = None
        self._peer = None
        self._subscribers.clear()
        if was_connected and self._disconnected_callback is not None:
            self._disconnected_callback()

    async def disconnect(self) -> None:
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):  # the peer may be gone already
                    await connection.disconnect()
            self._on_disconnection(0)

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise BleakError("pairing is not supported by the bumble test backend")

    async def unpair(self) -> None:
        raise BleakError("pairing is not supported by the bumble test backend")

    def _need_peer(self) -> Peer:
        if self._peer is None:
            raise BleakError(f"{self.address}: not connected")
        return self._peer

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        return bytearray(await self._need_peer().read_value(characteristic.handle))

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        return bytearray(await self._need_peer().read_value(descriptor.handle))

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: SizedBuffer, response: bool
    ) -> None:
        await self._need_peer().write_value(characteristic.handle, bytes(data), response)

    async def write_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, data: SizedBuffer
    ) -> None:
        await self._need_peer().write_value(descriptor.handle, bytes(data), True)

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        proxy: CharacteristicProxy[bytes] = characteristic.obj

        def subscriber(value: bytes) -> None:
            callback(bytearray(value))

        await self._need_peer().subscribe(proxy, subscriber)
        self._subscribers[characteristic.handle] = subscriber

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        subscriber = self._subscribers.pop(characteristic.handle, None)
        await self._need_peer().unsubscribe(characteristic.obj, subscriber)
