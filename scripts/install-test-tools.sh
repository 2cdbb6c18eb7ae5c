#!/usr/bin/env bash
# System tools the test suite drives for real: Prometheus (scrapes /metrics in a test)
# and its promtool (checks and unit-tests the alert rules), both in Debian's package.
# kubectl, hadolint and the schema validators come from PyPI with the `test` extra.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo ">>> installing Debian's prometheus (for tests/deploy/test_prometheus_scrape.py)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
else
    echo ">>> prometheus is not installed and cannot be installed here (needs root + apt-get):" >&2
    echo "    install it (Debian/Ubuntu: apt-get install prometheus) or the scrape test fails." >&2
fi
