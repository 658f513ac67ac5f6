"""`faceloop up` restarts a service that dies instead of stopping all of them (issue 9 §6).

The real stack as a person runs it (``faceloop up FOLDER`` as a subprocess, free ports): the
worker, the backend, Redis and Label Studio are killed with ``kill -9`` one after the other;
each comes back on its port, the backend's ``/health`` answers, the worker answers a Celery ping
through the restarted Redis, Label Studio shows the project's ML backend Connected, and the
backend reads an uploaded image from the restarted Label Studio. Then Redis is made to die at
once on every start (its port taken): ``up`` gives up after its restarts, exits 1 with a clear
message and leaves no process running.

The Supervisor's backoff and giving up are also tested on small real processes (fast).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from backend.stack import ServiceFailed, Stack, StackError, Supervisor, exit_text, free_port, pid_alive
from tests.conftest import REPO


# --- Supervisor on tiny real processes --------------------------------------------------------
class _Tiny(Stack):
    """A stack whose services are shell one-liners (``cmds``), restarted by the real code path."""

    cmds: dict = {}

    def restart(self, name):
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            old.kill()
        p = self._spawn(name, ["sh", "-c", self.cmds[name]], dict(os.environ))
        time.sleep(0.2)
        if p.poll() is not None:
            raise StackError(f"{name} exited with {p.returncode}")
        return p


def test_supervisor_restarts_with_backoff_then_gives_up(tmp_path):
    st = _Tiny(root=tmp_path)
    st.cmds = {"steady": "sleep 60", "flaky": "echo starting flaky; echo 'fatal: port taken' >&2; exit 3"}
    for n in ("steady", "flaky"):
        st._spawn(n, ["sh", "-c", st.cmds[n]], dict(os.environ))
    said: list[str] = []
    sup = Supervisor(st, say=said.append, max_restarts=3, window_s=60, backoff_s=0.05)
    t0 = time.monotonic()
    try:
        with pytest.raises(ServiceFailed) as e:
            for _ in range(50):
                time.sleep(0.1)
                sup.check()
        took = time.monotonic() - t0
        msg = str(e.value)
        assert "flaky died again (exit code 3) after 3 restarts within 60 s" in msg
        assert "fatal: port taken" in msg  # the last lines of its log
        deaths = [m for m in said if m.startswith("flaky died")]
        assert [re.search(r"attempt (\d) of 3", m).group(1) for m in deaths] == ["1", "2", "3"]
        assert [re.search(r"in ([\d.]+) s", m).group(1) for m in deaths] == ["0.05", "0.1", "0.2"]
        assert all("exit code 3" in m and "fatal: port taken" in m for m in deaths)
        assert took >= 0.35
        assert st.procs["steady"].poll() is None  # the healthy one was left alone
        assert not any(m.startswith("steady") for m in said)
    finally:
        st.stop()


def test_supervisor_window_forgets_old_restarts(tmp_path):
    st = _Tiny(root=tmp_path)
    st.cmds = {"svc": "sleep 60"}
    st._spawn("svc", ["sh", "-c", "sleep 60"], dict(os.environ))
    said: list[str] = []
    sup = Supervisor(st, say=said.append, max_restarts=1, window_s=0.5, backoff_s=0.01)
    try:
        for _ in range(3):  # dies 3 times, each time after the window: restarted every time
            st.procs["svc"].kill()
            st.procs["svc"].wait()
            time.sleep(0.6)
            assert sup.check() == ["svc"]
        assert [("attempt 1 of 1" in m) for m in said if "died" in m] == [True] * 3
        assert "killed by SIGKILL (exit code -9)" in said[0]
    finally:
        st.stop()


def test_exit_text():
    assert exit_text(3) == "exit code 3"
    assert exit_text(-9) == "killed by SIGKILL (exit code -9)"
    assert exit_text(-15) == "killed by SIGTERM (exit code -15)"


# --- the real stack ---------------------------------------------------------------------------
def _jpeg(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class _Up:
    def __init__(self, tmp: Path):
        self.folder = tmp / "photos" / "faces"
        self.folder.mkdir(parents=True)
        for i in range(3):
            (self.folder / f"img{i}.jpg").write_bytes(_jpeg(i))
        self.var = tmp / "var"
        self.root = self.var / "stack"
        self.log = tmp / "up.log"
        self.ports = {"ls": free_port(), "backend": free_port(), "redis": free_port()}
        env = dict(os.environ, VAR_DIR=str(self.var), PYTHONPATH=str(REPO), COLUMNS="200", OMP_NUM_THREADS="1")
        for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "CELERY_BROKER_URL", "DATABASE_URL"):
            env.pop(k, None)
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backend.cli", "up", str(self.folder), "--ls-port", str(self.ports["ls"]),
                 "--backend-port", str(self.ports["backend"]), "--redis-port", str(self.ports["redis"])],
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def out(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.out()[start:])
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"faceloop up exited with {self.proc.returncode}:\n{self.out()[-4000:]}")
            time.sleep(0.5)
        raise AssertionError(f"{pattern!r} not seen within {timeout} s:\n{self.out()[-4000:]}")

    def state(self) -> dict:
        return json.loads((self.root / "stack.json").read_text())

    def secrets(self) -> dict:
        return json.loads((self.root / "secrets.json").read_text())


def _health(url: str, auth) -> bool:
    try:
        return httpx.get(url + "/health", auth=auth, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_pong(redis_url: str) -> bool:
    from celery import Celery

    app = Celery(broker=redis_url)
    try:
        return bool(app.control.ping(timeout=2.0))
    except Exception:  # noqa: BLE001 - broker down
        return False
    finally:
        app.close()


def _until(check, timeout: float, what: str) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if check():
            return time.time() - t0
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout} s")


@pytest.mark.e2e
def test_up_restarts_dead_services_and_gives_up_on_one_that_keeps_dying(tmp_path):
    up = _Up(tmp_path)
    pids: dict = {}
    try:
        m = up.wait_for(r"UP ([\d.]+) s project=(\d+) ls=(\S+)", 600)
        pid, ls_url = int(m.group(2)), m.group(3)
        st = up.state()
        pids = dict(st["pids"])
        backend_url, redis_url = st["backend_url"], st["redis_url"]
        sec = up.secrets()
        auth = (sec["basic_auth_user"], sec["basic_auth_pass"])
        key = (up.root / "label-studio" / "faceloop-pat.txt").read_text().strip()
        from label_studio_sdk import LabelStudio

        ls = LabelStudio(base_url=ls_url, api_key=key)
        ml_id = next(b.id for b in ls.ml.list(project=pid) if b.title == "faceloop")
        assert _until(lambda: _worker_pong(redis_url), 60, "worker pong") >= 0

        def ml_connected() -> bool:
            try:
                return ls.ml.get(id=ml_id).state == "CO"
            except Exception:  # noqa: BLE001 - Label Studio restarting
                return False

        recovery = {}
        for name, back in [("worker", lambda: _worker_pong(redis_url)),
                           ("backend", lambda: _health(backend_url, auth) and ml_connected()),
                           ("redis", lambda: _health(backend_url, auth) and _worker_pong(redis_url)),
                           ("label-studio", lambda: ml_connected() and _health(backend_url, auth))]:
            start = len(up.out())
            old = up.state()["pids"][name]
            t0 = time.time()
            os.kill(old, signal.SIGKILL)
            up.wait_for(rf"{name} died \(killed by SIGKILL \(exit code -9\)\); restarting it in 1 s "
                        r"\(attempt 1 of 5\)\. Last lines of \S+", 30, start)
            up.wait_for(rf"{name} is back after [\d.]+ s \(pid (\d+)\)", 400, start)
            new = up.state()["pids"][name]
            assert new != old and _running(new) and not _running(old)
            _until(back, 120, f"{name}: the others reconnected")
            recovery[name] = round(time.time() - t0, 1)
            pids[name] = new
        print(f"\nrecovery after kill -9, kill to the others reconnected (s): {recovery}")
        print("\n".join(re.findall(r"\S+ is back after [\d.]+ s", up.out())))
        # the backend reads images from the restarted Label Studio with its (cached) token
        files = httpx.post(f"{ls_url}/api/projects/{pid}/import?return_task_ids=true",
                           headers={"Authorization": f"Bearer {_access(ls_url, key)}"},
                           files={"file": ("face.jpg", _jpeg(7), "image/jpeg")}, timeout=60)
        assert files.status_code == 201, files.text
        task = ls.tasks.get(id=files.json()["task_ids"][0])
        assert str(task.data["image"]).startswith("/data/upload/")
        r = httpx.post(f"{backend_url}/predict", auth=auth, timeout=120, json={
            "project": f"{pid}.0", "tasks": [{"id": task.id, "project": pid, "data": task.data}],
            "label_config": ls.projects.get(id=pid).label_config})
        assert r.status_code == 200, r.text
        assert "error" not in r.json()["results"][0], r.json()

        # Redis now dies at once on every start: its port is taken by something else
        start = len(up.out())
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        os.kill(up.state()["pids"]["redis"], signal.SIGKILL)
        for _ in range(100):
            try:
                blocker.bind(("127.0.0.1", up.ports["redis"]))
                break
            except OSError:
                time.sleep(0.01)
        blocker.listen(8)
        try:
            pids = dict(up.state()["pids"])
            t0 = time.time()
            code = up.proc.wait(300)
            gave_up = time.time() - t0
        finally:
            blocker.close()
        out = up.out()[start:]
        assert code == 1, out
        assert re.search(r"error: redis died again \(exit code \d+\) after 5 restarts within 600 s: "
                         r"giving up", out), out
        assert "Address already in use" in out  # redis-server's own reason, from its log
        for k in (2, 3, 4, 5):
            assert f"attempt {k} of 5" in out
        assert "every service stopped" in out
        assert not [n for n, p in pids.items() if _running(p)], pids
        assert up.state()["running"] is False
        print(f"up exited (code {code}) {gave_up:.1f} s after the second kill of redis")
    finally:
        if up.proc.poll() is None:
            up.proc.send_signal(signal.SIGINT)
            try:
                up.proc.wait(60)
            except subprocess.TimeoutExpired:
                up.proc.kill()
        for p in pids.values():
            if pid_alive(p):
                try:
                    os.killpg(p, signal.SIGKILL)
                except OSError:
                    pass


def _running(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (an orphan's zombie may linger when
    PID 1 does not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _access(ls_url: str, pat: str) -> str:
    """A short-lived access token for the personal access token ``pat`` (protocol doc §5)."""
    r = httpx.post(f"{ls_url}/api/token/refresh/", json={"refresh": pat}, timeout=30)
    r.raise_for_status()
    return r.json()["access"]
