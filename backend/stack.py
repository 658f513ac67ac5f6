"""Start the whole loop on loopback: redis-server, Label Studio (own venv), backend, worker.

Used by ``faceloop up`` (the main job) and by the end-to-end tests' session fixture, so both run
the same parts the same way. Every service gets a free 127.0.0.1 port and a folder under
``root``; :meth:`Stack.stop` tears everything down.

Label Studio's environment follows label-studio-protocol.md §6 and environment.md: loopback ML
backends allowed (``LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false``, ``SSRF_PROTECTION_ENABLED=false``),
telemetry off, data in our folder, local-files serving from a document root of our choice.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backend.config import REPO_ROOT

LS_USER = "admin@faceloop.local"
LS_PASSWORD = "faceloop-admin-pass"


class StackError(RuntimeError):
    """A service of the stack did not start; the message names it and the log to read."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200 (bounded by ``timeout`` seconds, 0.5 s apart).

    Raises: StackError when the process exits or time runs out.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{url}: process exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise StackError(f"{url} did not come up within {timeout:.0f} s; see {log}")


def ls_bin() -> Path:
    """The ``label-studio`` executable of the project's own venv (``.venv-ls``), or on PATH."""
    cand = REPO_ROOT / ".venv-ls" / "bin" / "label-studio"
    if cand.exists():
        return cand
    found = shutil.which("label-studio")
    if not found:
        raise StackError("label-studio not found: run scripts/bootstrap.sh (it installs it into .venv-ls)")
    return Path(found)


def get_personal_access_token(ls_url: str, email: str, password: str) -> str:
    """Log in like a browser and create a personal access token (a JWT refresh token).

    Steps (protocol doc §6): GET ``/user/login/`` for the CSRF cookie, POST the form, then
    ``POST /api/token/`` with ``X-CSRFToken``. Raises StackError on failure.
    """
    with httpx.Client(base_url=ls_url, timeout=30, follow_redirects=False) as c:
        r = c.get("/user/login/")
        csrf = c.cookies.get("csrftoken") or re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', r.text).group(1)
        r = c.post("/user/login/", data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
                   headers={"Referer": ls_url + "/user/login/"})
        if r.status_code not in (302, 303):
            raise StackError(f"Label Studio login failed: HTTP {r.status_code}")
        r = c.post("/api/token/", headers={"X-CSRFToken": c.cookies.get("csrftoken", csrf),
                                           "Referer": ls_url + "/"})
        if r.status_code not in (200, 201):
            # a user may hold one PAT only: reuse by deleting and creating again is not offered;
            raise StackError(f"could not create a personal access token: HTTP {r.status_code} {r.text[:200]}")
        return r.json()["token"]


