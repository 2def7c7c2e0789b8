"""docker-compose.yml against the repository it deploys (no Docker engine needed).

Debian's docker-compose validates the file (keys, interpolation, depends_on); these
tests check what it cannot: every mounted file exists, the eldersafe services'
environment names are settings the code reads and their values pass the settings'
own checks, the ports agree with the settings and with Prometheus's targets, the
broker reads its files where the admin step writes them, and Prometheus's config
passes promtool. The server-account picker and Grafana's read-only role run for
real against PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict
from support import wait_for

from gateway.config import Settings
from gateway.db.migrate import migrate

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ELDERSAFE_IMAGE = "eldersafe:local"
ACCOUNTS = {"server-1": "s1-" + "x" * 20, "server-2": "s2-" + "y" * 20}
# Values for every ${…:?} the file demands (as a deployment's .env gives them).
SECRETS = {
    "ELDERSAFE_DB_PASSWORD": "db-password-0123456789",
    "ELDERSAFE_GRAFANA_DB_PASSWORD": "grafana-db-0123456789",
    "ELDERSAFE_GRAFANA_ADMIN_PASSWORD": "grafana-admin-0123456789",
    "ELDERSAFE_MQTT_SERVER_ACCOUNTS": json.dumps(ACCOUNTS),
    "ELDERSAFE_API_TOKEN_SECRET": "t" * 40,
    "ELDERSAFE_BUREAU_WEBHOOK_SECRET": "bureau-webhook-0123456789",
    "ELDERSAFE_EDGE_PASSWORD": "edge-0123456789",
}
# ELDERSAFE_* names the eldersafe services set that are not Settings fields, and the
# file of the repository that reads each.
NOT_SETTINGS = {
    "ELDERSAFE_EDGE_METRICS_PORT": "gateway/edge/metrics.py",
    "ELDERSAFE_EDGE_METRICS_HOST": "gateway/edge/metrics.py",
    "ELDERSAFE_EDGE_PASSWORD": "docker-compose.yml",  # `simulate --password-env` reads it
}
SERVICES = {"admin", "mosquitto", "timescaledb", "server", "edge", "prometheus", "grafana"}


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ELDERSAFE_")}
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.env"  # a developer's .env must not stand in for a value
        empty.write_text("")
        command = ["docker-compose", "-f", str(COMPOSE), "--env-file", str(empty)]
        return subprocess.run(
            [*command, "--profile", "simulators", *args],
            cwd=REPO,
            env={**clean, **(env if env is not None else SECRETS)},
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors merged, paths absolute)."""
    out = compose("config")
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    assert isinstance(doc, dict)
    return doc


def services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(doc["services"])


def eldersafe_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services(doc).items() if s.get("image") == ELDERSAFE_IMAGE}


def volumes(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, target) of each volume, short form ``source:target[:mode]`` or long."""
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            yield str(volume["source"]), str(volume["target"])
        else:
            source, target = str(volume).split(":")[:2]
            yield source, target


def binds(service: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    for source, target in volumes(service):
        if source.startswith(("/", ".")):
            yield (REPO / source).resolve(), target


def mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(named volume, target) of a service."""
    for source, target in volumes(service):
        if not source.startswith(("/", ".")):
            yield source, target


def test_docker_compose_accepts_the_file_and_demands_every_secret() -> None:
    out = compose("config", "-q")
    assert out.returncode == 0, out.stderr
    text = COMPOSE.read_text()
    for name in SECRETS:
        uses = re.findall(rf"\$\{{{name}(:.)?", text)
        assert uses, f"{name} is not used"
        if name != "ELDERSAFE_EDGE_PASSWORD":  # the simulators' edge only; empty until gateway-add
            assert set(uses) == {":?"}, f"{name} has a default somewhere: {uses}"
    # and docker-compose does refuse (one is enough to show the mechanism)
    missing = {k: v for k, v in SECRETS.items() if k != "ELDERSAFE_API_TOKEN_SECRET"}
    out = compose("config", "-q", env=missing)
    assert out.returncode != 0 and "set ELDERSAFE_API_TOKEN_SECRET" in out.stderr, out.stderr


