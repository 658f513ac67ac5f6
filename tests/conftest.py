"""Shared fixtures. The e2e ``stack`` starts real redis-server, Label Studio (.venv-ls), the
backend (uvicorn) and a Celery worker on free 127.0.0.1 ports, and tears them down."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
AWAKE_SLEEP = SHARED_DATA / "awake_sleep"

#: Training settings of the e2e stack: tiny, so the test stays within minutes on 2 cores.
E2E_ENV = {"DETECTOR_EPOCHS": os.environ.get("FACELOOP_E2E_EPOCHS", "10"), "TRAIN_BATCH": "4", "IMGSZ": "256",
           "RETRAIN_MIN_ANNOTATIONS": "1000", "QUERY_BATCH_SIZE": "5"}


def require_data(folder: Path = AWAKE_SLEEP) -> Path:
    """Skip the calling test with a clear message when ../shared/data is absent."""
    if not (folder / "data.yaml").exists():
        pytest.skip(f"public face data not found at {folder} (../shared/data is provided beside the repo in CI)")
    return folder


@pytest.fixture(scope="session")
def stack(request, tmp_path_factory):
    """The whole loop on loopback (see backend.stack.Stack); its database is PostgreSQL when the
    binaries are there (always in CI, see :func:`e2e_database`), else SQLite. ``stack.database_url``."""
    from backend.stack import Stack

    env = dict(E2E_ENV)
    root = tmp_path_factory.mktemp("stack")
    url = e2e_database(request)
    if url:
        env["DATABASE_URL"] = url
    st = Stack.start(root, extra_env=env)
    st.database_url = url or f"sqlite:///{st.var_dir / 'faceloop.db'}"
    yield st
    st.stop()


# --- PostgreSQL -------------------------------------------------------------------------------
def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (tests/pgserver.py), stopped at session end.

    Skips the calling test when the PostgreSQL binaries are missing, except in CI (``CI=true``),
    where that is a failure: CI must run the database tests on PostgreSQL.
    """
    from tests.pgserver import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer()
    except PostgresUnavailable as e:
        if _in_ci():
            pytest.fail(f"CI=true and {e}")
        pytest.skip(str(e))
    yield server
    server.stop()


def _fresh_db_url(request, kind: str, tmp_path: Path):
    if kind == "sqlite":
        return f"sqlite:///{tmp_path.resolve() / 'faceloop.db'}", None
    server = request.getfixturevalue("postgres")
    return server.create_database(), server


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """URL of a fresh, empty database: once SQLite (a file in tmp_path), once PostgreSQL (a new
    database on the session's server). The schema is made on first use (backend.db.get_engine)."""
    url, server = _fresh_db_url(request, request.param, tmp_path)
    yield url
    from backend.db import forget_engine

    forget_engine(url)
    if server is not None:
        server.drop_database(url)


def e2e_database(request) -> str | None:
    """DATABASE_URL of the e2e stack: PostgreSQL when available (always in CI), else None (the
    stack's default SQLite). ``FACELOOP_E2E_DB=sqlite`` or ``=postgres`` chooses."""
    want = os.environ.get("FACELOOP_E2E_DB", "").lower()
    if want == "sqlite":
        return None
    from tests.pgserver import PostgresUnavailable, find_bin_dir

    if want != "postgres" and not _in_ci():
        try:
            find_bin_dir()
        except PostgresUnavailable:
            return None
    return request.getfixturevalue("postgres").create_database("e2e")
