"""The retrain trigger follows Label Studio's project switch "Start model training on annotation
submission" and counts tasks newly labelled since the last training (backend.events.handle_event,
backend.registry.annotations_since_last_training). Redis is unreachable: a queued job stays in the
database, which is what is checked."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import select

from backend import events
from backend.db import session_scope
from backend.events import handle_event, retrain_threshold
from backend.models import TrainingJob
from tests.helpers_unit import make_settings

SWITCH_ON = 1  # what Label Studio 1.23.2 stores when the switch is turned on (projects/serializers.py)


@pytest.fixture()
def settings(tmp_path, db_url):
    """On SQLite and on PostgreSQL (tests/conftest.py::db_url)."""
    return make_settings(tmp_path, retrain_min_annotations=3, database_url=db_url)


def _jobs(settings, pid):
    with session_scope(settings.database_url) as s:
        return [(j.trigger, j.state) for j in
                s.exec(select(TrainingJob).where(TrainingJob.project_id == pid).order_by(TrainingJob.id)).all()]


def _now(dt: float = 0.0) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=dt)).isoformat().replace("+00:00", "Z")


def annotate(settings, pid, task, switch=SWITCH_ON, action="ANNOTATION_CREATED", cancelled=False, ann_id=None,
             created_at=None):
    payload = {"project": {"id": pid, "min_annotations_to_start_training": switch},
               "annotation": {"id": ann_id or 1000 + task, "task": task, "result": [], "was_cancelled": cancelled,
                              "created_at": created_at or _now()},
               "task": {"id": task, "data": {}}}
    return handle_event(settings, action, payload)


def test_switch_values():
    s = make_settings(__import__("pathlib").Path("/tmp"), retrain_min_annotations=7)
    assert retrain_threshold(s, 0) is None           # off
    assert retrain_threshold(s, SWITCH_ON) == 7      # the switch: RETRAIN_MIN_ANNOTATIONS
    assert retrain_threshold(s, 4) == 4              # a threshold set through the API


def test_switch_off_never_triggers(settings):
    for task in range(1, 11):
        r = annotate(settings, 1, task, switch=0)
        assert r["status"] == "recorded" and "off" in r["auto_retrain"]
    assert _jobs(settings, 1) == []


def test_new_tasks_reach_the_threshold(settings):
    assert annotate(settings, 2, 1) == {"status": "recorded", "new_tasks": 1, "retrain_at": 3}
    assert annotate(settings, 2, 2)["new_tasks"] == 2
    assert _jobs(settings, 2) == []
    r = annotate(settings, 2, 3)
    assert r["status"] == "ok" and r["new_tasks"] == 3 and r["queued"] is True
    assert _jobs(settings, 2) == [("annotations", "queued")]


def test_edits_of_one_task_count_once(settings):
    annotate(settings, 3, 1)
    for _ in range(11):  # the same annotation edited 11 times
        r = annotate(settings, 3, 1, action="ANNOTATION_UPDATED", ann_id=1001)
        assert r["new_tasks"] == 1
    assert _jobs(settings, 3) == []


def test_skips_do_not_count_but_a_later_label_does(settings):
    for task in range(1, 11):
        assert annotate(settings, 4, task, cancelled=True)["new_tasks"] == 0
    assert _jobs(settings, 4) == []
    # task 1 was skipped, then labelled (Label Studio updates the cancelled annotation)
    assert annotate(settings, 4, 1, action="ANNOTATION_UPDATED", ann_id=1001)["new_tasks"] == 1


def test_counting_restarts_after_training_and_edits_of_old_tasks_do_not_count(settings):
    old = _now(-60)
    for task in (1, 2, 3):
        annotate(settings, 5, task, created_at=old)
    assert _jobs(settings, 5) == [("annotations", "queued")]
    time.sleep(0.01)
    # rewriting the 3 annotations made before that training: nothing new
    for task in (1, 2, 3):
        r = annotate(settings, 5, task, action="ANNOTATION_UPDATED", created_at=old)
        assert r["new_tasks"] == 0
    # after the job: new tasks count from zero again
    assert annotate(settings, 5, 4)["new_tasks"] == 1


def test_bulk_annotations_created(settings):
    payload = {"project": {"id": 6, "min_annotations_to_start_training": 2},
               "annotations": [{"id": 1, "task": 1, "was_cancelled": False, "created_at": _now()},
                               {"id": 2, "task": 2, "was_cancelled": True, "created_at": _now()},
                               {"id": 3, "task": 3, "was_cancelled": False, "created_at": _now()}]}
    r = handle_event(settings, "ANNOTATIONS_CREATED", payload)
    assert r["new_tasks"] == 2 and r["queued"] is True


def test_start_training_button_with_switch_off_queues_at_once(settings):
    r = handle_event(settings, "START_TRAINING", {"project": {"id": 7, "min_annotations_to_start_training": 0}})
    assert r["queued"] is True
    assert _jobs(settings, 7) == [("start_training", "queued")]


def test_start_training_with_switch_on(settings, monkeypatch):
    # With the switch on, Label Studio sends START_TRAINING itself on each annotation save, just
    # before that annotation's webhook: that one must not train; the button (no annotation
    # webhook after it) must.
    monkeypatch.setattr(events, "AUTO_START_WINDOW_S", 0.5)
    project = {"id": 8, "min_annotations_to_start_training": SWITCH_ON}
    r = handle_event(settings, "START_TRAINING", {"project": project})  # LS's own, on a save
    assert "decision_in_s" in r
    annotate(settings, 8, 1)
    time.sleep(1.5)
    assert _jobs(settings, 8) == []
    handle_event(settings, "START_TRAINING", {"project": project})  # the button
    time.sleep(1.5)
    assert _jobs(settings, 8) == [("start_training", "queued")]
