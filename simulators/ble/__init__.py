"""The project's bleak backend over bumble, and helpers to share a bumble link.

In process::

    link = LocalLink()
    central = BumbleCentral.on_link(link)
    BleakScanner(cb, backend=BumbleScanner, bumble_central=central)

Across processes the simulator process owns the link and exposes one HCI
transport on it (``expose_link``); the edge opens it by name with
``await BumbleCentral.open("tcp-client:127.0.0.1:9100")``.
"""

from __future__ import annotations

from bumble.controller import Controller
from bumble.link import LocalLink
from bumble.transport import open_transport
from bumble.transport.common import Transport

from simulators.ble.backend import (
    BumbleCentral,
    BumbleClient,
    BumbleScanner,
    address_str,
    set_default_central,
)

__all__ = [
    "BumbleCentral",
    "BumbleClient",
    "BumbleScanner",
    "address_str",
    "expose_link",
    "set_default_central",
]


async def expose_link(link: LocalLink, transport_name: str) -> Transport:
    """Attach a controller to ``link`` whose host side is an HCI transport.

    A host in another process (``BumbleCentral.open`` with the matching
    ``tcp-client:`` name) then sees the link's peripherals as if local. Close
    the returned transport to stop.
    """
    transport = await open_transport(transport_name)
    Controller("exposed", host_source=transport.source, host_sink=transport.sink, link=link)
    return transport
