# The two commands of the README: `make demo` and `make test`. Both run the
# idempotent setup first (Debian packages, TimescaleDB, .venv).
.PHONY: setup demo test lint bench dashboards

VENV := .venv/bin

setup:
	bash scripts/setup.sh

# Runs until Ctrl-C; e.g. `make demo DEMO_ARGS="--seconds 120 --api-port 8080"`.
demo: setup
	$(VENV)/eldersafe demo $(DEMO_ARGS)

lint: setup
	$(VENV)/ruff check .
	$(VENV)/mypy
	$(VENV)/eldersafe schemas --check

test: lint
	$(VENV)/pytest -q

bench: setup
	$(VENV)/python bench/ingest.py
	$(VENV)/python bench/edge.py
	$(VENV)/python bench/escalation.py
	$(VENV)/python bench/alert_latency.py
	$(VENV)/python bench/api.py

# Regenerate grafana/dashboards/*.json from grafana/generate.py (a test fails on drift).
dashboards: setup
	$(VENV)/python -m grafana.generate
