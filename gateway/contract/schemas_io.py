"""Writing and checking the committed JSON Schemas (a test fails when they drift)."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.contract.payloads import json_schemas

SCHEMA_DIR = Path(__file__).with_name("schemas")


def render() -> dict[str, str]:
    return {
        f"{name}.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in json_schemas().items()
    }


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in render().items():
        path = directory / filename
        path.write_text(text)
        written.append(path)
    return written
