"""A private PostgreSQL 15 + TimescaleDB cluster: own data and socket directory, free port.

PostgreSQL refuses to run as root, so when we are root the cluster belongs to
the ``postgres`` system user. Authentication is ``trust`` on loopback and the
private socket only: these clusters exist for the demo and the tests.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.local.ports import free_port, wait_listening

PG_BIN = Path(os.environ.get("ELDERSAFE_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _as_owner(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


@dataclass
class PostgresInstance:
    directory: Path
    port: int = 0
    database: str = "eldersafe"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "run"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            _as_owner([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), *args]),
            check=check,
            capture_output=True,
        )

    def init(self) -> None:
        """Create the cluster once (idempotent) with TimescaleDB preloaded."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        _chown_to_postgres(self.directory)
        self.socket_dir.mkdir(exist_ok=True)
        _chown_to_postgres(self.socket_dir)
        if not self.port:
            self.port = free_port()
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                _as_owner(
                    [
                        str(PG_BIN / "initdb"),
                        "-D",
                        str(self.data_dir),
                        "-U",
                        "postgres",
                        "-A",
                        "trust",
                        "-E",
                        "UTF8",
                        "--locale=C",
                    ]
                ),
                check=True,
                capture_output=True,
            )
        conf = self.data_dir / "postgresql.auto.conf"
        settings = {
            "shared_preload_libraries": "'timescaledb'",
            "timescaledb.telemetry_level": "off",
            # the Apache-2 edition runs no jobs; idle workers would also hold the
            # template database open and block CREATE DATABASE ... TEMPLATE
            "timescaledb.max_background_workers": "0",
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "on",
            "synchronous_commit": "on",
            "max_connections": "200",
            "shared_buffers": "256MB",
            "logging_collector": "off",
        }
        text = "".join(f"{k} = {v}\n" for k, v in settings.items())
        conf.write_text(text)
        _chown_to_postgres(conf)

    def start(self) -> None:
        self._pg_ctl("-l", str(self.directory / "postgres.log"), "-w", "-t", "60", "start")
        wait_listening(self.port)
        self._ensure_database()

    def _ensure_database(self) -> None:
        psql = _as_owner(
            [
                str(PG_BIN / "psql"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                "postgres",
            ]
        )
        exists = subprocess.run(
            [*psql, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"],
            check=True,
            capture_output=True,
        ).stdout.strip()
        if exists != b"1":
            subprocess.run(
                [*psql, "-c", f'CREATE DATABASE "{self.database}"'], check=True, capture_output=True
            )

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._pg_ctl("-m", mode, "-w", "stop", check=False)

    def running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def wait_stopped(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
