"""Ingest: MQTT → validation → batched, idempotent writes into TimescaleDB."""
