"""District files and policy overrides as data: what is accepted, what is refused and why."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from alerting.model import AlertStatus, Channel
from alerting.policy import Role
from gateway.alerts.directory import policy_from_json
from gateway.alerts.district import DistrictFileError, load

POLICY = {
    "name": "institution-fast",
    "levels": [
        {"after_s": 0, "roles": ["duty"], "channels": ["console"]},
        {"after_s": 30, "roles": ["supervisor"], "channels": ["console", "voice"]},
    ],
    "remind_every_s": 300,
}


def test_policy_override_round_trips_as_data() -> None:
    policy = policy_from_json(POLICY)
    assert policy.name == "institution-fast"
    assert [lv.after for lv in policy.levels] == [timedelta(0), timedelta(seconds=30)]
    assert policy.levels[1].roles == (Role.SUPERVISOR,)
    assert policy.levels[1].channels == (Channel.CONSOLE, Channel.VOICE)
    assert policy.remind_every == timedelta(minutes=5)
    assert policy.ladder_until is AlertStatus.ACKNOWLEDGED
    assert policy.on_scene_within is None


@pytest.mark.parametrize(
    "bad",
    [
        {**POLICY, "levels": []},
        {**POLICY, "levels": [{"after_s": 60, "roles": ["duty"], "channels": ["console"]},
                              {"after_s": 0, "roles": ["duty"], "channels": ["console"]}]},
        {**POLICY, "levels": [{"after_s": 0, "roles": ["nobody"], "channels": ["console"]}]},
        {**POLICY, "remind_every_s": 0},
    ],
)  # fmt: skip
def test_policy_override_refused_with_a_reason(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        policy_from_json(bad)


def test_district_file_yaml_and_json_load_alike(tmp_path: Path) -> None:
    doc = {
        "organisations": [{"id": "bureau", "kind": "bureau", "name": "局"}],
        "sites": [{"id": "site-a", "organisation": "bureau", "name": "家"}],
        "shifts": [{"staff": "duty-1", "starts_at": "2026-11-23T08:00:00+08:00",
                    "ends_at": "2026-11-23T20:00:00+08:00"}],
    }  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps(doc, ensure_ascii=False))
    (tmp_path / "d.yaml").write_text(
        "organisations:\n  - {id: bureau, kind: bureau, name: 局}\n"
        "sites:\n  - {id: site-a, organisation: bureau, name: 家}\n"
        "shifts:\n  - {staff: duty-1, starts_at: '2026-11-23T08:00:00+08:00',"
        " ends_at: '2026-11-23T20:00:00+08:00'}\n",
        encoding="utf-8",
    )
    assert load(tmp_path / "d.json") == load(tmp_path / "d.yaml")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("organisations: [{id: BAD ID, kind: bureau, name: x}]", "id"),
        ("organisations: [{id: b, kind: empire, name: x}]", "kind"),
        ("shifts: [{staff: a, starts_at: '2026-11-23T08:00:00', ends_at: '2026-11-23T09:00:00'}]",
         "timezone"),
        ("sites: [{id: s, organisation: b, name: x, colour: red}]", "colour"),
        ("organisations: [unclosed", "YAML"),
    ],
)  # fmt: skip
def test_district_file_refused_naming_the_problem(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(text)
    with pytest.raises(DistrictFileError, match=why):
        load(path)
