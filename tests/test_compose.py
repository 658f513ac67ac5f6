"""docker-compose.yml validates with Debian's docker-compose (no Docker engine runs here)."""

import json
import os
import shutil
import subprocess
import tempfile

import pytest
import yaml

from tests.conftest import REPO


SECRETS = {"LABEL_STUDIO_PASSWORD": "p" * 24, "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "b" * 24,
           "WEBHOOK_SECRET": "w" * 32, "POSTGRES_PASSWORD": "g" * 24, "LABEL_STUDIO_SECRET_KEY": "k" * 64}


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
    # Label Studio's SSRF protection on (issue 9 §7): the compose network is reached on a real address
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "true" and env["SSRF_PROTECTION_ENABLED"] == "true"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert set(spec["volumes"]) >= {"ls-data", "redis-data", "pg-data", "faceloop-state"}


#: Label Studio 1.23.2's default banned subnets (core/utils/io.py validate_ip), as written there.
LS_DEFAULT_BANNED = ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                     "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
                     "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "233.252.0.0/24", "240.0.0.0/4",
                     "255.255.255.255/32", "::/128", "::1/128", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96",
                     "64:ff9b:1::/48", "100::/64", "2001:0000::/32", "2001:20::/28", "2001:db8::/32", "2002::/16",
                     "fc00::/7", "fe80::/10", "ff00::/8"]


def test_label_studio_ssrf_protection_bans_all_but_the_compose_network():
    import ipaddress

    env = yaml.safe_load(_config(SECRETS).stdout)["services"]["label-studio"]["environment"]
    assert env["SSRF_PROTECTION_ENABLED"] == "true" and env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "true"
    assert env["USE_DEFAULT_BANNED_SUBNETS"] == "false"
    banned = env["USER_ADDITIONAL_BANNED_SUBNETS"].split(",")  # Label Studio splits on "," and strips nothing
    assert {ipaddress.ip_network(n) for n in banned} == {ipaddress.ip_network(n) for n in LS_DEFAULT_BANNED
                                                         if n != "172.16.0.0/12"}
    custom = _config({**SECRETS, "LABEL_STUDIO_BANNED_SUBNETS": "10.0.0.0/8"})
    assert yaml.safe_load(custom.stdout)["services"]["label-studio"]["environment"][
        "USER_ADDITIONAL_BANNED_SUBNETS"] == "10.0.0.0/8"


def test_label_studio_itself_blocks_private_addresses_with_the_compose_settings(tmp_path):
    """Label Studio 1.23.2's own check (``core.utils.io.validate_ip``, used by webhooks, the ML
    backend connection and URL imports) under the environment docker-compose gives it."""
    ls_python = REPO / ".venv-ls" / "bin" / "python"
    if not ls_python.exists():
        pytest.skip("Label Studio is not installed in .venv-ls (scripts/bootstrap.sh installs it)")
    env = yaml.safe_load(_config(SECRETS).stdout)["services"]["label-studio"]["environment"]
    code = (
        "import json, os, sys, label_studio\n"
        "sys.path.insert(0, os.path.dirname(label_studio.__file__))\n"
        "from django.conf import settings\n"
        "from core.utils.io import validate_ip\n"
        "out = {'ssrf': settings.SSRF_PROTECTION_ENABLED, 'ml_block': settings.ML_BLOCK_LOCAL_IP}\n"
        "for ip in sys.argv[1:]:\n"
        "    try:\n"
        "        validate_ip(ip); out[ip] = 'allowed'\n"
        "    except Exception as e:\n"
        "        out[ip] = type(e).__name__\n"
        "print('RESULT ' + json.dumps(out))\n")
    blocked = ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.1.10", "100.64.0.1", "0.0.0.0", "::1",
               "fe80::1", "fd00::5", "::ffff:127.0.0.1"]
    allowed = ["172.18.0.5", "172.31.255.2", "8.8.8.8", "2606:4700::1111"]
    run_env = {k: str(v) for k, v in env.items()}
    run_env.update({"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LABEL_STUDIO_BASE_DATA_DIR": str(tmp_path),
                    "DJANGO_SETTINGS_MODULE": "core.settings.label_studio"})
    r = subprocess.run([str(ls_python), "-c", code, *blocked, *allowed], capture_output=True, text=True,
                       timeout=120, env=run_env, cwd=tmp_path)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["ssrf"] is True and out["ml_block"] is True
    assert {ip: out[ip] for ip in blocked} == {ip: "SsrfBlockedUrlError" for ip in blocked}
    assert {ip: out[ip] for ip in allowed} == {ip: "allowed" for ip in allowed}


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
    # Label Studio's SECRET_KEY, once, without the "$" or "#" its own .env reader misreads
    keys = [ln.split("=", 1)[1] for ln in (root / ".env").read_text().splitlines()
            if ln.startswith("LABEL_STUDIO_SECRET_KEY=")]
    assert len(keys) == 1 and len(keys[0]) >= 50 and all(c.isalnum() or c in "-_" for c in keys[0])


def test_label_studio_gets_a_fixed_secret_key():
    env = yaml.safe_load(_config(SECRETS).stdout)["services"]["label-studio"]["environment"]
    assert env["SECRET_KEY"] == SECRETS["LABEL_STUDIO_SECRET_KEY"]
    missing = _config({k: v for k, v in SECRETS.items() if k != "LABEL_STUDIO_SECRET_KEY"})
    assert missing.returncode != 0 and "LABEL_STUDIO_SECRET_KEY" in missing.stderr
