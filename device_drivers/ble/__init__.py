"""BLE transports for the drivers that speak bleak's API.

``bumble_backend`` is a bleak backend over bumble's software BLE stack. It is a
transport, not a simulator: bumble also drives real USB HCI controllers
(``usb:0``) and remote ones (``tcp-client:…``), so the edge can run the same
wristband driver on an adapter BlueZ does not own. Imported lazily (bumble
takes about half a second to import).
"""
