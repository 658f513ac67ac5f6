"""Celery tasks: thin wrappers that lock, report progress and call plain functions.

- ``faceloop.train(job_id)``: one training job; a per-project Redis lock means never two
  trainings of one project at once. The job moves ``queued -> running`` only once the lock is
  held, so requests that arrive while another run is in progress join the queued job (exactly
  one more run). Idempotent: a redelivered message for a job that is no longer queued is a no-op.
  After a promotion the pool is scored (:func:`ml_worker.scoring.score_pool`).
- ``faceloop.score(project_id)``: score the whole unlabelled pool.
- ``faceloop.preannotate(project_id, task_ids)``: pre-annotate new tasks in bulk.
"""

from __future__ import annotations

import logging
import traceback

import redis
from celery.signals import worker_ready
from sqlalchemy import update
from sqlmodel import select

from backend.config import get_settings
from backend.db import session_scope
from backend.lsapi import api_error_text
from backend.models import TrainingJob, utcnow
from ml_worker.celery_app import app

log = logging.getLogger("faceloop.worker")
LOCK_TIMEOUT_S = 6 * 3600


def _redis(settings):
    return redis.Redis.from_url(settings.celery_broker_url)


def claim_job(settings, job_id: int) -> bool:
    """Atomically move a job from ``queued`` to ``running``; False if it was not queued."""
    with session_scope(settings.database_url) as s:
        res = s.exec(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.state == "queued")
                     .values(state="running", started_at=utcnow(), stage="starting"))
        return res.rowcount == 1


@app.task(bind=True, name="faceloop.train")
def train(self, job_id: int) -> dict:
    """Run training job ``job_id`` (see module docstring)."""
    from ml_worker.scoring import score_pool
    from ml_worker.training import run_training

    settings = get_settings()
    with session_scope(settings.database_url) as s:
        job = s.get(TrainingJob, job_id)
        if job is None:
            return {"job": job_id, "state": "unknown job"}
        pid = job.project_id
    lock = _redis(settings).lock(f"faceloop:train:{pid}", timeout=LOCK_TIMEOUT_S)
    with lock:
        if not claim_job(settings, job_id):
            return {"job": job_id, "state": "not queued (already run)"}
        if self.request.id:
            with session_scope(settings.database_url) as s:
                s.get(TrainingJob, job_id).celery_id = self.request.id

        def progress(fields):
            if self.request.id:
                self.update_state(state="PROGRESS", meta={k: v for k, v in fields.items() if k != "metrics"})

        try:
            outcome = run_training(settings, job_id, progress)
            scored = None
            if outcome.promoted:
                with session_scope(settings.database_url) as s:
                    s.get(TrainingJob, job_id).stage = "scoring"
                o = score_pool(settings, pid)
                scored = {"scored": o.scored, "written": o.written, "failed": o.failed, "seconds": o.seconds}
            with session_scope(settings.database_url) as s:
                j = s.get(TrainingJob, job_id)
                j.state, j.stage, j.finished_at = "succeeded", "done", utcnow()
                if scored:
                    j.message += f"; scored {scored['scored']} unlabelled tasks in {scored['seconds']} s"
            return {"job": job_id, "version": outcome.version, "promoted": outcome.promoted,
                    "reason": outcome.reason, "scored": scored}
        except Exception as e:
            log.exception("training job %s failed", job_id)
            with session_scope(settings.database_url) as s:
                j = s.get(TrainingJob, job_id)
                j.state, j.finished_at = "failed", utcnow()
                # the message only (an SDK ApiError's str() holds response headers and cookies)
                j.error = api_error_text(e) + "\n" + "".join(traceback.format_tb(e.__traceback__, limit=5))
            return {"job": job_id, "state": "failed", "error": api_error_text(e)}


@app.task(bind=True, name="faceloop.score")
def score(self, project_id: int) -> dict:
    """Score the project's unlabelled pool with its promoted version."""
    from ml_worker.scoring import score_pool

    def progress(done, total):
        if self.request.id:
            self.update_state(state="PROGRESS", meta={"done": done, "total": total})

    o = score_pool(get_settings(), project_id, progress=progress)
    return {"version": o.model_version, "scored": o.scored, "written": o.written, "failed": o.failed}


@app.task(bind=True, name="faceloop.preannotate")
def preannotate(self, project_id: int, task_ids: list[int]) -> dict:
    """Pre-annotate new tasks in bulk (predictions written to Label Studio)."""
    from ml_worker.scoring import score_pool

    o = score_pool(get_settings(), project_id, task_ids=task_ids)
    return {"version": o.model_version, "scored": o.scored, "written": o.written, "failed": o.failed}


def resend_queued_jobs(settings=None) -> list[int]:
    """Send every ``queued`` training job again (e.g. ones recorded while Redis was down).

    Safe to repeat: a job is claimed once (:func:`claim_job`)."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as s:
        ids = [j.id for j in s.exec(select(TrainingJob).where(TrainingJob.state == "queued")).all()]
    for i in ids:
        train.apply_async(args=[i], queue="train")
    return ids


@worker_ready.connect
def _on_worker_ready(sender=None, **_):  # pragma: no cover - exercised by the e2e worker
    try:
        ids = resend_queued_jobs()
        if ids:
            log.info("re-sent queued training jobs %s", ids)
    except Exception:
        log.exception("could not re-send queued jobs")
