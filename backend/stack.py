"""Start the whole loop on loopback: redis-server, Label Studio (own venv), backend, worker.

Used by ``faceloop up`` (the main job), ``faceloop demo`` and the end-to-end tests, so all of them
run the same parts the same way. Everything lives under one folder ``root`` (``faceloop up``:
``var/stack``), which is kept between runs:

- ``root/label-studio/``: Label Studio's data (SQLite, media) and the admin's personal access token
  (``faceloop-pat.txt``, mode 0600).
- ``root/secrets.json`` (mode 0600): per-install secrets generated at the first start: the Label
  Studio admin password, the backend's basic-auth user/password (Label Studio -> backend) and the
  webhook secret (header ``X-Faceloop-Secret``). Nothing is hard-coded.
- ``root/stack.json`` (mode 0600): where the running stack listens (ports, URLs, process ids,
  data folders) and which Label Studio project belongs to which image folder + label config.
  ``faceloop train/score/queue/jobs/versions`` read it to find the running stack.
- ``root/logs/*.log``: one log per service.

``faceloop up`` watches the processes with :class:`Supervisor`: a service that dies is restarted
on its port with backoff (1, 2, 4, 8, 16 s), and only one that keeps dying (a 6th death within
10 minutes) stops the whole stack.

Ports: the one asked for, else the one recorded at the last start, else the usual one (Label
Studio 8080, backend 9090, Redis 6379), each only if free; otherwise a free port.

Label Studio's environment follows label-studio-protocol.md §6 and environment.md: loopback ML
backends allowed (``LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false``, ``SSRF_PROTECTION_ENABLED=false``),
telemetry off, data in our folder, local-files serving from a document root of our choice. No
``LABEL_STUDIO_HOST`` is set, so Local Files tasks hold relative ``/data/local-files/?d=`` URLs
that stay valid when the port changes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
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
DEFAULT_PORTS = {"label-studio": 8080, "backend": 9090, "redis": 6379}
STATE_FILE = "stack.json"
SECRETS_FILE = "secrets.json"


class StackError(RuntimeError):
    """A service of the stack did not start; the message names it and the log to read."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port`` and we may bind it."""
    with socket.socket() as s:
        # as servers bind (SO_REUSEADDR): a port in TIME_WAIT after a restart counts as free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            return False
    return True


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the start (no window where it is 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or ``{}`` when it is absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load_secrets(root: Path) -> tuple[dict, bool]:
    """The install's secrets (``root/secrets.json``, mode 0600), generated on first use.

    Returns: ``(secrets, created)``; keys ``ls_user``, ``ls_password``, ``basic_auth_user``,
    ``basic_auth_pass``, ``webhook_secret``, ``ls_secret_key``, ``instance_id``. Values come from
    :func:`secrets.token_urlsafe`; a key missing from an older file is added.
    """
    path = Path(root) / SECRETS_FILE
    data = read_json(path)
    wanted = {"ls_user": lambda: LS_USER, "ls_password": lambda: secrets.token_urlsafe(18),
              "basic_auth_user": lambda: "labelstudio", "basic_auth_pass": lambda: secrets.token_urlsafe(24),
              "webhook_secret": lambda: secrets.token_urlsafe(32),
              # Label Studio's SECRET_KEY (signs sessions and its JWT tokens, the PAT included).
              # Left to Label Studio 1.23.2 it is a random key appended to its data dir's .env,
              # which django-environ re-reads wrongly when the key holds "$" (taken as a reference
              # to another variable): a new key at the next start, every token invalid (seen in CI).
              # token_urlsafe has no such character.
              "ls_secret_key": lambda: secrets.token_urlsafe(48),
              # identity of this stack's Label Studio (LABEL_STUDIO_INSTANCE of its backend and
              # worker): the same across restarts and port changes, another for another stack
              "instance_id": lambda: secrets.token_hex(8)}
    created = not data
    missing = [k for k in wanted if not data.get(k)]
    for k in missing:
        data[k] = wanted[k]()
    if missing or (path.exists() and path.stat().st_mode & 0o077):
        write_private(path, json.dumps(data, indent=1))
    return data, created


def _token_accepted(ls_url: str, pat: str) -> bool:
    """True when Label Studio still accepts the personal access token ``pat`` (a legacy key is
    taken as is): ``POST /api/token/refresh/`` answers 200 (protocol doc, section 5). A PAT signed
    with an earlier ``SECRET_KEY`` is refused with 401."""
    if pat.count(".") != 2:  # not a JWT: a legacy token, nothing to refresh
        return True
    try:
        import httpx

        return httpx.post(f"{ls_url}/api/token/refresh/", json={"refresh": pat}, timeout=30).status_code == 200
    except Exception:  # noqa: BLE001 - Label Studio unreachable: keep the stored token
        return True


def pid_alive(pid) -> bool:
    """True when process ``pid`` exists (signal 0; a process of another user, which may not be
    signalled, exists too). False for no such process or a value that is not a pid."""
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return True
    except (OSError, ValueError, TypeError):
        return False
    return True


def running_stack(root: Path) -> dict | None:
    """The state of the stack running from ``root`` (``stack.json``), or None when it is not running
    (no file, or its Label Studio / Redis processes are gone)."""
    st = read_json(Path(root) / STATE_FILE)
    pids = st.get("pids") or {}
    if not st.get("running") or not pids or not all(pid_alive(pids.get(n)) for n in ("redis", "label-studio")):
        return None
    return st


def already_running_message(root: Path) -> str | None:
    """What to do when a stack already runs from ``root`` (the refusal of a second ``faceloop up``),
    or None when none runs there (:func:`running_stack`)."""
    st = running_stack(root)
    if st is None:
        return None
    return (f"a stack is already running from {Path(root).resolve()} (Label Studio {st.get('ls_url')}, "
            f"process {(st.get('pids') or {}).get('label-studio')}); one `faceloop up` serves every project "
            "of a stack: stop it first (Ctrl-C in its terminal), then run this command again: it "
            "serves this folder's project and the earlier ones")


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
            raise StackError(f"could not create a personal access token: HTTP {r.status_code}")
        return r.json()["token"]


@dataclass
class Stack:
    """The loop's processes. Create with :meth:`start`; stop with :meth:`stop`.

    Attributes:
        root: folder for every service's data, the secrets, the state file and the logs.
        document_root: Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT`` (None: local files off).
        ls_url, backend_url, redis_url: where the services listen (127.0.0.1).
        api_key: Label Studio personal access token of the admin user.
        secrets: the install's secrets (see :func:`load_secrets`); ``first_start`` is True when
            they were generated by this start (the admin password is shown once then).
        env: environment the backend and worker run with (our settings).
        ports: ``{"label-studio", "backend", "redis"}`` -> port.
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
    secrets: dict = field(default_factory=dict)
    first_start: bool = False
    extra_env: dict = field(default_factory=dict)
    ls_timeout: float = 180

    @property
    def ls_user(self) -> str:
        return self.secrets["ls_user"]

    @property
    def ls_password(self) -> str:
        return self.secrets["ls_password"]

    @property
    def basic_auth(self) -> tuple[str, str]:
        return self.secrets["basic_auth_user"], self.secrets["basic_auth_pass"]

    @property
    def webhook_secret(self) -> str:
        return self.secrets["webhook_secret"]

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def _spawn(self, name: str, cmd: list[str], env: dict, cwd: Path | None = None) -> subprocess.Popen:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        f = open(logs / f"{name}.log", "ab")
        # umask 077: whatever the services write (Label Studio's and faceloop's databases, tokens,
        # models) is readable by this user only
        p = subprocess.Popen(cmd, env=env, cwd=str(cwd or self.root), stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
        self.procs[name] = p
        return p

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    @classmethod
    def start(cls, root: Path, document_root: Path | None = None, worker: bool = True,
              extra_env: dict | None = None, ls_timeout: float = 180, var_dir: Path | None = None,
              ports: dict | None = None, stable_ports: bool = False) -> "Stack":
        """Start redis-server, Label Studio, the backend and (optionally) a Celery worker.

        Args:
            root: working folder (created; kept between runs: Label Studio's data, secrets, state).
            document_root: folder Label Studio serves as ``/data/local-files/?d=`` (images that
                stay where they are: nothing is copied). Local Files storages must be strict
                subfolders of it (Label Studio refuses the root itself).
            extra_env: settings for backend and worker (e.g. ``TRAIN_EPOCHS``).
            var_dir: faceloop's state folder (database, models); default ``<root>/var``.
            ports: ports asked for, by service name (``label-studio``, ``backend``, ``redis``);
                one that is taken is an error.
            stable_ports: for services not in ``ports``, try the port of the last start, then the
                usual one (8080/9090/6379), before a free one. False (tests): free ports.
        Raises: StackError naming the service that failed and its log; a stack already running
            from ``root``.
        """
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        busy = already_running_message(root)
        if busy:
            raise StackError(busy)
        sec, created = load_secrets(root)
        st = cls(root=root, document_root=Path(document_root).resolve() if document_root else None,
                 var_dir=Path(var_dir).resolve() if var_dir else root / "var", secrets=sec, first_start=created)
        st._choose_ports(ports or {}, stable_ports)
        st.extra_env, st.ls_timeout = dict(extra_env or {}), ls_timeout
        try:
            st._start_redis()
            st._start_label_studio(ls_timeout)
            st._start_backend(st.extra_env)
            if worker:
                st.start_worker()
            for db in st.var_dir.glob("*.db*"):
                os.chmod(db, 0o600)
            st.save_state(running=True)
        except BaseException:
            st.stop()
            raise
        return st

    def _choose_ports(self, asked: dict, stable: bool) -> None:
        last = (read_json(self.state_path).get("ports") or {}) if stable else {}
        taken: set[int] = set()
        for name in DEFAULT_PORTS:
            if asked.get(name):
                port = int(asked[name])
                if not port_is_free(port) or port in taken:
                    raise StackError(f"port {port} asked for {name} is in use")
            else:
                cands = [last.get(name), DEFAULT_PORTS[name]] if stable else []
                port = next((int(c) for c in cands if c and int(c) not in taken and port_is_free(int(c))), None)
                while port is None or port in taken:
                    port = free_port()
            taken.add(port)
            self.ports[name] = port

    def save_state(self, running: bool, **extra) -> None:
        """Write ``stack.json`` (mode 0600): URLs, ports, pids, folders; keeps recorded projects."""
        state = read_json(self.state_path)
        state.update({
            "running": running, "root": str(self.root), "ls_url": self.ls_url, "backend_url": self.backend_url,
            "redis_url": self.redis_url, "ports": self.ports, "var_dir": str(self.var_dir),
            "document_root": str(self.document_root) if self.document_root else None,
            "token_file": str(self.root / "label-studio" / "faceloop-pat.txt"),
            "pids": {n: p.pid for n, p in self.procs.items()}, "updated_at": time.time(),
        })
        state.update(extra)
        write_private(self.state_path, json.dumps(state, indent=1))

    def state(self) -> dict:
        return read_json(self.state_path)

    def _start_redis(self):
        exe = shutil.which("redis-server")
        if not exe:
            raise StackError("redis-server not found: run scripts/bootstrap.sh (apt-get install redis-server)")
        port = self.ports["redis"]
        (self.root / "redis").mkdir(exist_ok=True)
        p = self._spawn("redis", [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                  "--appendonly", "no", "--dir", str(self.root / "redis")], dict(os.environ))
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        import redis

        deadline = time.time() + 20
        while time.time() < deadline:
            if p.poll() is not None:  # e.g. its port taken: it exits at once
                raise StackError(f"redis-server exited with {p.returncode}; see {self.log('redis')}")
            try:  # timeouts: something else listening on the port must not hang the start
                redis.Redis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=1).ping()
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                time.sleep(0.2)
        raise StackError(f"redis-server did not start; see {self.log('redis')}")

    def _start_label_studio(self, timeout: float, first: bool = True):
        port = self.ports["label-studio"]
        self.ls_url = f"http://127.0.0.1:{port}"
        data = self.root / "label-studio"
        data.mkdir(exist_ok=True)
        os.chmod(data, 0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env.pop("LABEL_STUDIO_HOST", None)
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(data), "XDG_DATA_HOME": str(data / "xdg"),
            "XDG_CONFIG_HOME": str(data / "xdg"), "XDG_CACHE_HOME": str(data / "xdg"), "HOME": str(data),
            "LABEL_STUDIO_USERNAME": self.ls_user, "LABEL_STUDIO_PASSWORD": self.ls_password,
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false", "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false", "USE_DEFAULT_BANNED_SUBNETS": "false",
            "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        })
        if self.secrets.get("ls_secret_key"):  # see load_secrets: a key Label Studio keeps across restarts
            env["SECRET_KEY"] = self.secrets["ls_secret_key"]
        if self.document_root:
            env.update({"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root)})
        if first and self.first_start and (data / "label_studio.sqlite3").exists():
            # data of a faceloop from before per-install secrets: give its admin the new password
            subprocess.run([str(ls_bin()), "reset_password", "--username", self.ls_user, "--password",
                            self.ls_password, "--data-dir", str(data)], env=env, cwd=data, timeout=300,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, check=False)
        p = self._spawn("label-studio", [str(ls_bin()), "start", "--no-browser", "--port", str(port),
                                         "--internal-host", "127.0.0.1", "--data-dir", str(data)], env, cwd=data)
        wait_http(self.ls_url + "/health", timeout, p, self.log("label-studio"))
        for db in data.glob("*.sqlite3"):
            os.chmod(db, 0o600)
        token_file = data / "faceloop-pat.txt"
        if token_file.exists() and _token_accepted(self.ls_url, token_file.read_text().strip()):
            self.api_key = token_file.read_text().strip()
            os.chmod(token_file, 0o600)
        else:  # first start, or a PAT signed with an earlier SECRET_KEY: a new one
            self.api_key = get_personal_access_token(self.ls_url, self.ls_user, self.ls_password)
            write_private(token_file, self.api_key)

    def service_env(self, extra: dict) -> dict:
        """Environment of backend and worker: our settings for this stack (auth on)."""
        env = dict(os.environ)
        user, pw = self.basic_auth
        env.update({
            "LABEL_STUDIO_URL": self.ls_url, "LABEL_STUDIO_API_KEY": self.api_key,
            "CELERY_BROKER_URL": self.redis_url, "VAR_DIR": str(self.var_dir),
            "BASIC_AUTH_USER": user, "BASIC_AUTH_PASS": pw, "WEBHOOK_SECRET": self.webhook_secret,
            "LABEL_STUDIO_INSTANCE": self.secrets.get("instance_id", ""), "PYTHONUNBUFFERED": "1",
        })
        if self.document_root:
            env["LOCAL_FILES_DOCUMENT_ROOT"] = str(self.document_root)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def _start_backend(self, extra: dict):
        port = self.ports["backend"]
        self.backend_url = f"http://127.0.0.1:{port}"
        self.env = self.service_env(extra)
        p = self._spawn("backend", [sys.executable, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1",
                                    "--port", str(port), "--log-level", "warning"], self.env, cwd=REPO_ROOT)
        user, pw = self.basic_auth
        deadline = time.time() + 60
        while time.time() < deadline:  # /health needs the basic auth now
            if p.poll() is not None:
                raise StackError(f"backend exited with {p.returncode}; see {self.log('backend')}")
            try:
                if httpx.get(self.backend_url + "/health", auth=(user, pw), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StackError(f"backend did not come up within 60 s; see {self.log('backend')}")

    def start_worker(self, name: str = "worker"):
        """Start a Celery worker (queues ``train`` and ``score``, one process)."""
        self._spawn(name, [sys.executable, "-m", "celery", "-A", "ml_worker.celery_app", "worker",
                           "-Q", "train,score", "-c", "1", "--pool", "solo", "-n", f"{name}@%h",
                           "--loglevel", "INFO"], self.env, cwd=REPO_ROOT)
        log = self.log(name)
        start = log.stat().st_size if log.exists() else 0
        deadline = time.time() + 90
        while time.time() < deadline:
            if log.exists() and b"ready." in log.read_bytes()[start:]:
                return
            if self.procs[name].poll() is not None:
                raise StackError(f"celery worker exited; see {log}")
            time.sleep(0.5)
        raise StackError(f"celery worker not ready within 90 s; see {log}")

    def restart(self, name: str) -> subprocess.Popen:
        """Start service ``name`` again on the same port with the same settings (what is left of
        the old process group is killed first), wait until it answers, and record its new pid.

        After a Redis restart the backend and the worker reconnect on their own (redis-py per
        request; Celery's ``broker_connection_retry``); after a Label Studio restart its data,
        admin token and the projects' ML backend connections are the same (same port, same
        data folder).
        Raises: StackError when it does not come up (its process is then killed, so that it
            counts as dead).
        """
        old = self.procs.get(name)
        if old is not None:
            _kill_group(old)
        try:
            if name == "redis":
                self._start_redis()
            elif name == "label-studio":
                self._start_label_studio(self.ls_timeout, first=False)
            elif name == "backend":
                self._start_backend(self.extra_env)
            elif name.startswith("worker"):
                self.start_worker(name)
            else:
                raise StackError(f"unknown service {name!r}")
        except BaseException:
            p = self.procs.get(name)
            if p is not None and p is not old:
                _kill_group(p)
            raise
        finally:
            if self.state_path.exists():
                self.save_state(running=True)
        return self.procs[name]

    def log_tail(self, name: str, lines: int = 8, max_bytes: int = 8192) -> list[str]:
        """The last ``lines`` lines of service ``name``'s log (at most ``max_bytes`` read)."""
        try:
            with open(self.log(name), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]

    def stop(self):
        """Stop every process and mark the state file as not running (the recorded ports and
        projects stay for the next start).

        Redis goes last: the worker, the backend and Label Studio get SIGTERM (to their process
        groups) first, SIGKILL after 15 s, and only then Redis (SIGTERM, SIGKILL after 15 s). A
        worker stopped in the middle of a training keeps its broker until it is gone, so the job
        is not failed by a refused Redis connection; a training killed at 15 s is failed, with the
        stage and epoch, and queued again as soon as the next start's worker is up
        (``ml_worker.tasks.recover_own_jobs``: the job records the worker that claimed it).
        """
        names = list(self.procs)
        for group in ([n for n in names if n != "redis"], [n for n in names if n == "redis"]):
            for name in reversed(group):
                p = self.procs[name]
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            deadline = time.time() + 15
            for name in group:
                try:
                    self.procs[name].wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    _kill_group(self.procs[name])  # and reap it: gone before we return, not an orphan
        had = bool(self.procs)
        self.procs.clear()
        if had and self.state_path.exists():
            state = read_json(self.state_path)
            state.update(running=False, pids={})
            write_private(self.state_path, json.dumps(state, indent=1))


def terminate_group(p: subprocess.Popen, timeout: float = 20) -> None:
    """Stop ``p`` and its children: SIGTERM to its process group (``p`` must have been started
    with ``start_new_session=True``), SIGKILL after ``timeout`` seconds; reaped either way."""
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        _kill_group(p)


def _kill_group(p: subprocess.Popen) -> None:
    """SIGKILL ``p``'s process group (its children too) and reap it."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        pass


def exit_text(code: int) -> str:
    """``"exit code 3"``, or ``"killed by SIGKILL (exit code -9)"`` for a signal."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            pass
    return f"exit code {code}"


class ServiceFailed(StackError):
    """A service kept dying: more than the allowed restarts within the window."""


@dataclass
class Supervisor:
    """Restarts the services of a :class:`Stack` that die, with exponential backoff.

    A service that exits is started again after ``backoff_s`` x 2^(k-1) seconds (1, 2, 4, 8,
    16 s with the defaults; at most ``max_backoff_s``), where k counts its restarts within the
    last ``window_s`` seconds. When it dies again after ``max_restarts`` restarts within that
    window, :meth:`check` raises :class:`ServiceFailed` (the caller stops everything).
    Every death is reported through ``say`` with the service, its exit code, the attempt
    (k of ``max_restarts``) and the last lines of its log.
    """

    stack: Stack
    say: object = print
    max_restarts: int = 5
    window_s: float = 600.0
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    restarts: dict = field(default_factory=dict)  # service -> monotonic times of its restarts

    def check(self) -> list[str]:
        """Restart every service that has exited; returns their names.

        Raises: ServiceFailed naming the service, its exit code and its log when it died more
            than ``max_restarts`` times within ``window_s``.
        """
        done = []
        for name, p in list(self.stack.procs.items()):
            code = p.poll()
            if code is None:
                continue
            now = time.monotonic()
            recent = [t for t in self.restarts.get(name, []) if now - t < self.window_s]
            tail = self.stack.log_tail(name)
            shown = "\n".join("    | " + ln[:300] for ln in tail) or "    | (log empty)"
            if len(recent) >= self.max_restarts:
                raise ServiceFailed(
                    f"{name} died again ({exit_text(code)}) after {len(recent)} restarts within "
                    f"{self.window_s:g} s: giving up and stopping every service. Last lines of "
                    f"{self.stack.log(name)}:\n{shown}")
            attempt = len(recent) + 1
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
            self.say(f"{name} died ({exit_text(code)}); restarting it in {delay:g} s (attempt {attempt} of "
                     f"{self.max_restarts}). Last lines of {self.stack.log(name)}:\n{shown}")
            time.sleep(delay)
            recent.append(time.monotonic())
            self.restarts[name] = recent
            t0 = time.monotonic()
            try:
                self.stack.restart(name)
            except ServiceFailed:
                raise
            except StackError as e:
                self.say(f"{name} did not come back: {e}")
                continue
            self.say(f"{name} is back after {time.monotonic() - t0:.1f} s (pid {self.stack.procs[name].pid})")
            done.append(name)
        return done
