"""``make demo`` (issue 9, point 4): the demo district runs with scripted staff, its console
shows live alerts in a real browser, and Ctrl-C leaves nothing behind.

The demo runs as ``eldersafe demo`` in a child process with its own state directory
(its own TimescaleDB cluster and Mosquitto) and its own API port. Everything is read
through the staff API as a demo person would: alerts raised by the scenario edges and
the other homes, an alert that climbed the demo's ladder (level >= 1: nobody answered
in 15 s), and one acknowledged by a scripted duty person. Then the console in Debian's
Chromium with a demo login, until it shows live alerts (the screenshot the README
uses). Then SIGINT, as Ctrl-C sends it, and every process of the demo's tree (collected
before the signal), and the database cluster it started, must be gone.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from playwright.sync_api import sync_playwright
from support import wait_for

from alerting.model import AlertType, Severity
from alerting.policy import PolicyBook
from gateway.alerts.directory import load_policy_book
from gateway.alerts.district import District, import_district
from gateway.demo_district import (
    CARE_UNITS,
    DEMO_PASSWORD,
    HOMES,
    LADDER_S,
    demo_district,
    on_shift,
)
from gateway.demo_staff import ScriptedStaff
from gateway.local.ports import free_port
from simulators.scenario import all_scenarios, load_scenario

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "demo-console.png"  # a copy: docs/screenshots/
WATCHER = "bureau-chen"  # the bureau's user sees the whole district
CHROMIUM_ARGS = [  # ../shared/notes/tooling.md: Debian's chromium, nothing fetched
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def login(api: str, user: str = WATCHER) -> dict[str, str] | None:
    try:
        answer = httpx.post(f"{api}/api/auth/login", timeout=30,
                            json={"username": user, "password": DEMO_PASSWORD})  # fmt: skip
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def alerts(api: str, headers: dict[str, str]) -> list[dict[str, Any]] | None:
    """The newest 200 alerts; None when the (shared, busy) machine answers too slowly."""
    try:
        answer = httpx.get(f"{api}/api/alerts", params={"limit": 200}, headers=headers,
                           timeout=30)  # fmt: skip
    except httpx.TimeoutException:
        return None
    assert answer.status_code == 200, answer.text
    return list(answer.json()["items"])


def console_screenshot(api: str, user: str = WATCHER) -> int:
    """Log in to the demo's console in Chromium as a demo person, wait for live alerts on
    it, take the screenshot; returns how many alert cards it shows."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
            page.goto(f"{api}/console/")
            page.fill("#username", user)
            page.fill("#password", DEMO_PASSWORD)
            page.click("#login-submit")
            page.wait_for_selector('body[data-feed="live"]', timeout=60_000)
            page.locator(".alert-card").first.wait_for(timeout=90_000)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
            return page.locator(".alert-card").count()
        finally:
            browser.close()


def demo_tree(demo: subprocess.Popen[bytes], state_dir: Path) -> list[psutil.Process]:
    """The demo, its descendants (server, edges, broker) and the database cluster, which
    ``pg_ctl`` starts in a session of its own (so it is not a descendant)."""
    me = psutil.Process(demo.pid)
    tree = [me, *me.children(recursive=True)]
    pid_file = state_dir / "postgres" / "data" / "postmaster.pid"
    postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
    return [*tree, postmaster, *postmaster.children(recursive=True)]


