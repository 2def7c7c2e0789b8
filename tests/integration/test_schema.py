"""Schema v1 on the Apache-2 edition of TimescaleDB: migrations, hypertables, retention."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import psycopg

from gateway.db.migrate import available, current_version, migrate
from gateway.db.retention import drop_old_telemetry


def test_migrations_are_versioned_and_idempotent(database: str) -> None:
    assert current_version(database) == len(available())
    assert migrate(database) == []  # a second run applies nothing
    with psycopg.connect(database) as conn:
        hypertables = {
            r[0]
            for r in conn.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")
        }
        assert hypertables == {"telemetry", "device_events", "alert_audit"}
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {
            "organisations",
            "sites",
            "residents",
            "devices",
            "gateways",
            "staff",
            "shifts",
            "alerts",
            "notifications",
            "dead_letters",
            "event_ledger",
        } <= tables


def test_organisation_tree_is_enforced(database: str) -> None:
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO organisations VALUES ('bureau-x', NULL, 'bureau', 'Bureau')")
        conn.execute(
            "INSERT INTO organisations VALUES ('street-x', 'bureau-x', 'street', 'Street')"
        )
        conn.commit()
        try:
            conn.execute("INSERT INTO organisations VALUES ('street-y', NULL, 'street', 'Orphan')")
            raise AssertionError("a street without a parent was accepted")
        except psycopg.errors.CheckViolation:
            conn.rollback()


def test_retention_drops_old_telemetry_chunks_only(database: str) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(database) as conn:
        for age_days in (200, 100, 1):
            conn.execute(
                "INSERT INTO telemetry VALUES (%s, 's', 'd', 'm', 1, '')",
                (now - timedelta(days=age_days),),
            )
        conn.commit()

    async def run() -> int:
        async with await psycopg.AsyncConnection.connect(database) as aconn:
            return await drop_old_telemetry(aconn, timedelta(days=90))

    assert asyncio.run(run()) == 2
    with psycopg.connect(database) as conn:
        left = conn.execute("SELECT count(*) FROM telemetry").fetchone()
    assert left == (1,)
