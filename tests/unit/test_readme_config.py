"""The README's configuration table names every setting the processes read."""

from __future__ import annotations

from pathlib import Path

from gateway.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme() -> None:
    text = README.read_text()
    missing = [f"ELDERSAFE_{name.upper()}" for name in Settings.model_fields
               if f"`ELDERSAFE_{name.upper()}`" not in text]  # fmt: skip
    assert not missing, f"README's configuration table lacks {missing}"
