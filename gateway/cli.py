"""The ``eldersafe`` command: one subcommand per process or administrative task."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Settings


def _settings() -> Settings:
    from gateway.config import Settings

    return Settings()


def cmd_migrate(args: argparse.Namespace) -> int:
    from gateway.db.migrate import migrate

    settings = _settings()
    applied = migrate(args.database_url or settings.database_url)
    print(f"migrations applied: {applied or 'none (up to date)'}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from gateway.server import run_server

    run_server(_settings())
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from gateway.contract import schemas_io

    if args.check:
        stale = [
            name
            for name, text in schemas_io.render().items()
            if not (schemas_io.SCHEMA_DIR / name).exists()
            or (schemas_io.SCHEMA_DIR / name).read_text() != text
        ]
        if stale:
            print(f"schemas out of date: {stale}; run 'eldersafe schemas'", file=sys.stderr)
            return 1
        print("schemas up to date")
        return 0
    for path in schemas_io.write():
        print(path)
    return 0


def cmd_gateway_add(args: argparse.Namespace) -> int:
    from gateway.broker_auth import gateway_username
    from gateway.registry import add_gateway

    password = add_gateway(_settings().database_url, args.id, args.site)
    print(f"gateway {args.id} registered for site {args.site}")
    print(f"broker user:     {gateway_username(args.id)}")
    print(f"broker password: {password}")
    print("(the password is shown only now; run `eldersafe broker-files` and reload the broker)")
    return 0


def cmd_broker_files(args: argparse.Namespace) -> int:
    from gateway.broker_auth import write_broker_files
    from gateway.registry import broker_accounts

    settings = _settings()
    accounts = broker_accounts(settings.database_url, settings.server_accounts())
    write_broker_files(accounts, Path(args.password_file), Path(args.acl_file))
    servers = sorted(a.username for a in accounts if a.site is None)
    print(
        f"{len(accounts)} broker accounts written (server accounts: {', '.join(servers)});"
        " reload the broker (SIGHUP)"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(Path(args.state_dir), seconds=args.seconds, api_port=args.api_port)


def cmd_edge(args: argparse.Namespace) -> int:
    from gateway.edge.config import ConfigError
    from gateway.edge.main import run_edge

    try:
        return run_edge(Path(args.config))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


def cmd_simulate(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.simulate import BrokerLogin, run_scenario
    from simulators.scenario import load_scenario

    password = os.environ.get(args.password_env or "", args.password or "")
    broker = BrokerLogin(args.host, args.port, args.username, password)
    return asyncio.run(run_scenario(load_scenario(args.scenario), broker, Path(args.state_dir)))


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.alerts.audit_verify import verify

    rows, problems = verify(args.database_url or _settings().database_url)
    for problem in problems:
        print(problem.message)
    if problems:
        print(f"audit log TAMPERED: {len(problems)} chain(s) broken, {rows} rows read")
        return 1
    print(f"audit log intact: {rows} rows verified")
    return 0


def cmd_district_import(args: argparse.Namespace) -> int:
    import psycopg

    from gateway.alerts.district import DistrictFileError, import_district, load

    try:
        counts = import_district(_settings().database_url, load(Path(args.file)))
    except (DistrictFileError, psycopg.Error, OSError) as exc:
        print(f"district import refused, nothing changed: {exc}", file=sys.stderr)
        return 1
    print("district imported: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


def cmd_staff_password(args: argparse.Namespace) -> int:
    import psycopg

    from gateway.api.security import hash_password

    # Never on the command line (ps and shell history would show it).
    password = os.environ.get(args.password_env, "") if args.password_env \
        else sys.stdin.readline().rstrip("\r\n")
    if len(password) < 10:
        print("refused: a password needs at least 10 characters", file=sys.stderr)
        return 1
    with psycopg.connect(args.database_url or _settings().database_url) as conn:
        # a new password ends every token issued before (token_version)
        done = conn.execute(
            "UPDATE staff SET password_hash = %s, token_version = token_version + 1"
            " WHERE id = %s RETURNING id", (hash_password(password), args.id)).fetchone()
    if done is None:
        print(f"refused: no staff member {args.id!r}", file=sys.stderr)
        return 1
    print(f"password set for {args.id}; their earlier tokens no longer work")
    return 0


def cmd_api_key_add(args: argparse.Namespace) -> int:
    import psycopg

    from gateway.api.security import api_key_digest, new_api_key

    key = new_api_key()
    try:
        with psycopg.connect(args.database_url or _settings().database_url) as conn:
            conn.execute(
                "INSERT INTO api_keys (id, name, organisation_id, role, key_sha256)"
                " VALUES (%s, %s, %s, %s, %s)",
                (args.id, args.name or args.id, args.org, args.role, api_key_digest(key)))
    except psycopg.Error as exc:
        print(f"refused: {exc.diag.message_primary or exc}", file=sys.stderr)
        return 1
    print(key)  # shown once: only its SHA-256 is stored
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eldersafe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="apply pending database migrations")
    p.add_argument("--database-url")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("server", help="run ingest, retention and metrics")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("schemas", help="write (or --check) the payload JSON Schemas")
    p.add_argument("--check", action="store_true")
    p.set_defaults(func=cmd_schemas)

    p = sub.add_parser(
        "gateway-add", help="register a gateway and print its broker user name and password"
    )
    p.add_argument("--id", required=True)
    p.add_argument("--site", required=True)
    p.set_defaults(func=cmd_gateway_add)

    p = sub.add_parser("broker-files", help="write Mosquitto's password and ACL files")
    p.add_argument("--password-file", required=True)
    p.add_argument("--acl-file", required=True)
    p.set_defaults(func=cmd_broker_files)

    p = sub.add_parser("demo", help="run the local demo (own broker and database)")
    p.add_argument("--state-dir", default=".local/demo")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop after this long (default: run until Ctrl-C)")
    p.add_argument("--api-port", type=int, default=None,
                   help="the console's port (default ELDERSAFE_API_PORT or 8000; a free one"
                   " if taken)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("edge", help="run a site's edge gateway (drivers, outbox, MQTT)")
    p.add_argument("--config", required=True, help="site config YAML")
    p.set_defaults(func=cmd_edge)

    p = sub.add_parser("simulate", help="run a scenario: simulated devices and an edge")
    p.add_argument("scenario", help="a scenario name (simulators/scenarios) or a YAML file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--username", required=True, help="the site gateway's broker account")
    p.add_argument("--password")
    p.add_argument("--password-env", help="read the password from this environment variable")
    p.add_argument("--state-dir", default=".local/simulate")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("audit", help="alert audit log tools")
    audit = p.add_subparsers(dest="audit_command", required=True)
    p = audit.add_parser("verify", help="check every hash chain; name edited/inserted/deleted rows")
    p.add_argument("--database-url")
    p.set_defaults(func=cmd_audit_verify)
    p = sub.add_parser("staff-password",
                       help="set a staff member's password (from stdin or --password-env)")
    p.add_argument("id")
    p.add_argument("--password-env", help="read the password from this environment variable")
    p.add_argument("--database-url")
    p.set_defaults(func=cmd_staff_password)
    p = sub.add_parser("api-key-add", help="create an integration's API key; printed once")
    p.add_argument("--id", required=True)
    p.add_argument("--org", required=True, help="the organisation it acts within")
    p.add_argument("--role", required=True,
                   choices=["duty", "supervisor", "street", "bureau", "admin"])
    p.add_argument("--name")
    p.add_argument("--database-url")
    p.set_defaults(func=cmd_api_key_add)
    p = sub.add_parser("district-import", help="load a district (YAML/JSON) idempotently")
    p.add_argument("file")
    p.set_defaults(func=cmd_district_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
