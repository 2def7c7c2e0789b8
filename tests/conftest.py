"""Session fixtures: a real PostgreSQL + TimescaleDB cluster and real Mosquitto brokers.

Nothing here uses services already running on the machine: every instance runs
in its own temporary directory on a free loopback port and is torn down after.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from support import ServerProcess, accounts_for_tests

from gateway.db.migrate import migrate
from gateway.local.mosquitto import MosquittoInstance
from gateway.local.postgres import PostgresInstance

TEMPLATE = "eldersafe_template"


def _tempdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)  # the postgres and mosquitto users must reach it
    return path


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A temporary directory the postgres and mosquitto users can reach (unlike tmp_path)."""
    path = _tempdir("eldersafe-svc-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresInstance]:
    directory = _tempdir("eldersafe-pg-")
    pg = PostgresInstance(directory, database=TEMPLATE)
    pg.init()
    pg.start()
    migrate(pg.dsn)
    _seal_template(pg)
    yield pg
    pg.stop("immediate")
    shutil.rmtree(directory, ignore_errors=True)


def _seal_template(pg: PostgresInstance) -> None:
    """CREATE DATABASE ... TEMPLATE refuses a template anyone is connected to, and the
    migration's session may still be closing: the template takes no connections from
    now on, and PostgreSQL itself waits until the last one has ended (the timeout of
    pg_terminate_backend), so no copy of it ever has to be retried."""
    admin = pg.dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{TEMPLATE}" WITH ALLOW_CONNECTIONS false')
        conn.execute(
            "SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity WHERE datname = %s",
            (TEMPLATE,),
        )


def create_database(pg: PostgresInstance) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = pg.dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    return pg.dsn.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def database(pg_cluster: PostgresInstance) -> Iterator[str]:
    """A fresh, migrated database for one test, dropped after it (hundreds of them would
    otherwise fill the disk and take the session's end a minute to delete)."""
    dsn = create_database(pg_cluster)
    yield dsn
    admin = pg_cluster.dsn.rsplit("/", 1)[0] + "/postgres"
    name = dsn.rsplit("/", 1)[1]
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error:
        pass  # a server the test left running may hold it; the session's end removes it


@pytest.fixture
def broker() -> Iterator[MosquittoInstance]:
    """A fresh Mosquitto with the project's generated password and ACL files."""
    directory = _tempdir("eldersafe-mqtt-")
    instance = MosquittoInstance(directory)
    instance.configure(accounts_for_tests())
    instance.start()
    yield instance
    instance.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def make_server(server_factory: list[ServerProcess], tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(dsn: str, port: int, username: str = "server", **extra_env: str) -> ServerProcess:
        server = ServerProcess(
            dsn,
            port,
            tmp_path / f"server-{len(server_factory)}.log",
            username=username,
            extra_env=dict(extra_env),
        )
        server_factory.append(server)
        return server

    return make
