"""A real backend (uvicorn) on a free 127.0.0.1 port, for cases where timing or concurrency matters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


class Backend:
    """``uvicorn backend.main:app`` in a subprocess, settings from ``env``; stop() ends it."""

    def __init__(self, tmp_path: Path, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        var = tmp_path / "var"
        base = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "TMPDIR")}
        base.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VAR_DIR": str(var),
                     "DATABASE_URL": f"sqlite:///{var / 'faceloop.db'}", "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
                     "LABEL_STUDIO_API_KEY": ""})
        base.update({k.upper(): str(v) for k, v in env.items()})
        self.log = open(tmp_path / "backend.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--log-level", "warning"],
                                     cwd=tmp_path, env=base, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"backend did not start: {(tmp_path / 'backend.log').read_text()[-2000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
