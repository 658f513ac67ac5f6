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
def stack(tmp_path_factory):
    """The whole loop on loopback (see backend.stack.Stack)."""
    from backend.stack import Stack

    st = Stack.start(tmp_path_factory.mktemp("stack"), extra_env=E2E_ENV)
    yield st
    st.stop()
