"""eldersafe device_drivers package.

Importing it registers the shipped profiles and driver kinds (each package does
so on import); a vendor's module does the same for its own (see ``kinds``).
"""

from device_drivers import callbutton as _callbutton  # noqa: F401  es-cb1, kind callbutton
from device_drivers import modbus as _modbus  # noqa: F401  es-ef1, es-sd1, kind modbus
from device_drivers import wristband as _wristband  # noqa: F401  es-wb1, kind wristband