def test_services_are_present_with_restart_policies_and_healthchecks(
    resolved: dict[str, Any],
) -> None:
    found = services(resolved)
    assert set(found) == SERVICES
    assert found["edge"].get("profiles") == ["simulators"]
    for name, service in found.items():
        if name == "admin":
            assert service["restart"] == "no"  # one-shot; the broker waits for it
            continue
        assert service["restart"] == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    conditions = {
        (name, dep, spec["condition"])
        for name, service in found.items()
        for dep, spec in service.get("depends_on", {}).items()
    }
    assert ("mosquitto", "admin", "service_completed_successfully") in conditions
    assert ("admin", "timescaledb", "service_healthy") in conditions
    assert ("server", "mosquitto", "service_healthy") in conditions
    assert ("server", "timescaledb", "service_healthy") in conditions


def test_every_mounted_file_and_directory_exists(resolved: dict[str, Any]) -> None:
    for name, service in services(resolved).items():
        for source, target in binds(service):
            assert source.is_relative_to(REPO), f"{name}: {source} is outside the repository"
            assert source.exists(), f"{name} mounts {source.relative_to(REPO)}, which is missing"
            # a directory where the image expects one, a file where it expects a file
            looks_like_file = bool(Path(target).suffix)
            assert source.is_file() == looks_like_file, f"{name}: {source} on {target}"
    grafana = dict((t, s) for s, t in binds(services(resolved)["grafana"]))
    assert grafana["/etc/grafana/provisioning"] == REPO / "grafana" / "provisioning"
    assert grafana["/var/lib/grafana/dashboards"] == REPO / "grafana" / "dashboards"
    assert list((REPO / "grafana" / "provisioning" / "datasources").glob("*.yaml"))
    assert list((REPO / "grafana" / "dashboards").glob("*.json"))


def test_eldersafe_environment_names_are_settings_the_code_reads(
    resolved: dict[str, Any],
) -> None:
    fields = {f"ELDERSAFE_{name.upper()}" for name in Settings.model_fields}
    seen = set()
    for name, service in eldersafe_services(resolved).items():
        for key in service.get("environment", {}):
            assert key.startswith("ELDERSAFE_"), f"{name}: {key}"
            seen.add(key)
            if key not in fields:
                reader = NOT_SETTINGS.get(key)
                assert reader, f"{name}: {key} is neither a setting nor read anywhere known"
                assert key in (REPO / reader).read_text(), f"{reader} does not read {key}"
    assert set(NOT_SETTINGS) <= seen  # no stale exceptions


def settings_of(service: dict[str, Any], **extra: str) -> Settings:
    """The settings the service's process would get (secrets as in a real .env)."""
    env = {k: str(v) for k, v in service.get("environment", {}).items()}
    env.update(extra)
    saved = {k: v for k, v in os.environ.items() if k.startswith("ELDERSAFE_")}
    for k in saved:
        del os.environ[k]
    try:
        os.environ.update(env)
        return Settings()
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)


def test_server_settings_pass_their_production_checks(resolved: dict[str, Any]) -> None:
    """As deploy/server_account.py starts it: with one of the listed accounts."""
    server = services(resolved)["server"]
    assert server["entrypoint"][:2] == ["python", "/app/deploy/server_account.py"]
    for username, password in ACCOUNTS.items():
        settings = settings_of(
            server, ELDERSAFE_MQTT_USERNAME=username, ELDERSAFE_MQTT_PASSWORD=password
        )
        assert settings.environment == "production"
        settings.check_notifier_secrets()
        settings.check_api_secrets()
        assert settings.server_accounts() == ACCOUNTS
        assert settings.mqtt_shared_group, "replicas must share the subscription"
        assert settings.database_url.startswith("postgresql://postgres:")
    admin = services(resolved)["admin"]
    assert admin["entrypoint"][:3] == ["python", "/app/deploy/server_account.py", "--shared"]


def published_targets(service: dict[str, Any]) -> set[int]:
    return {int(p["target"]) for p in service.get("ports", [])}


