"""Issue 9 §6: a training job whose worker is killed (-9) is failed with the reason and re-run,
its project lock frees itself, and jobs recorded while Redis was down are sent when it returns.

Real redis-server, a real process running the real ``faceloop.train`` body (training replaced by
a sleep: tests/faults/train_probe.py), SQLite in tmp_path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import select

from backend import registry
from backend.app import create_app
from backend.db import session_scope
from backend.models import TrainingJob
from ml_worker.celery_app import make_celery
from ml_worker.tasks import alive_key, lock_name, sweep
from tests.faults.conftest import RedisServer, free_port
from tests.helpers_unit import config_text, make_settings

PROBE = Path(__file__).with_name("train_probe.py")


def _job(settings, job_id):
    with session_scope(settings.database_url) as s:
        return s.get(TrainingJob, job_id)


def _start_probe(settings, job_id, tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "DATABASE_URL": settings.database_url,
           "VAR_DIR": str(settings.var_dir), "CELERY_BROKER_URL": settings.celery_broker_url,
           "JOB_HEARTBEAT_TTL_S": str(settings.job_heartbeat_ttl_s)}
    log = open(tmp_path / "probe.log", "wb")
    return subprocess.Popen([sys.executable, str(PROBE), str(job_id)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path)


def _wait(cond, timeout, step=0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(step)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("ttl,interval", [(4.0, 1.0), (45.0, 20.0)], ids=["short", "defaults"])
def test_killed_worker_job_is_failed_with_reason_rerun_and_lock_freed(tmp_path, redis_server, ttl, interval):
    s = make_settings(tmp_path, celery_broker_url=redis_server.url, job_heartbeat_ttl_s=ttl,
                      recovery_interval_s=interval)
    with session_scope(s.database_url) as db:
        registry.upsert_project(db, 7, label_config=config_text("awake_sleep"))
        job, _ = registry.request_training(db, 7, "start_training")
        job_id = job.id
    r = redis.Redis.from_url(redis_server.url)
    proc = _start_probe(s, job_id, tmp_path)
    try:
        _wait(lambda: _job(s, job_id).stage == "training", 60)
        assert r.exists(lock_name(7)) and r.exists(alive_key(job_id))
        # alive for over two TTLs: never declared lost (the heartbeat renews lock and key)
        suspects: set = set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < min(2.5 * ttl, 12):
            assert sweep(s, suspects)["lost"] == []
            time.sleep(min(interval, 1.0))
        assert _job(s, job_id).state == "running" and r.exists(lock_name(7))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        # the recovery loop as the backend runs it: a sweep every `interval` seconds
        lost_after = None
        while lost_after is None and time.monotonic() - killed < 180:
            time.sleep(interval)
            if job_id in sweep(s, suspects)["lost"]:
                lost_after = time.monotonic() - killed
        lock_free = not r.exists(lock_name(7))
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\nttl {ttl:g} s, sweep every {interval:g} s: job declared lost {lost_after:.1f} s after kill -9; "
          f"lock freed by then: {lock_free}")
    assert lost_after is not None and lost_after < 120
    assert lock_free
    j = _job(s, job_id)
    assert j.state == "failed" and "worker lost" in j.error and "'training'" in j.error and j.finished_at
    with session_scope(s.database_url) as db:
        jobs = db.exec(select(TrainingJob).where(TrainingJob.project_id == 7).order_by(TrainingJob.id)).all()
    assert [(x.state, x.trigger) for x in jobs] == [("failed", "start_training"), ("queued", "recovery")]
    assert jobs[1].celery_id  # sent to the (live) broker
    assert r.llen("train") >= 1


def test_lost_recovery_job_is_not_rerun_again(tmp_path, redis_server):
    s = make_settings(tmp_path, celery_broker_url=redis_server.url, job_heartbeat_ttl_s=1)
    with session_scope(s.database_url) as db:
        registry.upsert_project(db, 8)
        job, _ = registry.request_training(db, 8, "recovery")
        job.state, job.started_at = "running", None  # a worker that died before its first heartbeat
        job_id = job.id
    assert sweep(s)["lost"] == [job_id]
    assert "not re-run" in _job(s, job_id).error
    with session_scope(s.database_url) as db:
        assert len(db.exec(select(TrainingJob)).all()) == 1


def test_start_training_while_redis_is_down_is_sent_when_it_returns(tmp_path):
    # issue 9 §6: the job answered "queued" but was never sent after Redis came back
    port = free_port()
    s = make_settings(tmp_path, celery_broker_url=f"redis://127.0.0.1:{port}/0")
    c = TestClient(create_app(s), client=("127.0.0.1", 1))
    assert c.post("/setup", json={"project": 9, "schema": config_text("awake_sleep")}).status_code == 200
    r = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 9}})
    assert r.status_code == 200 and r.json()["queued"] is True
    job_id = int(r.json()["job"])
    assert _job(s, job_id).celery_id == ""
    out = sweep(s)  # Redis still down: nothing lost, nothing sent, no error
    assert out["lost"] == out["sent"] == out["scoring_sent"] == []
    server = RedisServer(port, tmp_path)
    try:
        t0 = time.monotonic()
        out = sweep(s)
        print(f"\nqueued job sent {time.monotonic() - t0:.2f} s after the first sweep with Redis back")
        assert out["sent"] == [job_id]
        assert _job(s, job_id).celery_id
        assert redis.Redis.from_url(server.url).llen("train") == 1
        assert sweep(s)["sent"] == []  # sent once, not on every sweep
    finally:
        server.stop()


def test_celery_settings_for_lost_workers(tmp_path):
    s = make_settings(tmp_path)
    conf = make_celery(s).conf
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.broker_transport_options["visibility_timeout"] == s.celery_visibility_timeout_s == 3600
    assert conf.worker_prefetch_multiplier == 1


def test_redis_outage_during_training_does_not_lose_the_job(tmp_path, redis_server):
    # Redis down for longer than the TTL while the worker lives: when it returns, the heartbeat
    # takes the lock again and the job is not declared lost
    s = make_settings(tmp_path, celery_broker_url=redis_server.url, job_heartbeat_ttl_s=2.0)
    with session_scope(s.database_url) as db:
        registry.upsert_project(db, 6)
        job, _ = registry.request_training(db, 6, "start_training")
        job_id = job.id
    proc = _start_probe(s, job_id, tmp_path)
    server = None
    try:
        _wait(lambda: _job(s, job_id).stage == "training", 60)
        redis_server.stop()
        suspects: set = set()
        assert sweep(s, suspects)["lost"] == []  # Redis down: nothing decided
        time.sleep(5)  # > TTL
        server = RedisServer(redis_server.port, tmp_path)  # back, empty (no persistence)
        r = redis.Redis.from_url(server.url)
        back = _wait(lambda: r.exists(alive_key(job_id)) and r.exists(lock_name(6)), 10)
        for _ in range(3):
            assert sweep(s, suspects)["lost"] == []
            time.sleep(0.6)
        assert _job(s, job_id).state == "running"
        print(f"\nRedis back: heartbeat and lock restored {back:.1f} s later; job still running")
    finally:
        proc.kill()
        proc.wait(10)
        if server is not None:
            server.stop()
