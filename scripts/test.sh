#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit tests, the active-learning simulation's
# tiny run, the end-to-end loop on real Label Studio, redis-server and a Celery worker, and the
# browser test (tests/browser: `faceloop up` driven in Debian's chromium through Playwright).
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not e2e").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -ra -v "$@"
