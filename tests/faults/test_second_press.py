"""Start Training pressed again while a run is in progress (README: "presses during a run give
exactly one more run"): that one more run is skipped, with the reason, when no annotation was
created, updated or deleted since the running job took its snapshot of the labels; after new,
changed or deleted labels it trains (``ml_worker.tasks.take_snapshot``).

A new user's trial: two presses 2 s apart gave two full trainings (65 s the second) on the same
17/5 images and promoted another version.

Real Label Studio (tasks and annotations through the SDK), real redis-server (the project lock
and the Celery messages), the backend's real ``/webhook`` handler for each press, the real
``faceloop.train`` task body (claim, lock, heartbeat) with the real snapshot step; only what
follows the snapshot (dataset, fine-tuning, evaluation) is replaced by a stub that performs the
person's action "during the run"."""

from __future__ import annotations

from fastapi.testclient import TestClient
from label_studio_sdk import LabelStudio as SDK
from sqlmodel import select

import ml_worker.training as training
from backend.app import create_app
from backend.config import get_settings
from backend.db import session_scope
from backend.images import ls_client
from backend.lsapi import create_project
from backend.models import TrainingJob
from ml_worker.tasks import take_snapshot, train
from tests.helpers_unit import config_text, make_settings


def box(label: str, x: float = 10) -> list[dict]:
    return [{"id": f"r{int(x)}", "from_name": "face", "to_name": "image", "type": "rectanglelabels",
             "original_width": 640, "original_height": 480, "image_rotation": 0,
             "value": {"x": x, "y": 10, "width": 20, "height": 25, "rotation": 0, "rectanglelabels": [label]}}]


def test_press_during_a_run_trains_again_only_on_changed_labels(tmp_path, label_studio, redis_server, monkeypatch,
                                                                request):
    client = SDK(base_url=label_studio.url, api_key=label_studio.api_key)
    xml = config_text("awake_sleep")
    pid = create_project(client, "second press", xml)
    tasks = [client.tasks.create(project=pid, data={"image": f"http://127.0.0.1:9/{i}.jpg"}).id for i in range(4)]
    ann = {t: client.annotations.create(id=t, result=box("awake")).id for t in tasks[:2]}
    s = make_settings(tmp_path, celery_broker_url=redis_server.url, label_studio_url=label_studio.url,
                      label_studio_api_key=label_studio.api_key)
    # the worker's task reads its settings from the environment, as a worker process does
    for k, v in {"DATABASE_URL": s.database_url, "VAR_DIR": str(tmp_path), "CELERY_BROKER_URL": redis_server.url,
                 "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.api_key}.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    request.addfinalizer(get_settings.cache_clear)
    backend = TestClient(create_app(s), client=("127.0.0.1", 1))
    assert backend.post("/setup", json={"project": pid, "schema": xml}).status_code == 200

    def press() -> int:
        r = backend.post("/webhook", json={"action": "START_TRAINING",
                                           "project": {"id": pid, "min_annotations_to_start_training": 0}})
        assert r.status_code == 200, r.text
        return int(r.json()["job"])

    trained: list[int] = []  # jobs that got past their snapshot
    during: dict = {}  # job id -> what the person does while it runs

    def run_training(settings, job_id, progress=None):  # the real snapshot; the training itself stubbed
        labelled = take_snapshot(settings, job_id, ls_client(settings, label_studio.url), pid,
                                 client.projects.get(id=pid).label_config)
        trained.append(job_id)
        during.pop(job_id, lambda: None)()
        return training.TrainOutcome(version="", promoted=False, reason=f"stub: {len(labelled)} labelled tasks",
                                     metrics={})

    monkeypatch.setattr(training, "run_training", run_training)

    def job(i):
        with session_scope(s.database_url) as db:
            return db.get(TrainingJob, i)

    def run(job_id, action=None) -> TrainingJob:
        if action:
            during[job_id] = action
        out = train(job_id)
        assert out["job"] == job_id, out
        return job(job_id)

    # 1. press, then twice more while job 1 runs: one more job, which is skipped (same labels)
    j1 = press()
    extra = []
    assert run(j1, lambda: extra.extend([press(), press()])).state == "succeeded"
    assert extra[0] == extra[1] != j1  # the two presses joined one queued job
    j2 = run(extra[0])
    assert j2.state == "skipped", (j2.state, j2.message, j2.error)
    assert f"no annotation created, updated or deleted since job {j1}'s snapshot" in j2.message
    assert "2 labelled tasks" in j2.message and j2.finished_at is not None
    assert trained == [j1]

    # 2. a press when nothing runs always trains
    j3 = press()
    # 3. while it runs: a new annotation, then a press -> that run trains
    nxt: dict = {}

    def label_then_press(key, act):
        return lambda: (act(), nxt.__setitem__(key, press()))

    assert run(j3, label_then_press("created", lambda: client.annotations.create(
        id=tasks[2], result=box("sleep")))).state == "succeeded"
    # 4. while that one runs: an annotation changed (another class), then a press -> trains
    assert run(nxt["created"], label_then_press("updated", lambda: client.annotations.update(
        id=ann[tasks[0]], result=box("sleep")))).state == "succeeded"
    # 5. while that one runs: an annotation deleted, then a press -> trains
    assert run(nxt["updated"], label_then_press("deleted", lambda: client.annotations.delete(
        id=ann[tasks[1]]))).state == "succeeded"
    # 6. while that one runs: nothing changes, a press -> skipped again
    assert run(nxt["deleted"], label_then_press("same", lambda: None)).state == "succeeded"
    last = run(nxt["same"])
    assert last.state == "skipped" and f"since job {nxt['deleted']}'s snapshot" in last.message
    assert trained == [j1, j3, nxt["created"], nxt["updated"], nxt["deleted"]]

    with session_scope(s.database_url) as db:
        jobs = db.exec(select(TrainingJob).where(TrainingJob.project_id == pid).order_by(TrainingJob.id)).all()
    shas = {j.id: j.labels_sha for j in jobs}
    assert len({shas[i] for i in (j1, nxt["created"], nxt["updated"], nxt["deleted"])}) == 4  # each change seen
    assert shas[j1] == shas[extra[0]] == shas[j3] and shas[nxt["deleted"]] == shas[nxt["same"]]
    print("\n" + "\n".join(f"job {j.id} {j.trigger} {j.state}: {j.message}" for j in jobs))


def test_fingerprint_ignores_order_and_unlabelled_tasks():
    from backend.lsapi import SnapshotTask
    from ml_worker.tasks import labels_fingerprint

    a = SnapshotTask(id=1, data={}, result=box("awake"), prediction_versions=set())
    b = SnapshotTask(id=2, data={}, result=[], prediction_versions=set())  # a background image: labelled
    none = SnapshotTask(id=3, data={}, result=None, prediction_versions=set())
    assert labels_fingerprint("x", [a, b]) == labels_fingerprint("x", [b, none, a])
    assert labels_fingerprint("x", [a, b]) != labels_fingerprint("x", [a])
    assert labels_fingerprint("x", [a]) != labels_fingerprint("y", [a])
    c = SnapshotTask(id=1, data={}, result=box("sleep"), prediction_versions=set())
    assert labels_fingerprint("x", [a]) != labels_fingerprint("x", [c])

