#!/usr/bin/env bash
# Write .env beside docker-compose.yml (mode 0600) with per-install random secrets, once:
# LABEL_STUDIO_PASSWORD, BASIC_AUTH_USER, BASIC_AUTH_PASS, WEBHOOK_SECRET, POSTGRES_PASSWORD (URL-safe
# characters only: it goes into backend's and worker's DATABASE_URL). An existing .env is kept
# (variables it lacks are appended). Prints where the Label Studio password is, not the password.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 077
touch .env
chmod 600 .env
rand() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
for var in LABEL_STUDIO_PASSWORD BASIC_AUTH_PASS WEBHOOK_SECRET POSTGRES_PASSWORD; do
  grep -q "^${var}=" .env || echo "${var}=$(rand)" >> .env
done
grep -q "^BASIC_AUTH_USER=" .env || echo "BASIC_AUTH_USER=labelstudio" >> .env
echo "secrets in $(pwd)/.env (mode 0600): LABEL_STUDIO_PASSWORD, BASIC_AUTH_USER/PASS, WEBHOOK_SECRET, POSTGRES_PASSWORD"
