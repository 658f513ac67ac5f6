"""backend.registry over a temporary database (SQLite and PostgreSQL): coalesced training requests, promotion,
atomic weight storage, the shipped default model as every project's first version, events."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from backend import registry
from backend.config import DEFAULT_MODEL_PATH
from backend.db import session_scope
from backend.hashing import file_sha256
from backend.models import ModelVersion, Project, TrainingJob, WebhookEvent
from tests.helpers_unit import config_text, make_settings

#: The shipped default classifier's classes (face-api.js expression net, its own names and order).
EXPRESSIONS = ["neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised"]


@pytest.fixture
def settings(tmp_path, db_url):
    """Settings on a fresh database: each test runs on SQLite and on PostgreSQL (tests/conftest.py)."""
    return make_settings(tmp_path, database_url=db_url)


@pytest.fixture
def db(settings):
    return settings.database_url


def test_database_lives_under_var_dir(tmp_path):
    from backend.config import Settings

    s = Settings(var_dir=tmp_path, database_url="")
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / 'faceloop.db'}"
    assert s.model_dir == tmp_path.resolve() / "models"


def test_upsert_project(db):
    with session_scope(db) as s:
        p = registry.upsert_project(s, 3, label_config=config_text("awake_sleep"), title="t", ls_url="http://ls",
                                    min_annotations=5)
        assert p.labels == ["awake", "sleep"]
    with session_scope(db) as s:
        registry.upsert_project(s, 3, label_config="<View/>", min_annotations=None)  # unusable config: no labels
        p = s.get(Project, 3)
        assert (p.title, p.ls_url, p.min_annotations_to_start_training) == ("t", "http://ls", 5)
        assert p.labels == []


# --- training requests ------------------------------------------------------------------------
def _set_state(db, job_id, state):
    with session_scope(db) as s:
        s.get(TrainingJob, job_id).state = state


def test_request_training_coalesces(db):
    with session_scope(db) as s:
        j1, created1 = registry.request_training(s, 1, "start_training")
        j1_id = j1.id
    assert created1
    with session_scope(db) as s:  # a second request while one is queued joins it
        j2, created2 = registry.request_training(s, 1, "annotations")
        assert (j2.id, created2) == (j1_id, False)
        assert j2.trigger == "start_training"
    _set_state(db, j1_id, "running")
    with session_scope(db) as s:  # while it runs, a request queues exactly one more
        j3, created3 = registry.request_training(s, 1, "annotations")
        j3_id = j3.id
    assert created3 and j3_id != j1_id
    with session_scope(db) as s:
        for _ in range(3):
            j, created = registry.request_training(s, 1, "start_training")
            assert (j.id, created) == (j3_id, False)
    with session_scope(db) as s:
        jobs = s.exec(select(TrainingJob).where(TrainingJob.project_id == 1).order_by(TrainingJob.id)).all()
        assert [(j.id, j.state) for j in jobs] == [(j1_id, "running"), (j3_id, "queued")]
        assert s.get(Project, 1) is not None  # the project row was created on the way


def test_request_training_after_finish_queues_a_new_job(db):
    with session_scope(db) as s:
        j1, _ = registry.request_training(s, 2, "start_training")
        j1_id = j1.id
    _set_state(db, j1_id, "succeeded")
    with session_scope(db) as s:
        j2, created = registry.request_training(s, 2, "start_training")
        assert created and j2.id != j1_id


def test_request_training_is_per_project(db):
    with session_scope(db) as s:
        a, ca = registry.request_training(s, 10, "start_training")
        b, cb = registry.request_training(s, 11, "start_training")
        assert ca and cb and a.id != b.id


def test_database_refuses_two_queued_jobs(db):
    with session_scope(db) as s:
        registry.request_training(s, 4, "start_training")
    with pytest.raises(IntegrityError):
        with session_scope(db) as s:
            s.add(TrainingJob(project_id=4, trigger="x", state="queued"))
            s.flush()


# --- versions ---------------------------------------------------------------------------------
def test_promoted_version_registers_the_shipped_model(db, settings):
    assert settings.default_model_path == DEFAULT_MODEL_PATH
    assert DEFAULT_MODEL_PATH.exists(), "models/faceloop-default.json is shipped with the repo"
    sha = file_sha256(DEFAULT_MODEL_PATH)
    with session_scope(db) as s:
        v = registry.promoted_version(s, 5, settings)
        v_id = v.id
        assert v.version == f"base-{sha[:8]}"
        assert v.sha256 == sha
        assert v.path == str(DEFAULT_MODEL_PATH.resolve())
        assert v.status == "promoted" and v.promoted_at is not None
        assert v.classes == EXPRESSIONS
        assert s.get(Project, 5).promoted_version_id == v_id
    with session_scope(db) as s:  # idempotent
        assert registry.promoted_version(s, 5, settings).id == v_id
        assert len(s.exec(select(ModelVersion).where(ModelVersion.project_id == 5)).all()) == 1
    with session_scope(db) as s:  # every project gets its own row of the base model
        other = registry.promoted_version(s, 6, settings)
        assert other.version == f"base-{sha[:8]}" and other.id != v_id


def test_promoted_version_without_default_model(tmp_path):
    settings = make_settings(tmp_path, default_model_path=tmp_path / "nope.pt")
    with session_scope(settings.database_url) as s:
        with pytest.raises(FileNotFoundError, match="nope.pt is missing"):
            registry.promoted_version(s, 1, settings)


def test_next_version_name(db, settings):
    with session_scope(db) as s:
        registry.promoted_version(s, 1, settings)  # base-... does not count
        assert registry.next_version_name(s, 1) == "p1-v1"
        for n in (1, 2):
            s.add(ModelVersion(project_id=1, version=f"p1-v{n}", path="x", sha256="y"))
        registry.upsert_project(s, 12)
        s.add(ModelVersion(project_id=12, version="p12-v1", path="x", sha256="y"))
        s.flush()
        assert registry.next_version_name(s, 1) == "p1-v3"
        assert registry.next_version_name(s, 12) == "p12-v2"
        assert registry.next_version_name(s, 99) == "p99-v1"


def test_promote_retires_the_old_version(db, settings):
    with session_scope(db) as s:
        base = registry.promoted_version(s, 1, settings)
        v1 = ModelVersion(project_id=1, version="p1-v1", path="x", sha256="y", parent_id=base.id)
        s.add(v1)
        s.flush()
        assert v1.status == "candidate"
        registry.promote(s, v1, "mAP50 0.6 > 0.5")
        ids = (base.id, v1.id)
    with session_scope(db) as s:
        base, v1 = s.get(ModelVersion, ids[0]), s.get(ModelVersion, ids[1])
        assert base.status == "retired"
        assert (v1.status, v1.gate_reason) == ("promoted", "mAP50 0.6 > 0.5")
        assert v1.promoted_at is not None
        assert s.get(Project, 1).promoted_version_id == v1.id
        assert registry.promoted_version(s, 1, settings).id == v1.id
        registry.promote(s, v1, "again")  # promoting the served version keeps it promoted
        assert v1.status == "promoted" and base.status == "retired"


def test_store_weights_is_atomic(tmp_path):
    src = tmp_path / "best.pt"
    src.write_bytes(b"weights v1" * 1000)
    path, sha = registry.store_weights(src, tmp_path / "models", 7, "p7-v1")
    assert path == tmp_path / "models" / "project_7" / "p7-v1.pt"
    assert path.read_bytes() == src.read_bytes()
    assert sha == file_sha256(src)
    assert [p.name for p in path.parent.iterdir()] == ["p7-v1.pt"]  # no .tmp left behind
    src.write_bytes(b"weights v2")  # storing again replaces the file whole
    path2, sha2 = registry.store_weights(src, tmp_path / "models", 7, "p7-v1")
    assert path2 == path and path.read_bytes() == b"weights v2" and sha2 == file_sha256(src)
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*.tmp"))


def test_store_weights_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        registry.store_weights(tmp_path / "nope.pt", tmp_path / "models", 7, "p7-v1")
    assert not (tmp_path / "models" / "project_7" / "p7-v1.pt").exists()


# --- events -----------------------------------------------------------------------------------
def test_record_event(db):
    payload = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 11, "task": 22},
               "task": {"id": 22, "data": {}}}
    with session_scope(db) as s:
        ev = registry.record_event(s, "ANNOTATION_CREATED", payload)
        assert (ev.project_id, ev.annotation_id, ev.task_id) == (3, 11, 22)
        assert json.loads(ev.payload_json) == {**payload, "task": {"id": 22}}  # trimmed: no task data
        ev2 = registry.record_event(s, "ANNOTATION_CREATED", {"annotation": {"id": 5, "task": 6}})
        assert (ev2.project_id, ev2.annotation_id, ev2.task_id) == (None, 5, 6)
        ev3 = registry.record_event(s, "PROJECT_UPDATED", {"project": "junk", "annotation": [1]})
        assert (ev3.project_id, ev3.annotation_id, ev3.task_id) == (None, None, None)
        assert len(s.exec(select(WebhookEvent)).all()) == 3


def test_annotations_since_last_training(db):
    """Distinct tasks newly labelled: edits and skips do not count (more in test_retrain_trigger.py)."""
    def ann(s, action="ANNOTATION_CREATED", pid=8, task=1, cancelled=False):
        registry.record_event(s, action, {"project": {"id": pid}, "annotation": {
            "id": 100 + task, "task": task, "was_cancelled": cancelled}})

    with session_scope(db) as s:
        registry.upsert_project(s, 8)
        for task in (1, 2, 3):
            ann(s, task=task)
        ann(s, "ANNOTATION_UPDATED", task=1)  # an edit of task 1
        ann(s, task=4, cancelled=True)  # a skip
        ann(s, "ANNOTATIONS_DELETED", task=5)  # not an annotation made
        ann(s, "ANNOTATION_CREATED", pid=9, task=6)  # another project
        assert registry.annotations_since_last_training(s, 8) == 3
    with session_scope(db) as s:
        registry.request_training(s, 8, "annotations")
    with session_scope(db) as s:
        assert registry.annotations_since_last_training(s, 8) == 0
        ann(s, "ANNOTATIONS_CREATED", task=7)
        assert registry.annotations_since_last_training(s, 8) == 1
