"""``eldersafe audit verify``: read every chain and its head, and name each tampered row."""

from __future__ import annotations

from collections.abc import Mapping

import psycopg

from alerting.audit import AuditRow, ChainHead, ChainProblem, verify_log
from alerting.model import DetailValue


def _detail(value: object) -> Mapping[str, DetailValue]:
    # jsonb edited into a non-object still loads; the encoding then refuses it (EDITED).
    return value if isinstance(value, dict) else {"": str(value)}


def verify(dsn: str) -> tuple[int, tuple[ChainProblem, ...]]:
    """(rows read, problems); one problem per chain, the first bad row of it."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        rows = [
            AuditRow(time, alert_id, seq, actor, action, channel, _detail(detail),
                     bytes(prev) if prev is not None else None, bytes(digest))
            for time, alert_id, seq, actor, action, channel, detail, prev, digest in conn.execute(
                "SELECT time, alert_id, seq, actor, action, channel, detail, prev_hash, hash"
                " FROM alert_audit ORDER BY alert_id, seq, time"
            )
        ]  # fmt: skip
        heads = {
            alert_id: ChainHead(alert_id, seq, bytes(digest))
            for alert_id, seq, digest in conn.execute(
                "SELECT alert_id, seq, hash FROM alert_audit_heads"
            )
        }
    return len(rows), verify_log(rows, heads)
