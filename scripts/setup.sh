#!/usr/bin/env bash
# One idempotent setup for a fresh Debian 12 machine (run as root): Debian
# packages, TimescaleDB for PostgreSQL 15, and the project's virtual
# environment. Both README commands run it first; a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=600)

# chromium: the console's browser tests (driven by Playwright with Debian's build), with
# fonts-wqy-microhei so that its screenshots show Chinese, not boxes;
# prometheus: the scrape test; docker-compose: validates docker-compose.yml offline.
PACKAGES=(mosquitto mosquitto-clients postgresql-15 postgresql-client-15 socat
          chromium fonts-wqy-microhei prometheus docker-compose)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  "${APT[@]}" update -qq
  "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The project runs its own broker and database instances; the system services
# that the packages may have started are not used.

bash scripts/install-timescaledb.sh

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: ready"
