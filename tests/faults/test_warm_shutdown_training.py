"""Issue 9 §6: SIGTERM to a worker during a real (short) training finishes warm shutdown: the
training completes, its job ends ``succeeded``, the worker exits, and the scoring it queued
waits in Redis for the next worker, which scores the pool and writes the predictions back.

Real Label Studio (annotated tasks from ../shared/data/awake_sleep), real redis-server, a real
Celery worker as ``faceloop up`` runs it (``-Q train,score --pool solo``) and as compose runs
it (prefork), the real ``faceloop.train`` (2 detector epochs, 1 classifier epoch, 128 px)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from label_studio_sdk import LabelStudio as SDK
from sqlmodel import select

from backend import registry
from backend.db import session_scope
from backend.demo import annotate_from_ground_truth, dataset_names
from backend.events import queue_training
from backend.labels import ProjectSchema
from backend.lsapi import create_project, upload_images
from backend.models import ScoringRun, TrainingJob
from ml_worker.tasks import new_scoring_run, send_scoring
from tests.conftest import REPO, require_data
from tests.helpers_unit import config_text, make_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_IMAGES = 8


def _worker(env, tmp_path, pool):
    log = open(tmp_path / f"worker-{pool}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "ml_worker.celery_app:app", "worker",
                             "-Q", "train,score", "-c", "1", "--pool", pool, "-n", f"warm-{pool}@%h",
                             "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_sigterm_during_real_training_finishes_warm_shutdown(tmp_path, label_studio, redis_server, pool):
    data = require_data()
    client = SDK(base_url=label_studio.url, api_key=label_studio.api_key)
    xml = config_text("awake_sleep")
    imgs = sorted((data / "images" / "train").glob("*.jpg"))
    files = imgs[:: len(imgs) // N_IMAGES][:N_IMAGES]
    pid = create_project(client, f"warm shutdown {pool}", xml)
    ids = upload_images(client, label_studio.url, pid, files)
    annotate_from_ground_truth(client, pid, dict(zip(ids, files)), ProjectSchema.parse(xml), dataset_names(data))
    unlabelled = upload_images(client, label_studio.url, pid, imgs[1:: len(imgs) // 4][:4])
    s = make_settings(tmp_path, celery_broker_url=redis_server.url, label_studio_url=label_studio.url,
                      label_studio_api_key=label_studio.api_key)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
           "CELERY_BROKER_URL": redis_server.url, "DATABASE_URL": s.database_url, "VAR_DIR": str(tmp_path),
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.api_key,
           "DETECTOR_EPOCHS": "2", "CLASSIFIER_EPOCHS": "1", "IMGSZ": "128", "TRAIN_BATCH": "4",
           "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
    with session_scope(s.database_url) as db:
        registry.upsert_project(db, pid, label_config=xml, ls_url=label_studio.url)
    w = _worker(env, tmp_path, pool)
    logf = tmp_path / f"worker-{pool}.log"
    try:
        job_id = int(queue_training(s, pid, "start_training")["job"])
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240:
            with session_scope(s.database_url) as db:
                j = db.get(TrainingJob, job_id)
                if j.state == "running" and j.stage.startswith("train"):
                    break
                assert j.state in ("queued", "running"), (j.state, j.error)
            assert w.poll() is None, logf.read_text()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError("training did not start: " + logf.read_text()[-3000:])
        w.send_signal(signal.SIGTERM)  # to the worker's main process, as `docker stop` / systemd do
        term = time.monotonic()
        try:
            w.wait(240)
        except subprocess.TimeoutExpired:
            raise AssertionError("warm shutdown hung: " + logf.read_text()[-3000:]) from None
        exited = time.monotonic() - term
        with session_scope(s.database_url) as db:
            j = db.get(TrainingJob, job_id)
            runs = db.exec(select(ScoringRun).where(ScoringRun.training_job_id == job_id)).all()
            state, stage, error = j.state, j.stage, j.error
        print(f"\n{pool} pool: SIGTERM at stage training; worker exited {exited:.1f} s later with code {w.returncode}; "
              f"job {state}; scoring runs queued {[(r.state, bool(r.celery_id)) for r in runs]}")
        assert state == "succeeded", (state, stage, error, logf.read_text()[-3000:])
        assert w.returncode == 0, logf.read_text()[-3000:]
        assert "warm shutdown" in logf.read_text().lower()
        if pool == "solo":
            # the scoring queued after a promotion (or, when the gate kept the old version, one
            # queued now) runs on the next worker: the real faceloop.score, write-back to Label Studio
            run_id = runs[0].id if runs else new_scoring_run(s, pid, "manual")
            if not runs:
                assert send_scoring(s, run_id)
            w = _worker(env, tmp_path, "solo")
            t1 = time.monotonic()
            while time.monotonic() - t1 < 180:
                with session_scope(s.database_url) as db:
                    run = db.get(ScoringRun, run_id)
                    if run.state in ("succeeded", "failed") and run.write_state != "pending":
                        break
                time.sleep(1)
            print(f"next worker: scoring run ({run.trigger}) {run.state}, write-back {run.write_state!r}, "
                  f"{run.written} predictions, {time.monotonic() - t1:.1f} s after it started")
            assert (run.state, run.write_state, run.written) == ("succeeded", "done", len(unlabelled)), \
                (run.error, logf.read_text()[-3000:])
            for tid in unlabelled:
                assert [p.model_version for p in client.tasks.get(id=tid).predictions or []] == [run.model_version]
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
            w.wait(10)
