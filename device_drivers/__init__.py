"""eldersafe device_drivers package."""

# Profile registration (each package registers its profiles on import).
from device_drivers import callbutton as _callbutton  # noqa: F401  es-cb1
from device_drivers import modbus as _modbus  # noqa: F401  es-ef1, es-sd1
