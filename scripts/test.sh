#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit tests, the active-learning simulation's
# tiny run, and the end-to-end loop on real Label Studio, redis-server and a Celery worker.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not e2e").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -ra -v "$@"
