"""Fixtures of the fault tests: a real redis-server on a free 127.0.0.1 port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis


def free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


class RedisServer:
    def __init__(self, port: int, workdir):
        self.port, self.url = port, f"redis://127.0.0.1:{port}/0"
        self.proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                r.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh installs it)")
    s = RedisServer(free_port(), tmp_path)
    yield s
    s.stop()


class TcpProxy:
    """A TCP forwarder 127.0.0.1:port -> target, which can be cut: :meth:`down` closes the
    listener and every open connection (clients then get "connection refused", as when Label
    Studio is down), :meth:`up` listens again on the same port."""

    def __init__(self, target_port: int):
        import threading

        self.target_port, self.port = target_port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._srv: socket.socket | None = None
        self.up()

    def up(self) -> None:
        import threading

        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        import threading

        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            try:
                t = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns += [c, t]
            for a, b in ((c, t), (t, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for so in (a, b):
                try:
                    so.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def down(self) -> None:
        if self._srv is not None:
            try:
                self._srv.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            self._srv.close()
            self._srv = None
        with self._lock:
            conns, self._conns = self._conns, []
        for so in conns:
            try:
                so.shutdown(socket.SHUT_RDWR)
                so.close()
            except OSError:
                pass


class LabelStudio:
    """A real Label Studio (``.venv-ls``) on a free 127.0.0.1 port, data in ``root``, with an
    admin's personal access token in ``api_key``."""

    USER, PASSWORD = "faults@faceloop.local", "faults-test-pw-1"

    def __init__(self, root):
        import os

        from backend.stack import get_personal_access_token, ls_bin, wait_http

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = root / "label-studio"
        data.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "LABEL_STUDIO"))}
        env.update({"LABEL_STUDIO_BASE_DATA_DIR": str(data), "XDG_DATA_HOME": str(data / "xdg"),
                    "XDG_CONFIG_HOME": str(data / "xdg"), "XDG_CACHE_HOME": str(data / "xdg"), "HOME": str(data),
                    "LABEL_STUDIO_USERNAME": self.USER, "LABEL_STUDIO_PASSWORD": self.PASSWORD,
                    "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
                    "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false",
                    "LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true"})
        self.log = open(root / "label-studio.log", "wb")
        self.proc = subprocess.Popen([str(ls_bin()), "start", "--no-browser", "--port", str(self.port),
                                      "--internal-host", "127.0.0.1", "--data-dir", str(data)],
                                     env=env, cwd=data, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_http(self.url + "/health", 420, self.proc, root / "label-studio.log")
            self.api_key = get_personal_access_token(self.url, self.USER, self.PASSWORD)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        from backend.stack import terminate_group

        terminate_group(self.proc)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio for the fault tests (its first start takes 1-2 min on 2 cores).
    ``FACELOOP_TEST_LS_URL`` and ``FACELOOP_TEST_LS_KEY`` (a personal access token) point the
    tests at a running one instead."""
    from backend.stack import StackError, ls_bin

    try:
        ls_bin()
    except StackError as e:
        pytest.skip(str(e))
    import os
    from types import SimpleNamespace

    if os.environ.get("FACELOOP_TEST_LS_URL"):  # reuse a running Label Studio (faster reruns)
        url, key = os.environ["FACELOOP_TEST_LS_URL"].rstrip("/"), os.environ["FACELOOP_TEST_LS_KEY"]
        yield SimpleNamespace(url=url, api_key=key, port=int(url.rsplit(":", 1)[1]))
        return
    ls = LabelStudio(tmp_path_factory.mktemp("fault-ls"))
    yield ls
    ls.stop()