@dataclass
class Stack:
    """The loop's processes. Create with :meth:`start`; stop with :meth:`stop`.

    Attributes:
        root: folder for every service's data and logs (``<root>/logs/*.log``).
        ls_url, backend_url, redis_url: where the services listen.
        api_key: Label Studio personal access token of the admin user.
        env: environment the backend and worker run with (our settings).
    """

    root: Path
    document_root: Path | None = None
    var_dir: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ls_url: str = ""
    backend_url: str = ""
    redis_url: str = ""
    api_key: str = ""
    env: dict = field(default_factory=dict)
    ports: dict = field(default_factory=dict)

    def _spawn(self, name: str, cmd: list[str], env: dict, cwd: Path | None = None) -> subprocess.Popen:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        f = open(logs / f"{name}.log", "ab")
        p = subprocess.Popen(cmd, env=env, cwd=str(cwd or self.root), stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    @classmethod
    def start(cls, root: Path, document_root: Path | None = None, worker: bool = True,
              extra_env: dict | None = None, ls_timeout: float = 180, var_dir: Path | None = None) -> "Stack":
        """Start redis-server, Label Studio, the backend and (optionally) a Celery worker.

        Args:
            root: working folder (created).
            document_root: folder Label Studio serves as ``/data/local-files/?d=`` (images that
                stay where they are: nothing is copied).
            extra_env: settings for backend and worker (e.g. ``TRAIN_EPOCHS``).
            var_dir: faceloop's state folder (database, models); default ``<root>/var``.
        Raises: StackError naming the service that failed and its log.
        """
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        st = cls(root=root, document_root=Path(document_root).resolve() if document_root else None,
                 var_dir=Path(var_dir).resolve() if var_dir else root / "var")
        try:
            st._start_redis()
            st._start_label_studio(ls_timeout)
            st._start_backend(extra_env or {})
            if worker:
                st.start_worker()
        except BaseException:
            st.stop()
            raise
        return st

    def _start_redis(self):
        exe = shutil.which("redis-server")
        if not exe:
            raise StackError("redis-server not found: run scripts/bootstrap.sh (apt-get install redis-server)")
        port = free_port()
        (self.root / "redis").mkdir(exist_ok=True)
        p = self._spawn("redis", [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                  "--appendonly", "no", "--dir", str(self.root / "redis")], dict(os.environ))
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.ports["redis"] = port
        import redis

        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                redis.Redis.from_url(self.redis_url).ping()
                return
            except redis.ConnectionError:
                if p.poll() is not None:
                    break
                time.sleep(0.2)
        raise StackError(f"redis-server did not start; see {self.log('redis')}")

    def _start_label_studio(self, timeout: float):
        port = free_port()
        self.ls_url = f"http://127.0.0.1:{port}"
        data = self.root / "label-studio"
        data.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(data), "XDG_DATA_HOME": str(data / "xdg"),
            "XDG_CONFIG_HOME": str(data / "xdg"), "XDG_CACHE_HOME": str(data / "xdg"), "HOME": str(data),
            "LABEL_STUDIO_USERNAME": LS_USER, "LABEL_STUDIO_PASSWORD": LS_PASSWORD,
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false", "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false", "USE_DEFAULT_BANNED_SUBNETS": "false",
            "LABEL_STUDIO_HOST": self.ls_url, "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        })
        if self.document_root:
            env.update({"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root)})
        p = self._spawn("label-studio", [str(ls_bin()), "start", "--no-browser", "--port", str(port),
                                         "--internal-host", "127.0.0.1", "--data-dir", str(data)], env, cwd=data)
        wait_http(self.ls_url + "/health", timeout, p, self.log("label-studio"))
        token_file = data / "faceloop-pat.txt"
        if token_file.exists():
            self.api_key = token_file.read_text().strip()
        else:
            self.api_key = get_personal_access_token(self.ls_url, LS_USER, LS_PASSWORD)
            token_file.write_text(self.api_key)

    def service_env(self, extra: dict) -> dict:
        """Environment of backend and worker: our settings for this stack."""
        env = dict(os.environ)
        env.update({
            "LABEL_STUDIO_URL": self.ls_url, "LABEL_STUDIO_API_KEY": self.api_key,
            "CELERY_BROKER_URL": self.redis_url, "VAR_DIR": str(self.var_dir),
            "PYTHONUNBUFFERED": "1",
        })
        if self.document_root:
            env["LOCAL_FILES_DOCUMENT_ROOT"] = str(self.document_root)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def _start_backend(self, extra: dict):
        port = free_port()
        self.backend_url = f"http://127.0.0.1:{port}"
        self.env = self.service_env(extra)
        p = self._spawn("backend", [sys.executable, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1",
                                    "--port", str(port), "--log-level", "warning"], self.env, cwd=REPO_ROOT)
        self.ports["backend"] = port
        wait_http(self.backend_url + "/health", 60, p, self.log("backend"))

    def start_worker(self, name: str = "worker"):
        """Start a Celery worker (queues ``train`` and ``score``, one process)."""
        self._spawn(name, [sys.executable, "-m", "celery", "-A", "ml_worker.celery_app", "worker",
                           "-Q", "train,score", "-c", "1", "--pool", "solo", "-n", f"{name}@%h",
                           "--loglevel", "INFO"], self.env, cwd=REPO_ROOT)
        import redis  # noqa: F401

        deadline = time.time() + 90
        while time.time() < deadline:
            if self.log(name).exists() and b"ready." in self.log(name).read_bytes():
                return
            if self.procs[name].poll() is not None:
                raise StackError(f"celery worker exited; see {self.log(name)}")
            time.sleep(0.5)
        raise StackError(f"celery worker not ready within 90 s; see {self.log(name)}")

    def stop(self):
        """Stop every process (SIGTERM to its process group, then SIGKILL after 15 s)."""
        for name, p in reversed(list(self.procs.items())):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 15
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.procs.clear()
