"""docker-compose.yml validates with Debian's docker-compose (no Docker engine runs here)."""

import os
import shutil
import subprocess
import tempfile

import pytest
import yaml

from tests.conftest import REPO


SECRETS = {"LABEL_STUDIO_PASSWORD": "p" * 24, "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "b" * 24,
           "WEBHOOK_SECRET": "w" * 32, "POSTGRES_PASSWORD": "g" * 24}


def _config(env: dict, *args) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if not exe:
        pytest.skip("docker-compose not installed (scripts/bootstrap.sh installs it)")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "FACELOOP_BIND"}
    # an empty env file, so that no .env of a developer (scripts/compose-secrets.sh) leaks in
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        return subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), "--env-file", empty.name, "config", *args],
                              capture_output=True, text=True, timeout=60, env={**clean, **env})


def test_compose_file_is_valid():
    r = _config(SECRETS, "-q")
    assert r.returncode == 0, r.stderr


def test_compose_refuses_to_run_without_secrets():
    for missing in SECRETS:
        r = _config({k: v for k, v in SECRETS.items() if k != missing}, "-q")
        assert r.returncode != 0 and missing in r.stderr, (missing, r.stderr)


def test_compose_publishes_on_loopback_only_by_default():
    spec = yaml.safe_load(_config(SECRETS).stdout)
    published = [p for svc in spec["services"].values() for p in svc.get("ports", [])]
    assert published, "Label Studio and the backend are published"
    for p in published:
        host = p.get("host_ip") if isinstance(p, dict) else str(p).split(":")[0]
        assert host == "127.0.0.1", p
    env = spec["services"]["backend"]["environment"]
    assert env["WEBHOOK_SECRET"] == SECRETS["WEBHOOK_SECRET"] and env["BASIC_AUTH_PASS"] == SECRETS["BASIC_AUTH_PASS"]


def test_compose_has_the_loop_and_a_gpu_worker():
    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = spec["services"]
    assert set(services) == {"label-studio", "redis", "postgres", "backend", "worker"}
    assert services["label-studio"]["image"].startswith("heartexlabs/label-studio:1.23.")
    env = services["label-studio"]["environment"]
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert set(spec["volumes"]) >= {"ls-data", "redis-data", "pg-data", "faceloop-state"}


def test_compose_keeps_state_in_postgres():
    """backend and worker use the postgres service (its password from .env, never published) and
    start once it answers."""
    spec = yaml.safe_load(_config(SECRETS).stdout)
    services = spec["services"]
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:15")
    assert not pg.get("ports"), "PostgreSQL stays on the compose network"
    assert pg["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any((v.get("target") if isinstance(v, dict) else str(v).split(":")[1]) == "/var/lib/postgresql/data"
               for v in pg["volumes"]), pg["volumes"]
    env = pg["environment"]
    url = f"postgresql+psycopg://{env['POSTGRES_USER']}:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
    for name in ("backend", "worker"):
        assert services[name]["environment"]["DATABASE_URL"] == url, name
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name


def test_compose_secrets_script_writes_the_postgres_password(tmp_path):
    """scripts/compose-secrets.sh gives every install its own URL-safe database password, once."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "compose-secrets.sh", root / "scripts")
    for _ in range(2):
        r = subprocess.run(["bash", str(root / "scripts" / "compose-secrets.sh")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
    lines = [ln for ln in (root / ".env").read_text().splitlines() if ln.startswith("POSTGRES_PASSWORD=")]
    assert len(lines) == 1
    pw = lines[0].split("=", 1)[1]
    assert len(pw) >= 24 and all(c.isalnum() or c in "-_" for c in pw)
    assert (root / ".env").stat().st_mode & 0o777 == 0o600