def test_ports_agree_with_settings_and_prometheus(resolved: dict[str, Any]) -> None:
    found = services(resolved)
    server = settings_of(
        found["server"],
        ELDERSAFE_MQTT_USERNAME="server-1",
        ELDERSAFE_MQTT_PASSWORD=ACCOUNTS["server-1"],
    )
    assert server.api_port in published_targets(found["server"])
    assert server.api_host == "0.0.0.0" and server.metrics_host == "0.0.0.0"
    assert str(server.metrics_port) in {str(p) for p in found["server"].get("expose", [])}
    assert f":{server.api_port}/healthz" in " ".join(found["server"]["healthcheck"]["test"])
    assert server.mqtt_host == "mosquitto" and server.mqtt_port in published_targets(
        found["mosquitto"]
    )
    assert server.database_url.split("@")[1].startswith("timescaledb:5432/")
    edge_env = found["edge"]["environment"]
    assert edge_env["ELDERSAFE_EDGE_METRICS_PORT"] in {str(p) for p in found["edge"]["expose"]}
    command = found["edge"]["command"]
    assert command[command.index("--host") + 1] == "mosquitto"
    assert int(command[command.index("--port") + 1]) == server.mqtt_port

    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    (server_sd,) = jobs["eldersafe-server"]["dns_sd_configs"]
    assert server_sd["names"] == ["server"] and server_sd["port"] == server.metrics_port
    (edge_sd,) = jobs["eldersafe-edge"]["dns_sd_configs"]
    assert edge_sd["names"] == ["edge"]
    assert edge_sd["port"] == int(edge_env["ELDERSAFE_EDGE_METRICS_PORT"])
    mounted = dict((t, s) for s, t in binds(found["prometheus"]))
    assert mounted["/etc/prometheus/prometheus.yml"] == REPO / "deploy/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in found["prometheus"]["command"]


def test_the_simulated_edge_serves_metrics_where_prometheus_looks(
    resolved: dict[str, Any],
) -> None:
    """Its site file is generated (``eldersafe simulate``): the environment asks for
    the endpoint, and the edge process inherits it."""
    from gateway.edge.metrics import from_environment

    env = {k: str(v) for k, v in services(resolved)["edge"]["environment"].items()}
    config = from_environment(env)
    assert config is not None and (config.host, config.port) == ("0.0.0.0", 9101)
    assert from_environment({}) is None


def test_prometheus_config_passes_promtool() -> None:
    out = subprocess.run(
        ["promtool", "check", "config", str(REPO / "deploy" / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_broker_reads_its_files_where_the_admin_step_writes_them(
    resolved: dict[str, Any],
) -> None:
    found = services(resolved)
    conf = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    wanted = {m.group(1): m.group(2) for m in re.finditer(r"^(\w+_file) (\S+)$", conf, re.M)}
    assert set(wanted) == {"password_file", "acl_file"}
    assert "allow_anonymous false" in conf.splitlines()
    broker_mounts = dict(mounts(found["mosquitto"]))
    admin_mounts = dict(mounts(found["admin"]))
    script = " ".join(found["admin"]["command"])
    for option, path in (("--password-file", wanted["password_file"]),
                         ("--acl-file", wanted["acl_file"])):  # fmt: skip
        volume = next(v for v, t in broker_mounts.items() if path.startswith(t + "/"))
        written = admin_mounts[volume] + path.removeprefix(broker_mounts[volume])
        assert f"{option} {written}" in script, (option, written, script)
        assert written in script.split("chown 1883:1883", 1)[1]  # the broker's uid may read it
    conf_target = dict((t, s) for s, t in binds(found["mosquitto"]))
    assert (
        conf_target["/mosquitto/config/mosquitto.conf"] == REPO / "deploy/mosquitto/mosquitto.conf"
    )


def test_grafana_gets_every_variable_its_datasource_uses(resolved: dict[str, Any]) -> None:
    grafana_env = services(resolved)["grafana"]["environment"]
    for path in (REPO / "grafana" / "provisioning").rglob("*.yaml"):
        settings = "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
        )
        for name in re.findall(r"\$\{(\w+)\}", settings):
            assert name in grafana_env, f"{path.relative_to(REPO)} uses ${{{name}}}"
    assert grafana_env["ELDERSAFE_DB_USER"] == "grafana_reader"


def test_the_image_holds_what_the_services_run() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M)
    assert workdir is not None
    copies = re.findall(r"^COPY (\S+) (\S+)$", dockerfile, re.M)
    for source, _ in copies:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is missing"
    assert ("deploy/server_account.py", "deploy/server_account.py") in copies
    assert workdir.group(1) == "/app"  # the entrypoints name /app/deploy/server_account.py


# -- the server-account picker and Grafana's role, for real -------------------------

CHILD = (
    "import os, signal; print(os.environ['ELDERSAFE_MQTT_USERNAME'], flush=True); signal.pause()"
)


class Replica:
    """deploy/server_account.py with a stand-in server that prints its account."""

    def __init__(self, dsn: str, log: Path) -> None:
        self.log = log
        env = {**os.environ, "ELDERSAFE_DATABASE_URL": dsn,
               "ELDERSAFE_MQTT_SERVER_ACCOUNTS": json.dumps(ACCOUNTS)}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "deploy" / "server_account.py"), "--check-s", "0.1",
             "--wait-s", "0.1", "--", sys.executable, "-c", CHILD],
            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def account(self) -> str | None:
        names = [line for line in self.log.read_text().splitlines() if line in ACCOUNTS]
        return names[-1] if names else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


