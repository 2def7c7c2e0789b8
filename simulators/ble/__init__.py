"""Virtual BLE radio for the simulators: share a bumble link with another process.

In process, simulated wristbands and the driver's central share a ``LocalLink``
(the central comes from ``device_drivers.ble.bumble_backend``). Across
processes the simulator process owns the link and exposes one HCI transport on
it (``expose_link``); the edge opens it by name with
``BumbleCentral.open("tcp-client:127.0.0.1:9100")``.
"""

from __future__ import annotations

from bumble.controller import Controller
from bumble.link import LocalLink
from bumble.transport import open_transport
from bumble.transport.common import Transport

__all__ = ["expose_link"]


async def expose_link(link: LocalLink, transport_name: str) -> Transport:
    """Attach a controller to ``link`` whose host side is an HCI transport.

    A host in another process (``BumbleCentral.open`` with the matching
    ``tcp-client:`` name) then sees the link's peripherals as if local. Close
    the returned transport to stop.
    """
    transport = await open_transport(transport_name)
    Controller("exposed", host_source=transport.source, host_sink=transport.sink, link=link)
    return transport
