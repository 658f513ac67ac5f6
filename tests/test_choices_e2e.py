"""An image-level Choices project on real parts: Label Studio, redis-server, a Celery worker, the backend.

A person's path through the SDK (issue 11 item 4/5):

1. connecting the backend to a project faceloop cannot serve (polygons only) fails with faceloop's
   reason in the message Label Studio returns to the *Connect Model* form;
2. a Choices project (awake/sleep per image) gets image-level predictions from *Retrieve
   Predictions* (the shipped model knows no awake/sleep: empty results, most uncertain);
3. 16 tasks are annotated with choices, *Start Training* runs, a new version is trained from
   the choices (classifier only), gated by image-level accuracy with its reason recorded, and,
   promoted, serves Choices predictions that Label Studio stores.

Bounded: 24 images of ``../shared/data/awake_sleep`` and the e2e stack's small training settings.
"""

from __future__ import annotations

import time

import pytest
from sqlmodel import select

from backend.demo import annotate_from_ground_truth, dataset_names, ground_truth_boxes, retrieve_predictions, wait_for_job
from backend.labels import ProjectSchema
from backend.lsapi import connect_backend, create_project, upload_images
from tests.conftest import REPO, require_data
from tests.helpers_unit import POLYGON_CONFIG

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_IMAGES, N_LABELLED = 24, 16


def _predictions(client, pid):
    return {t.id: list(t.predictions or []) for t in client.tasks.list(project=pid, fields="all")}


def test_unsupported_config_is_refused_with_faceloops_reason(stack):
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    pid = client.projects.create(title="e2e polygons", label_config=POLYGON_CONFIG).id
    with pytest.raises(ApiError) as e:
        connect_backend(client, pid, stack.backend_url, basic_auth=stack.basic_auth)
    assert e.value.status_code == 400
    shown = " ".join(e.value.body["validation_errors"]["non_field_errors"])
    # what Label Studio's form shows: its own sentence, then the URL that spells our reason
    assert "doesn't look like a valid ML backend" in shown
    assert "faceloop+cannot+serve+this+label+config:+label+config+has+no+RectangleLabels" in shown
    assert "PolygonLabels" in shown, shown
    assert client.ml.list(project=pid) == []

    # connected while the config was served, then the config changes: the model card says why
    xml = (REPO / "label_config" / "awake_sleep_choices.xml").read_text()
    pid = client.projects.create(title="e2e config changes", label_config=xml).id
    connect_backend(client, pid, stack.backend_url, basic_auth=stack.basic_auth)
    assert client.ml.list(project=pid)[0].state == "CO"
    client.projects.update(id=pid, label_config=POLYGON_CONFIG)
    ml = client.ml.list(project=pid)[0]  # Label Studio re-runs /health and /setup
    assert ml.state == "ER" and "faceloop+cannot+serve+this+label+config" in (ml.error_message or ""), ml


