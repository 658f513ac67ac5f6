"""Test-only: loaded into a real Celery worker with ``-I tests.faults.slow_training``, it replaces
the training itself (``ml_worker.training.run_training``) with a sleep of ``FACELOOP_TEST_TRAIN_S``
seconds that reports the detector stage at epoch 7 of 20, so the real ``faceloop.train`` task
(claim, lock, heartbeat) runs in a real worker without Label Studio or a model."""

import os
import time

import ml_worker.training as training


def slow_training(settings, job_id, progress=None):
    from backend.db import session_scope
    from backend.models import TrainingJob

    with session_scope(settings.database_url) as s:
        j = s.get(TrainingJob, job_id)
        j.stage, j.epoch, j.epochs = "train detector", 7, 20
    time.sleep(float(os.environ.get("FACELOOP_TEST_TRAIN_S", "600")))
    return training.TrainOutcome(version="", promoted=False, reason="test: training replaced by a sleep", metrics={})


training.run_training = slow_training
