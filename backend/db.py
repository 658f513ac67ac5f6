"""Database engine and sessions (SQLModel over SQLAlchemy: SQLite by default, any URL works)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event
from sqlmodel import Session, SQLModel, create_engine

_engines: dict[str, object] = {}
_lock = threading.Lock()


def get_engine(url: str):
    """Engine for ``url``, created once per process; tables are created on first use.

    SQLite gets WAL mode and a 30 s busy timeout so the backend and the worker can share the file.
    """
    with _lock:
        eng = _engines.get(url)
        if eng is None:
            kwargs = {}
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            eng = create_engine(url, pool_pre_ping=True, **kwargs)
            if url.startswith("sqlite"):

                @event.listens_for(eng, "connect")
                def _pragmas(dbapi_conn, _rec):  # pragma: no cover - trivial
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA busy_timeout=30000")
                    cur.close()

            from backend import models  # noqa: F401 - register tables

            SQLModel.metadata.create_all(eng)
            _engines[url] = eng
        return eng


@contextmanager
def session_scope(url: str):
    """A session that commits on success and rolls back on error."""
    with Session(get_engine(url), expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except Exception:
            s.rollback()
            raise
