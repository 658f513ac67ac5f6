"""A test-only Celery task, loaded into a real worker with ``-I tests.faults.sleepy_task``:
records each start (the pool process's pid) in Redis, sleeps, records the end."""

import os
import time

import redis

from ml_worker.celery_app import app


@app.task(bind=True, name="faceloop.test_sleep")
def test_sleep(self, key: str, seconds: float) -> int:
    r = redis.Redis.from_url(app.conf.broker_url)
    r.rpush(key, os.getpid())
    time.sleep(seconds)
    r.rpush(key + ":done", os.getpid())
    return os.getpid()
