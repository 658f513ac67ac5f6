"""Run by test_worker_death.py as a separate process: the real ``faceloop.train`` task body
(lock, heartbeat, claim) on job ``argv[1]``, with training replaced by a long sleep, so the test
can kill -9 it mid-run. Settings come from the environment."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ml_worker.training as training  # noqa: E402


def fake_training(settings, job_id, progress=None):
    from backend.db import session_scope
    from backend.models import TrainingJob

    with session_scope(settings.database_url) as s:
        s.get(TrainingJob, job_id).stage = "training"
    time.sleep(600)


training.run_training = fake_training
from ml_worker.tasks import train  # noqa: E402

train(int(sys.argv[1]))
