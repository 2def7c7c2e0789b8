"""TimescaleDB schema, versioned migrations and retention."""
