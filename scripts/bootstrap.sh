#!/usr/bin/env bash
# Set up everything faceloop needs on a fresh Debian machine (idempotent):
#   - Debian packages: redis-server, postgresql (the tests start their own throwaway server from its
#     binaries in /usr/lib/postgresql/<n>/bin, as the postgres user when run as root),
#     docker-compose (for `config -q` validation only), chromium
#     (the browser test drives it with pip's playwright; never `playwright install`)
#   - .venv     : faceloop itself (torch, ultralytics, FastAPI, Celery, SDK, ...)
#   - .venv-ls  : Label Studio in its own venv (it pins its own Django/SDK versions)
# Usage: scripts/bootstrap.sh            (env FACELOOP_SKIP_APT=1 skips apt-get)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ "${FACELOOP_SKIP_APT:-0}" != 1 ]; then
  need=()
  command -v redis-server >/dev/null || need+=(redis-server)
  { command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || need+=(postgresql)
  command -v docker-compose >/dev/null || need+=(docker-compose)
  [ -x /usr/bin/chromium ] || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    echo ">> apt-get install ${need[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo ">> creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo ">> installing torch 2.14.1 + torchvision 0.29.1 into .venv (the pair that works here)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
echo ">> installing faceloop (editable) into .venv"
.venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/faceloop --help >/dev/null

if [ ! -x .venv-ls/bin/label-studio ]; then
  echo ">> creating .venv-ls (Label Studio)"
  "$PY" -m venv .venv-ls
  .venv-ls/bin/pip install -q --upgrade pip
  .venv-ls/bin/pip install -q "label-studio==1.23.2"
fi
echo ">> bootstrap done"
