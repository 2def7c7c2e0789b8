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

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
from playwright.sync_api import sync_playwright
from support import wait_for

from gateway.demo_district import DEMO_PASSWORD
from gateway.local.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "demo-console.png"  # a copy: docs/screenshots/
WATCHER = "bureau-chen"  # the bureau's user sees the whole district
CHROMIUM_ARGS = [  # ../shared/notes/tooling.md: Debian's chromium, nothing fetched
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def login(api: str, user: str = WATCHER) -> dict[str, str] | None:
    try:
        answer = httpx.post(f"{api}/api/auth/login", timeout=5,
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
        wait_for(lambda: demo.poll() is not None or login(api) is not None, 180,
                 "the demo's API to take a demo login")  # fmt: skip
        assert demo.poll() is None, out_path.read_text(errors="replace")
        headers = login(api)
        assert headers is not None
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
