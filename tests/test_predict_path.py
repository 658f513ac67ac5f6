"""The request path of single-task ``/predict`` (issue 12, speed): what it reads and writes.

``/predict`` reads the project's label config, its promoted version and the asked-for tasks'
error rows with two SQL Core queries (``backend.app.serving_state``), and writes only when
something changed. These tests check that nothing is served stale or lost with it: a version
promoted by another process (a worker) is served by the next request, a new label config is
stored, a per-task error is recorded and cleared (also one the scoring worker wrote), and the
answer is the JSON Label Studio reads. Real backend app (FastAPI TestClient), real SQLite and
PostgreSQL databases, the shipped model.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from backend.app import create_app, serving_state
from backend.config import DEFAULT_MODEL_PATH
from backend.db import session_scope
from backend.hashing import file_sha256
from backend.models import ModelVersion, Project, TaskScore, utcnow
from tests.helpers_unit import config_text, local_url, make_settings, write_jpeg

LOOPBACK = ("127.0.0.1", 50000)
PID = 7


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def settings(request, tmp_path_factory):
    """Once on SQLite, once on the session's throwaway PostgreSQL (skipped without its binaries,
    except in CI)."""
    root = tmp_path_factory.mktemp("docroot")
    write_jpeg(root / "good.jpg", width=96, height=64)
    (root / "broken.jpg").write_text("not an image")
    var = tmp_path_factory.mktemp("var")
    server = request.getfixturevalue("postgres") if request.param == "postgres" else None
    url = server.create_database() if server else f"sqlite:///{var.resolve() / 'faceloop.db'}"
    yield make_settings(var, local_files_document_root=str(root), database_url=url)
    from backend.db import forget_engine

    forget_engine(url)
    if server is not None:
        server.drop_database(url)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings), client=LOOPBACK) as c:
        yield c


def _predict(client, tasks, config=None):
    body = {"project": f"{PID}.1", "tasks": [{"id": t, "project": PID, "data": {"image": local_url(u)}}
                                             for t, u in tasks]}
    if config is not None:
        body["label_config"] = config
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()["results"]


def _error_rows(settings):
    with session_scope(settings.database_url) as s:
        return {(r.task_id, r.model_version): r.error
                for r in s.exec(select(TaskScore).where(TaskScore.project_id == PID, TaskScore.error != "")).all()}


def test_setup_then_predict_serves_the_promoted_version(client, settings):
    config = config_text("face_expressions")
    assert client.post("/setup", json={"project": f"{PID}.1", "schema": config}).status_code == 200
    res = _predict(client, [(1, "good.jpg")], config)
    assert res[0]["model_version"] == f"base-{file_sha256(DEFAULT_MODEL_PATH)[:8]}"
    assert isinstance(res[0]["score"], float) and isinstance(res[0]["result"], list)
    # without label_config in the body, the stored one serves
    assert _predict(client, [(1, "good.jpg")])[0]["model_version"] == res[0]["model_version"]


def test_a_version_promoted_by_another_process_is_served_by_the_next_request(client, settings):
    """Nothing is cached between requests: the worker's promotion (a database write in another
    process) is seen at once."""
    with session_scope(settings.database_url) as s:
        v = ModelVersion(project_id=PID, version=f"p{PID}-v9", path=str(DEFAULT_MODEL_PATH),
                         sha256=file_sha256(DEFAULT_MODEL_PATH), status="promoted", promoted_at=utcnow())
        s.add(v)
        s.flush()
        s.get(Project, PID).promoted_version_id = v.id
    assert _predict(client, [(1, "good.jpg")], config_text("face_expressions"))[0]["model_version"] == f"p{PID}-v9"


def test_a_new_label_config_is_stored(client, settings):
    new = config_text("awake_sleep")
    _predict(client, [(1, "good.jpg")], new)
    with session_scope(settings.database_url) as s:
        assert s.get(Project, PID).label_config == new
    assert serving_state(settings.database_url, PID, []).label_config == new
    _predict(client, [(1, "good.jpg")], config_text("face_expressions"))  # and back
    with session_scope(settings.database_url) as s:
        assert s.get(Project, PID).label_config == config_text("face_expressions")


def test_per_task_errors_are_recorded_and_cleared_also_the_workers(client, settings):
    version = _predict(client, [(1, "good.jpg")])[0]["model_version"]
    res = _predict(client, [(21, "broken.jpg"), (22, "good.jpg")])
    assert "error" in res[0] and "result" in res[1]
    assert (21, version) in _error_rows(settings) and (22, version) not in _error_rows(settings)
    # the scoring worker failed on task 23 (its row has the error); /predict now succeeds for it
    with session_scope(settings.database_url) as s:
        s.add(TaskScore(project_id=PID, task_id=23, model_version=version, uncertainty=1.0, least_confidence=1.0,
                        margin=1.0, entropy=1.0, error="could not fetch the image"))
        s.add(TaskScore(project_id=PID, task_id=24, model_version=version, uncertainty=1.0, least_confidence=1.0,
                        margin=1.0, entropy=1.0, error="could not fetch the image"))
    assert serving_state(settings.database_url, PID, [22, 23, 24, 25]).error_tasks == {23, 24}
    _predict(client, [(23, "good.jpg")])
    rows = _error_rows(settings)
    assert (23, version) not in rows and (24, version) in rows and (21, version) in rows  # only what succeeded
    _predict(client, [(21, "good.jpg"), (24, "good.jpg")])  # the images were fixed
    assert _error_rows(settings) == {}


def test_unknown_project_and_bad_config_answer_as_before(client):
    r = client.post("/predict", json={"tasks": [{"id": 1, "project": 999, "data": {"image": local_url("good.jpg")}}],
                                      "label_config": config_text("face_expressions")})
    assert r.status_code == 404 and "not set up" in r.json()["detail"]
    r = client.post("/predict", json={"tasks": [{"id": 1, "project": 999, "data": {"image": "x"}}],
                                      "label_config": "<View>"})
    assert r.status_code == 422 and "cannot serve" in r.json()["detail"]
    r = client.post("/predict", json={"tasks": [{"id": 1, "project": PID, "data": {"image": "x"}}],
                                      "label_config": "<View>"})
    assert r.status_code == 422
    assert client.post("/predict", json={"tasks": []}).json() == {"results": []}


def test_the_answer_is_the_json_starlette_would_send(client):
    """Encoded without FastAPI's jsonable_encoder walk: the same bytes as Starlette's JSONResponse."""
    from starlette.responses import JSONResponse

    body = {"project": f"{PID}.1", "tasks": [{"id": 31, "project": PID, "data": {"image": local_url("good.jpg")}},
                                             {"id": 32, "project": PID, "data": {}}]}
    r = client.post("/predict", json=body)
    assert r.content == JSONResponse(json.loads(r.content)).body
    assert r.headers["content-length"] == str(len(r.content))
