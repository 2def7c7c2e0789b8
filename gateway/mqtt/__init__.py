"""MQTT 5 for the gateway: a sans-IO codec and the session that ingest consumes through."""
