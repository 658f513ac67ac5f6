"""A throwaway PostgreSQL server for the tests (Debian's ``postgresql`` package, PostgreSQL 15).

``initdb`` into a fresh folder under /tmp, then ``postgres`` listening on 127.0.0.1 on a free port
(unix socket in the same folder, not in /var/run), password authentication (scram-sha-256) with a
random password, durability off (``fsync``, ``synchronous_commit``, ``full_page_writes``: the
data is thrown away). Each test gets its own database (:meth:`PostgresServer.create_database`).

PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` user that
Debian's package creates (else ``nobody``), with the folder chowned to it. pytest's tmp_path
(/tmp/pytest-of-root, mode 0700) is not reachable by that user, hence the folder of its own.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "faceloop"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (apt-get install postgresql; scripts/bootstrap.sh does)."""


def find_bin_dir() -> Path:
    """Folder of ``initdb`` and ``postgres``: ``FACELOOP_POSTGRES_BIN`` when set, else PATH, else the
    newest /usr/lib/postgresql/<n>/bin.

    Raises: PostgresUnavailable when none has them.
    """
    if os.environ.get("FACELOOP_POSTGRES_BIN"):
        d = Path(os.environ["FACELOOP_POSTGRES_BIN"])
        if (d / "initdb").exists() and (d / "postgres").exists():
            return d
        raise PostgresUnavailable(f"FACELOOP_POSTGRES_BIN={d} holds no initdb and postgres")
    exe = shutil.which("initdb")
    if exe and (Path(exe).resolve().parent / "postgres").exists():
        return Path(exe).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists():
            return Path(d)
    raise PostgresUnavailable("PostgreSQL server binaries (initdb, postgres) not found on PATH nor in "
                              "/usr/lib/postgresql/*/bin: apt-get install postgresql (scripts/bootstrap.sh)")


def _free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


class PostgresServer:
    """A running throwaway server; :meth:`stop` ends it and deletes its folder."""

    def __init__(self, start_timeout: float = 60):
        bindir = find_bin_dir()
        self.user = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self.user is None:
                raise PostgresUnavailable("running as root and neither a 'postgres' nor a 'nobody' user exists")
        self.dir = Path(tempfile.mkdtemp(prefix="faceloop-pg-"))
        self.password = secrets.token_urlsafe(18)
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "postgres.log"
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self.user is not None:
            for p in (self.dir, pwfile):
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
        run_as = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []} if self.user else {}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        try:
            r = subprocess.run([str(bindir / "initdb"), "-D", str(self.dir / "data"), "-U", SUPERUSER,
                                "-A", "scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync",
                                "--no-instructions"],
                               capture_output=True, text=True, timeout=120, cwd=self.dir, env=env, **run_as)
            pwfile.unlink()
            if r.returncode != 0:
                raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr[-2000:]}")
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [str(bindir / "postgres"), "-D", str(self.dir / "data"), "-h", "127.0.0.1", "-p", str(self.port),
                     "-k", str(self.dir), "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=200"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir, env=env,
                    start_new_session=True, **run_as)
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise
        self._n = 0

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3) of ``database`` on this server."""
        return f"postgresql+psycopg://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.password,
                               dbname=database, autocommit=True, connect_timeout=5)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                self._connect().close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready within {timeout:.0f} s: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)

    def create_database(self, prefix: str = "t") -> str:
        """Create an empty database; returns its SQLAlchemy URL."""
        self._n += 1
        name = f"{prefix}_{os.getpid()}_{self._n}"
        with self._connect() as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url`` (closing any connection still open to it)."""
        name = url.rsplit("/", 1)[-1]
        with self._connect() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self, timeout: float = 20) -> None:
        """Fast shutdown (SIGINT), SIGKILL after ``timeout`` s; then delete the folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