def test_choices_project_end_to_end(stack):
    data = require_data()
    from label_studio_sdk import LabelStudio

    from backend.db import session_scope
    from backend.models import ModelVersion, TrainingJob

    t0 = time.time()
    db_url = stack.database_url  # the stack's own database (PostgreSQL in CI)
    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    xml = (REPO / "label_config" / "awake_sleep_choices.xml").read_text()
    schema = ProjectSchema.parse(xml)
    assert schema.is_choices
    names = dataset_names(data)
    imgs = sorted((data / "images" / "train").glob("*.jpg"))
    files = imgs[7 :: len(imgs) // N_IMAGES][:N_IMAGES]  # spread over the sources, not test_e2e's images

    pid = create_project(client, "e2e choices", xml)
    ids = upload_images(client, stack.ls_url, pid, files)
    assert len(ids) == N_IMAGES
    task_image = dict(zip(ids, files))
    connect_backend(client, pid, stack.backend_url, basic_auth=stack.basic_auth, webhook_secret=stack.webhook_secret)
    assert client.ml.list(project=pid)[0].state == "CO"

    # day 0: Retrieve Predictions gives every task one image-level prediction of the shipped
    # version; it knows expressions, not awake/sleep, so no choice is made and every task is
    # maximally uncertain (score 0)
    retrieve_predictions(client, pid)
    preds = _predictions(client, pid)
    assert all(len(ps) == 1 for ps in preds.values()), {k: len(v) for k, v in preds.items()}
    assert {ps[0].model_version for ps in preds.values()} == {client.ml.list(project=pid)[0].model_version}
    for ps in preds.values():
        assert ps[0].result == [] and ps[0].score == 0.0

    # a person labels 16 images with the class of the main (largest) face
    items = list(task_image.items())
    held_out = dict(items[2::3])
    labelled = {k: v for k, v in items if k not in held_out}
    assert len(labelled) == N_LABELLED
    truth = {}
    for tid, img in task_image.items():
        boxes, _, _ = ground_truth_boxes(img, names)
        truth[tid] = max(boxes, key=lambda b: (b.x2 - b.x1) * (b.y2 - b.y1)).label
    assert annotate_from_ground_truth(client, pid, labelled, schema, names) == N_LABELLED
    ann = client.annotations.list(id=next(iter(labelled)))[0]
    assert [r["type"] for r in ann.result] == ["choices"]

    ml = client.ml.list(project=pid)[0]
    t_train = time.time()
    client.ml.train(id=ml.id)  # "Start Training": START_TRAINING to /webhook
    job = wait_for_job(db_url, pid, timeout=900)
    train_seconds = time.time() - t_train
    with session_scope(db_url) as s:
        job = s.get(TrainingJob, job.id)
        assert job.state == "succeeded", job.error
        assert job.n_train + job.n_val == N_LABELLED and job.epoch == job.epochs > 0
        v = s.exec(select(ModelVersion).where(ModelVersion.project_id == pid,
                                              ModelVersion.version == f"p{pid}-v1")).one()
        version, status, reason, m = v.version, v.status, v.gate_reason, v.metrics
        assert v.classes == ["awake", "sleep"]
    assert m["kind"] == "choices" and m["detector_retrained"] is False
    assert m["val_images"] == len(m["val_task_ids"]) >= 2
    assert reason.startswith("image accuracy"), reason  # the gate's reason is recorded
    assert m["current"]["no_choice"] == m["val_images"], "the shipped version makes no awake/sleep choice"
    cand = m["candidate"]
    assert 0.0 <= cand["accuracy"] <= 1.0 and cand["images"] == m["val_images"]
    print(f"\nChoices e2e: {version} {status} ({reason}); train+score {train_seconds:.0f} s")
    # the current version gets no validation image right, so any right choice promotes the candidate
    assert (status == "promoted") == (cand["accuracy"] > 0), (status, reason)
    assert status == "promoted", f"candidate got no validation image right: {reason}"

    # the promoted version's image-level predictions are in Label Studio, for the unlabelled tasks
    assert client.projects.get(id=pid).model_version == version
    preds = _predictions(client, pid)
    chosen = right = 0
    for tid in held_out:
        mine = [p for p in preds[tid] if p.model_version == version]
        assert len(mine) == 1, f"task {tid}: {[p.model_version for p in preds[tid]]}"
        for r in mine[0].result:
            assert r["type"] == "choices" and r["from_name"] == "state" and r["to_name"] == "image"
            assert r["value"]["choices"][0] in ("awake", "sleep") and 0.0 <= r["score"] <= 1.0
        if mine[0].result:
            chosen += 1
            right += mine[0].result[0]["value"]["choices"][0] == truth[tid]
        assert 0.0 <= mine[0].score <= 1.0
    assert chosen >= len(held_out) // 2, f"only {chosen}/{len(held_out)} held-out tasks got a choice"

    # the sampler scored them from the chosen face's class probabilities: Label Studio's score is
    # 1 - the stored uncertainty, and the review view serves the most uncertain first
    from backend.lsapi import review_queue
    from backend.models import TaskScore

    from ml_worker.scoring import BATCH_SCORE_SPAN

    with session_scope(db_url) as s:
        rows = {r.task_id: r for r in s.exec(select(TaskScore).where(
            TaskScore.project_id == pid, TaskScore.model_version == version)).all()}
        scores = {t: r.uncertainty for t, r in rows.items()}
        rank = {t: r.rank for t, r in rows.items()}
        flagged = {t for t, r in rows.items() if r.in_query_batch}
    for tid in held_out:
        mine = [p for p in preds[tid] if p.model_version == version][0]
        if tid in flagged:  # the query batch: below every other task, so that Label Studio serves it first
            assert 0.0 <= mine.score < BATCH_SCORE_SPAN, (tid, mine.score)
        else:
            assert abs(mine.score - (1 - scores[tid])) < BATCH_SCORE_SPAN + 1e-4
    head = review_queue(client, pid, "Review queue", limit=len(held_out))
    assert {t["id"] for t in head} == set(held_out)
    assert [t["id"] for t in head] == sorted(held_out, key=lambda t: rank[t])  # the batch, then the most uncertain
    unc = [scores[t["id"]] for t in head if t["id"] not in flagged]
    assert unc == sorted(unc, reverse=True), unc
    # the status page shows the version with its image accuracy and the gate's reason
    import httpx

    page = httpx.get(f"{stack.backend_url}/status/{pid}", auth=stack.basic_auth, timeout=30)
    assert page.status_code == 200 and version in page.text and "image acc." in page.text
    print(f"held-out: {chosen}/{len(held_out)} with a choice, {right} right; whole test {time.time() - t0:.0f} s")