def test_demo_raises_escalates_and_acknowledges_and_sigint_leaves_no_process(
    service_dir: Path,
) -> None:
    port = free_port()
    state_dir = service_dir / "demo"
    out_path = service_dir / "demo.out"
    with out_path.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "demo", "--state-dir", str(state_dir),
             "--api-port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    try:
        signed_in: list[dict[str, str]] = []

        def up_and_signed_in() -> bool:
            headers = login(api)
            signed_in.extend([headers] if headers else [])
            return demo.poll() is not None or headers is not None

        wait_for(up_and_signed_in, 180, "the demo's API to take a demo login")
        assert demo.poll() is None, out_path.read_text(errors="replace")
        headers = signed_in[-1]
        seen: list[dict[str, Any]] = []

        def raised_escalated_acknowledged() -> bool:
            seen[:] = alerts(api, headers) or seen
            return (
                any(a["level"] >= 1 for a in seen)
                and any((a["acknowledged_by"] or "").startswith("staff:duty-") for a in seen)
                and len({a["site"]["id"] for a in seen}) >= 2
            )

        try:
            wait_for(raised_escalated_acknowledged, 90, "alerts raised, escalated and "
                     "acknowledged by the scripted staff", interval=1.0)  # fmt: skip
        except AssertionError:
            brief = [(a["type"], a["site"]["id"], a["level"], a["acknowledged_by"]) for a in seen]
            tail = out_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"alerts: {brief}\n{tail}") from None
        printed = out_path.read_text(errors="replace")
        assert f"http://127.0.0.1:{port}/console/" in printed
        for person in ("duty-xinhua-", "sup-xinhua", "street-huamu", WATCHER):
            assert person in printed, printed

        # the console, as a newcomer opens it: live alerts from the scripted district
        assert console_screenshot(api) >= 1

        tree = demo_tree(demo, state_dir)
        assert len(tree) >= 7, tree  # demo, server, four edges, broker, database
        demo.send_signal(signal.SIGINT)
        assert demo.wait(120) == 0, out_path.read_text(errors="replace")[-3000:]
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert alive == [], [(p.pid, p.cmdline()) for p in alive if p.is_running()]
    finally:
        if demo.poll() is None:  # a failed assertion: still stop the demo the clean way
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(120)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()


# ------------------------------------------------------- the district and the staff's script


def district() -> District:
    return demo_district([load_scenario(n) for n in all_scenarios()])


def test_one_duty_person_is_on_shift_at_every_station_and_the_care_home_all_week() -> None:
    d = district()
    unit_of = {s.id: s.organisation for s in d.staff}
    start = datetime.now(UTC)
    for step in range(0, 6 * 24 * 3, 1):  # every 20 minutes for six days
        at = start + timedelta(minutes=20 * step)
        on = on_shift(d, at)
        assert sorted(unit_of[s] for s in on) == sorted(CARE_UNITS), (at, on)


def test_the_district_has_its_homes_devices_and_people_and_no_name_in_a_site_name() -> None:
    d = district()
    kinds = [o.kind for o in d.organisations]
    assert (kinds.count("bureau"), kinds.count("street"), kinds.count("station"),
            kinds.count("institution")) == (1, 2, 4, 1)  # fmt: skip
    homes = {s.id for s in d.sites if s.kind == "home"}
    assert len(homes) == HOMES
    profiles_at: dict[str, set[str]] = {}
    for dev in d.devices:
        profiles_at.setdefault(dev.site, set()).add(dev.profile)
    assert all({"es-wb1", "es-cb1"} <= profiles_at[h] for h in homes - {"home-zhao", "home-li"})
    assert sum("es-sd1" in p for p in profiles_at.values()) >= 10
    assert sum("es-ef1" in p for p in profiles_at.values()) >= 10
    assert all(r.family for r in d.residents)
    names = {r.name for r in d.residents} | {f.name for r in d.residents for f in r.family}
    assert not [s.name for s in d.sites if any(n in s.name for n in names)]
    for sc in (load_scenario(n) for n in all_scenarios()):  # the edges' devices are registered
        registered = {dev.id for dev in d.devices if dev.site == sc.site}
        assert {dev.id for dev in sc.devices} <= registered


def test_the_demo_ladder_replaces_every_default_smoke_included(database: str) -> None:
    import_district(database, district())

    async def book() -> PolicyBook:
        async with await psycopg.AsyncConnection.connect(database) as conn:
            return await load_policy_book(conn)

    policies = asyncio.run(book())
    path = ["inst-anyang", "street-huamu", "bureau-donghu"]
    for alert_type, severity in ((AlertType.SMOKE, Severity.CRITICAL),
                                 (AlertType.FALL, Severity.CRITICAL),
                                 (AlertType.ELECTRICAL, Severity.MAJOR)):  # fmt: skip
        ladder = policies.resolve(path, alert_type, severity).levels
        assert [lv.after.total_seconds() for lv in ladder] == list(LADDER_S)


def test_scripted_duty_misses_the_second_of_every_four_and_passes_on_a_cancelled_miss() -> None:
    staff = ScriptedStaff("http://unused", DEMO_PASSWORD, lambda at: [], [])
    assert [staff.next_is_miss() for _ in range(10)] == [
        False, True, False, False, False, True, False, False, False, True]  # fmt: skip
    staff.misses_owed += 1  # the missed alert was cancelled by the resident before escalating
    assert [staff.next_is_miss() for _ in range(4)] == [True, False, False, True]
