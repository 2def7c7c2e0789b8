"""Registered gateways and the broker accounts derived from them."""

from __future__ import annotations

from collections.abc import Mapping

import psycopg

from gateway.broker_auth import BrokerAccount, gateway_username, hash_password, new_password


def add_gateway(dsn: str, gateway_id: str, site_id: str, password: str | None = None) -> str:
    """Register a gateway (or give it a new password); return its password (shown once)."""
    password = password or new_password()
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO gateways (id, site_id, password_hash) VALUES (%s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET site_id = excluded.site_id, "
            "password_hash = excluded.password_hash",
            (gateway_id, site_id, hash_password(password)),
        )
    return password


def broker_accounts(dsn: str, server_accounts: Mapping[str, str]) -> list[BrokerAccount]:
    """One account per server process (user → password) and one per registered gateway."""
    accounts = [
        BrokerAccount(name, hash_password(password), None)
        for name, password in sorted(server_accounts.items())
    ]
    with psycopg.connect(dsn) as conn:
        for gateway_id, site_id, password_hash in conn.execute(
            "SELECT id, site_id, password_hash FROM gateways ORDER BY id"
        ):
            accounts.append(BrokerAccount(gateway_username(gateway_id), password_hash, site_id))
    return accounts
