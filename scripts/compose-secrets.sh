#!/usr/bin/env bash
# Write .env beside docker-compose.yml (mode 0600) with per-install random secrets, once:
# LABEL_STUDIO_PASSWORD, BASIC_AUTH_USER, BASIC_AUTH_PASS, WEBHOOK_SECRET, POSTGRES_PASSWORD (URL-safe
# characters only: it goes into backend's and worker's DATABASE_URL), LABEL_STUDIO_SECRET_KEY
# (Label Studio's SECRET_KEY; adding it to an older install changes the key once: log in again and
# make a new access token for the backend). An existing .env is kept
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
grep -q "^LABEL_STUDIO_SECRET_KEY=" .env || \
  echo "LABEL_STUDIO_SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')" >> .env
grep -q "^BASIC_AUTH_USER=" .env || echo "BASIC_AUTH_USER=labelstudio" >> .env
echo "secrets in $(pwd)/.env (mode 0600): LABEL_STUDIO_PASSWORD, BASIC_AUTH_USER/PASS, WEBHOOK_SECRET, POSTGRES_PASSWORD, LABEL_STUDIO_SECRET_KEY"
