"""The whole loop on real parts: Label Studio, redis-server, a Celery worker, the backend, and
PostgreSQL as the backend's database when its binaries are there (always in CI; tests/conftest.py).

A person's path through the SDK: create a project (awake/sleep), import 30 face images,
*Retrieve Predictions*, annotate 20 from the ground truth, *Start Training*, wait for the new
model version; then Label Studio must hold predictions of that version whose boxes match the
ground truth on the held-out tasks, and the review view must follow the stored uncertainties.
"""

from __future__ import annotations

import time

import pytest
from sqlmodel import select

from backend.demo import annotate_from_ground_truth, dataset_names, ground_truth_boxes, retrieve_predictions, wait_for_job
from backend.geometry import iou, percent_to_pixels
from backend.labels import ProjectSchema
from backend.lsapi import connect_backend, create_project, review_queue, upload_images
from ml_worker.scoring import BATCH_SCORE_SPAN
from tests.conftest import REPO, require_data

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_IMAGES, N_LABELLED = 30, 20


def _predictions(client, pid):
    return {t.id: list(t.predictions or []) for t in client.tasks.list(project=pid, fields="all")}


def test_whole_loop(stack):
    data = require_data()
    from label_studio_sdk import LabelStudio

    from backend.db import session_scope
    from backend.models import ModelVersion, TaskScore, TrainingJob

    t_start = time.time()
    db_url = stack.database_url
    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    xml = (REPO / "label_config" / "awake_sleep.xml").read_text()
    schema = ProjectSchema.parse(xml)
    names = dataset_names(data)
    imgs = sorted((data / "images" / "train").glob("*.jpg"))
    files = imgs[:: len(imgs) // N_IMAGES][:N_IMAGES]  # spread over the sources

    pid = create_project(client, "e2e faces", xml)
    ids = upload_images(client, stack.ls_url, pid, files)
    assert len(ids) == N_IMAGES
    task_image = dict(zip(ids, files))
    connect_backend(client, pid, stack.backend_url, basic_auth=stack.basic_auth, webhook_secret=stack.webhook_secret)
    ml = client.ml.list(project=pid)
    assert ml[0].auth_method == "BASIC_AUTH"  # auth on, as `faceloop up` runs it

    # Retrieve Predictions: LS calls /setup and /predict itself
    retrieve_predictions(client, pid)
    preds = _predictions(client, pid)
    base_versions = {p.model_version for ps in preds.values() for p in ps}
    assert len(base_versions) == 1 and next(iter(base_versions)).startswith("base-"), base_versions
    assert all(len(ps) == 1 for ps in preds.values()), "every task gets exactly one prediction"
    # the default model does not know awake/sleep: faces come as unlabelled boxes to classify
    for ps in preds.values():
        for r in ps[0].result:
            assert r["value"]["rectanglelabels"] == [] and r["from_name"] == "face"
    retrieve_predictions(client, pid)  # again: same version, so no duplicates
    assert all(len(ps) == 1 for ps in _predictions(client, pid).values())

    # every third task is held out, so held-out and labelled tasks come from the same sources
    items = list(task_image.items())
    held_out = dict(items[2::3])
    labelled = {k: v for k, v in items if k not in held_out}
    assert len(labelled) == N_LABELLED
    annotate_from_ground_truth(client, pid, labelled, schema, names)

    ml = client.ml.list(project=pid)[0]
    t_train = time.time()
    client.ml.train(id=ml.id)  # "Start Training": LS sends START_TRAINING to /webhook
    # while the first job runs, two more presses queue exactly one more run, which is skipped:
    # no annotation changed since the first job's snapshot (ml_worker.tasks.take_snapshot)
    deadline = time.time() + 120
    while time.time() < deadline:
        with session_scope(db_url) as s:
            j = s.exec(select(TrainingJob).where(TrainingJob.project_id == pid)).first()
            if j is not None and j.state != "queued":
                break
        time.sleep(0.5)
    client.ml.train(id=ml.id)
    client.ml.train(id=ml.id)
    wait_for_job(db_url, pid, timeout=1500)
    train_seconds = time.time() - t_train

    with session_scope(db_url) as s:
        jobs = s.exec(select(TrainingJob).where(TrainingJob.project_id == pid).order_by(TrainingJob.id)).all()
        versions = s.exec(select(ModelVersion).where(ModelVersion.project_id == pid).order_by(ModelVersion.id)).all()
        assert [j.state for j in jobs] == ["succeeded", "skipped"], [(j.state, j.error) for j in jobs]
        assert f"since job {jobs[0].id}'s snapshot" in jobs[1].message, jobs[1].message
        assert jobs[0].epoch == jobs[0].epochs > 0, "training progress (epoch k of n) is stored"
        assert jobs[0].n_train + jobs[0].n_val == N_LABELLED
        trained = [v for v in versions if v.version.startswith(f"p{pid}-v")]
        assert [v.version for v in trained] == [f"p{pid}-v1"]
        assert trained[0].classes == ["awake", "sleep"]
        # the shipped default names no awake/sleep face: it accepts none of them as is (mAP50 0), so v1
        # wins on acceptance, or, accepting none either, on mAP50
        assert trained[0].status != "rejected", trained[0].gate_reason
        assert trained[0].metrics["current"]["mAP50"] == 0.0
        assert trained[0].metrics["current"]["accepted"] == 0
        assert trained[0].gate_reason.startswith(("accepted as is", "mAP50")), trained[0].gate_reason
        assert trained[0].metrics["val_faces"] >= 1
        promoted = [v for v in versions if v.status == "promoted"]
        assert len(promoted) == 1
        current = promoted[0].version
        m = trained[0].metrics["candidate"]
        assert 0.0 < m["mAP50"] <= 1.0 and set(m["per_class_mAP50"]) <= {"awake", "sleep"}
        scores = {r.task_id: r for r in s.exec(select(TaskScore).where(TaskScore.project_id == pid,
                                                                      TaskScore.model_version == current)).all()}

    # Label Studio's project points at the promoted version and holds its predictions
    assert client.projects.get(id=pid).model_version == current
    preds = _predictions(client, pid)
    hits = 0
    for tid, img in held_out.items():
        mine = [p for p in preds[tid] if p.model_version == current]
        assert len(mine) == 1, f"task {tid}: predictions {[p.model_version for p in preds[tid]]}"
        gt, w, h = ground_truth_boxes(img, names)
        boxes = [percent_to_pixels(r["value"], r["original_width"], r["original_height"]) for r in mine[0].result]
        for r in mine[0].result:
            assert r["value"]["rectanglelabels"][0] in ("awake", "sleep")
            assert (r["original_width"], r["original_height"]) == (w, h)
        if gt and boxes and max(iou(b, gt[0].xyxy) for b in boxes) >= 0.5:
            hits += 1
        if scores[tid].in_query_batch:  # written below every other task: Label Studio serves the batch first
            assert 0.0 <= mine[0].score < BATCH_SCORE_SPAN, (tid, mine[0].score)
        else:  # 1 - uncertainty, squeezed above the batch by at most 0.001
            assert abs(mine[0].score - (1 - scores[tid].uncertainty)) < BATCH_SCORE_SPAN + 1e-4
    assert hits >= 0.6 * len(held_out), f"only {hits}/{len(held_out)} held-out tasks have a box with IoU >= 0.5"

    # the review view serves unlabelled tasks in the stored queue order: the query batch first (pick
    # order), then the others by uncertainty (most uncertain first)
    head = review_queue(client, pid, "Review queue", limit=len(held_out))
    assert {t["id"] for t in head} == set(held_out)
    assert [t["id"] for t in head] == sorted(held_out, key=lambda t: scores[t].rank)
    flags = [scores[t["id"]].in_query_batch for t in head]
    assert any(flags) and flags == sorted(flags, reverse=True), flags
    unc = [scores[t["id"]].uncertainty for t in head if not scores[t["id"]].in_query_batch]
    assert unc == sorted(unc, reverse=True), unc
    print(f"\nE2E: train+score {train_seconds:.0f} s, whole test {time.time() - t_start:.0f} s, "
          f"held-out IoU>=0.5: {hits}/{len(held_out)}, v1 mAP50 {m['mAP50']:.3f}")
