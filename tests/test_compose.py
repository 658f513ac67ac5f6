"""docker-compose.yml validates with Debian's docker-compose (no Docker engine runs here)."""

import os
import shutil
import subprocess
import tempfile

import pytest
import yaml

from tests.conftest import REPO


SECRETS = {"LABEL_STUDIO_PASSWORD": "p" * 24, "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "b" * 24,
           "WEBHOOK_SECRET": "w" * 32}


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
    assert set(services) == {"label-studio", "redis", "backend", "worker"}
    assert services["label-studio"]["image"].startswith("heartexlabs/label-studio:1.23.")
    env = services["label-studio"]["environment"]
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert set(spec["volumes"]) >= {"ls-data", "redis-data", "faceloop-state"}
