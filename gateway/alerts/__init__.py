"""The alert engine's PostgreSQL side: store, intake and timer workers, directory, audit.

``alerting/`` decides; this package implements its ports over schema v3
(gateway/db/migrations/0003_alert_engine.sql) and runs it inside ``server``.
"""
