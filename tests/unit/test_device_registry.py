"""Device knowledge lives in the driver packages; the edge only iterates their registry."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from device_drivers.kinds import all_kinds, get_kind
from device_drivers.model import DecodeError
from device_drivers.profiles import all_profiles, get
from gateway.edge import drivers as driver_factory
from gateway.edge.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def site(*drivers: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "site": "site-a",
        "gateway": "gw-a",
        "state_dir": "/tmp/unused",
        "broker": {"username": "gw-gw-a", "password": "x"},
        "drivers": list(drivers),
        **extra,
    }


def test_every_shipped_profile_is_carried_by_exactly_one_kind() -> None:
    kinds = all_kinds()
    assert {"callbutton", "modbus", "wristband"} <= set(kinds)
    for name in ("es-cb1", "es-ef1", "es-sd1", "es-wb1"):
        carriers = [k for k, model in kinds.items() if get(name).transport == model.TRANSPORT]
        assert len(carriers) == 1, (name, carriers)
    assert get_kind("callbutton").DEFAULT_PROFILE == "es-cb1"
    assert get_kind("modbus").DEFAULT_PROFILE is None  # a bus mixes models: say which


def test_an_unquoted_all_digit_address_is_refused_naming_the_device(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(  # as a new user writes it, from the docs' example
        "site: site-a\n"
        "gateway: gw-a\n"
        "state_dir: state\n"
        "broker: {username: gw-gw-a, password: x}\n"
        "drivers:\n"
        "  - name: hall\n"
        "    kind: callbutton\n"
        "    port: /dev/ttyUSB0\n"
        "    devices:\n"
        "      - {id: receiver-hall, address: receiver}\n"
        "      - {id: btn-room-12, address: 00012345}\n"  # YAML 1.1: octal 5349
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "btn-room-12" in message and "quote" in message and "5349" in message
    assert "000014e5" not in message  # the old loader named an address nobody wrote
    path.write_text(path.read_text().replace("00012345", '"00012345"'))
    config = load_config(path)
    assert config.drivers[0].devices[1].address == "00012345"


def test_kind_specific_rules_come_from_the_kinds() -> None:
    def refused(driver: dict[str, Any], needle: str) -> None:
        with pytest.raises(ConfigError, match=needle):
            parse_config(site(driver))

    refused(
        {"name": "x", "kind": "zigbee", "devices": [{"id": "a", "address": "b"}]},
        "kind 'zigbee' is not one of",
    )
    modbus = {"name": "bus", "kind": "modbus", "port": "socket://127.0.0.1:1"}
    refused(
        {**modbus, "devices": [{"id": "s", "address": "unit-300", "profile": "es-sd1"}]},
        "unit-1 … unit-247",
    )
    refused({**modbus, "devices": [{"id": "s", "address": "unit-3"}]}, "needs a profile")
    refused(
        {**modbus, "devices": [{"id": "s", "address": "unit-3", "profile": "es-wb1"}]},
        "not 'es-wb1'",
    )
    refused(
        {"name": "ble", "kind": "wristband", "devices": [{"id": "w", "address": "AA:BB"}]},
        "AA:BB:CC:DD:EE:FF",
    )
    with pytest.raises(ConfigError, match="plugin module 'no_such_vendor' cannot be imported"):
        parse_config(site({**modbus, "devices": []}, plugins=["no_such_vendor"]))


def test_a_vendor_profile_from_a_plugin_module_runs_on_the_modbus_kind() -> None:
    config = parse_config(
        site(
            {
                "name": "bus",
                "kind": "modbus",
                "port": "socket://127.0.0.1:1",
                "devices": [
                    {"id": "smoke-acme", "address": "UNIT-7", "profile": "acme-as200"},
                    {"id": "smoke-es", "address": "unit-8", "profile": "es-sd1"},
                ],
            },
            plugins=["vendor_acme"],
        )
    )
    (bus,) = config.drivers
    assert [d.address for d in bus.devices] == ["unit-7", "unit-8"]  # the kind normalises
    assert get("acme-as200").commands == {"hush"}
    slots, routes = driver_factory.build(config)
    (slot,) = slots
    assert type(slot.driver).__name__ == "ModbusBusDriver"
    assert slot.down_offline_after_s == 3 * (1.0 + 1.0)
    assert [r.address for r in routes["smoke-acme"]] == ["unit-7"]


def test_the_vendor_decoder_is_pure_and_strict() -> None:
    import vendor_acme

    state = vendor_acme.decode_as200([43, 450, 1 << 7 | 1 << 6, 2900])
    assert state == vendor_acme.AS200State(
        smoke=True,
        head_fault=False,
        battery_low=False,
        silenced=True,
        temperature_c=21.5,
        smoke_density_db_m=0.45,
        battery_mv=2900,
    )
    assert all_profiles()["acme-as200"].decoder is vendor_acme.decode_as200
    with pytest.raises(DecodeError):
        vendor_acme.decode_as200([1, 2, 3])


def test_the_edge_names_no_driver_kind_profile_or_address_form() -> None:
    literal = re.compile(r"""["'](callbutton|modbus|wristband|receiver|es-[a-z]{2}\d|unit-)""")
    for path in (REPO / "gateway" / "edge").glob("*.py"):
        found = literal.findall(path.read_text())
        assert not found, (path.name, found)


def test_the_production_edge_imports_no_simulator() -> None:
    code = (
        "import sys\n"
        "from gateway.edge import main, drivers\n"
        "from gateway.edge.config import parse_config\n"
        "cfg = {'site': 's', 'gateway': 'g', 'state_dir': '/tmp/unused',\n"
        "       'broker': {'username': 'gw-g', 'password': 'x'}, 'drivers': [\n"
        "  {'name': 'ble', 'kind': 'wristband', 'backend': 'bumble',\n"
        "   'bumble_transport': 'tcp-client:127.0.0.1:1',\n"
        "   'devices': [{'id': 'w', 'address': 'aa:bb:cc:dd:ee:ff'}]}]}\n"
        "drivers.build(parse_config(cfg))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'simulators'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