def test_each_server_replica_claims_an_account_of_its_own(database: str, tmp_path: Path) -> None:
    """Two replicas, two accounts: each its own; a third waits until one stops, then
    takes the freed account. A replica whose lock connection dies stops its server."""
    replicas = [Replica(database, tmp_path / f"replica-{i}.log") for i in range(3)]
    try:

        def holders() -> list[Replica]:
            return [r for r in replicas if r.account() is not None]

        def settled() -> bool:
            waiting = [r for r in replicas if r.account() is None]
            return len(holders()) == 2 and all(
                "held by a running server" in r.log.read_text() for r in waiting
            )

        wait_for(settled, 20, "two replicas with accounts, the third waiting")
        first, second = holders()
        (third,) = [r for r in replicas if r.account() is None]
        assert {first.account(), second.account()} == set(ACCOUNTS)
        freed = first.account()
        first.stop()
        assert first.proc.returncode == 128 + signal.SIGTERM  # its server stopped with it
        wait_for(lambda: third.account() is not None, 20, "the third takes the freed account")
        assert third.account() == freed
        # The lock's connection dies: the replica stops its server and exits 1 (the
        # container's restart policy then claims anew).
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                " AND granted AND pid IN (SELECT pid FROM pg_stat_activity"
                " WHERE application_name = 'eldersafe-server-account') LIMIT 1"
            )
        running = (second, third)
        wait_for(lambda: any(r.proc.poll() == 1 for r in running), 20, "a replica exits 1")
        lost = next(r for r in running if r.proc.poll() == 1)
        assert "lost the account lock's connection" in lost.log.read_text()
    finally:
        for r in replicas:
            r.stop()


def test_grafana_role_reads_every_table_and_writes_none(pg_cluster: Any) -> None:
    """The init script runs on an empty database (as the image's first start does); the
    migrations create the tables afterwards, and the role can read them, chunks too."""
    admin_dsn = pg_cluster.dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE grafana_role_check")
    dsn = pg_cluster.dsn.rsplit("/", 1)[0] + "/grafana_role_check"
    info = conninfo_to_dict(dsn)
    env = {**os.environ, "PGHOST": str(info["host"]), "PGPORT": str(info["port"]),
           "POSTGRES_USER": "postgres", "POSTGRES_DB": "grafana_role_check",
           "ELDERSAFE_GRAFANA_DB_PASSWORD": "it's a 'quoted' secret"}  # fmt: skip
    script = REPO / "deploy" / "timescaledb" / "10-grafana-reader.sh"
    for _ in range(2):  # idempotent: run by hand again on an existing volume
        out = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO telemetry (time, site_id, device_id, metric, value)"
            " VALUES (now(), 's', 'd', 'm', 1)"
        )
    reader = dsn.replace("postgres@", "grafana_reader@")
    with psycopg.connect(reader, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM telemetry").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM alerts").fetchone() == (0,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO organisations (id, kind, name) VALUES ('x', 'bureau', 'x')")
        conn.execute("SET default_transaction_read_only = off")  # not its only defence
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM telemetry")


def test_deploy_doc_lists_every_metric() -> None:
    """docs/deploy.md's metric tables name every series the processes export."""
    doc = (REPO / "docs" / "deploy.md").read_text()
    sources = ("gateway/metrics.py", "gateway/metrics_district.py", "gateway/edge/metrics.py")
    names = {
        name
        for source in sources
        for name in re.findall(r'"(eldersafe_[a-z_]+)"', (REPO / source).read_text())
    }
    assert len(names) > 40
    missing = sorted(n for n in names if not re.search(rf"`{n}(_total)?[`{{]", doc))
    assert not missing, f"not in docs/deploy.md: {missing}"
