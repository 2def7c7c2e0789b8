"""Give each ``eldersafe server`` replica a broker account of its own, then run it.

``docker-compose up --scale server=N`` starts N identical containers, but the
broker names every session after its account (``use_username_as_clientid``,
docs/mqtt-contract.md): two replicas on one account would take each other's
session over, again and again. So each replica claims one account of
``ELDERSAFE_MQTT_SERVER_ACCOUNTS`` (JSON, user name → password; the same list
``eldersafe broker-files`` writes into the broker's password file) with a
PostgreSQL session advisory lock, keeps that connection for its whole life, and
runs its command with ``ELDERSAFE_MQTT_USERNAME`` and ``ELDERSAFE_MQTT_PASSWORD``
set. A replica that finds no free account waits and says so (add accounts, write
the broker files, then scale further).

If the lock's connection is lost the command is stopped and this exits 1, so the
container's restart policy starts it again and it claims anew: an account is
used by two live replicas at most for one check interval. A replica that took
over an account also takes over its persistent session and whatever the broker
queued for it.

``--shared`` takes the first account without a lock, for commands that only need
valid settings (``eldersafe broker-files``).

Usage: ``python server_account.py [--shared] [--check-s S] -- COMMAND [ARG …]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any

import psycopg

log = logging.getLogger("server-account")

APPLICATION_NAME = "eldersafe-server-account"


def lock_key(username: str) -> int:
    """A 64-bit advisory lock key per account name (hashtext's 32 bits could collide)."""
    digest = hashlib.sha256(f"eldersafe-server-account:{username}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def server_accounts(environ: dict[str, str]) -> dict[str, str]:
    raw = environ.get("ELDERSAFE_MQTT_SERVER_ACCOUNTS", "")
    try:
        accounts = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise SystemExit(f"ELDERSAFE_MQTT_SERVER_ACCOUNTS is not JSON: {exc}") from None
    if (
        not isinstance(accounts, dict)
        or not accounts
        or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in accounts.items())
    ):
        raise SystemExit(
            'ELDERSAFE_MQTT_SERVER_ACCOUNTS must be a JSON object {"server-1": "password", …}'
        )
    return accounts


def connect(dsn: str) -> psycopg.Connection[Any]:
    """Wait for the database (it may still be starting); keepalives notice a dead peer."""
    backoff = 0.5
    while True:
        try:
            return psycopg.connect(
                dsn,
                autocommit=True,
                connect_timeout=5,
                application_name=APPLICATION_NAME,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        except psycopg.OperationalError as exc:
            log.warning("database not reachable (%s); retrying", exc)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


def claim(conn: psycopg.Connection[Any], names: list[str]) -> str | None:
    for name in sorted(names):
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(name),)).fetchone()
        if row and row[0]:
            return name
    return None


def run(
    command: list[str], env: dict[str, str], conn: psycopg.Connection[Any] | None, check_s: float
) -> int:
    """Run ``command``; stop it when the lock's connection is lost; pass signals on."""
    child = subprocess.Popen(command, env=env)

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            code = child.wait(timeout=check_s)
            return 128 - code if code < 0 else code  # killed by a signal: as a shell says
        except subprocess.TimeoutExpired:
            pass
        if conn is None:
            continue
        try:
            conn.execute("SELECT 1")
        except psycopg.Error as exc:
            log.error("lost the account lock's connection (%s): stopping the server", exc)
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", action="store_true", help="take the first account, no lock")
    parser.add_argument("--check-s", type=float, default=2.0, help="lock connection check")
    parser.add_argument("--wait-s", type=float, default=5.0, help="retry when none is free")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    accounts = server_accounts(env)
    conn: psycopg.Connection[Any] | None = None
    if args.shared:
        name = sorted(accounts)[0]
    else:
        dsn = env.get("ELDERSAFE_DATABASE_URL", "")
        if not dsn:
            raise SystemExit("ELDERSAFE_DATABASE_URL is not set")
        while True:
            conn = connect(dsn)
            chosen = claim(conn, list(accounts))
            if chosen is not None:
                name = chosen
                break
            conn.close()
            log.warning(
                "every server account (%s) is held by a running server; waiting for one",
                ", ".join(sorted(accounts)),
            )
            time.sleep(args.wait_s)
        log.info("this server uses broker account %s", name)
    env["ELDERSAFE_MQTT_USERNAME"] = name
    env["ELDERSAFE_MQTT_PASSWORD"] = accounts[name]
    return run(args.command, env, conn, args.check_s)


if __name__ == "__main__":
    sys.exit(main())
