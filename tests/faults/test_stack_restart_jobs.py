"""Ctrl-C of ``faceloop up`` during a training, then ``faceloop up`` again: the job was shown
"running" for 40-60 s (epoch frozen, "about 2 s left") until the heartbeat sweep failed it. The
stack's worker, when it starts, now fails at once a ``running`` job whose worker was this stack's
on this host and is gone, with the reason, and queues its re-run (``ml_worker.tasks.recover_own_jobs``,
what the worker runs on ``worker_ready``). Jobs of other hosts or other stacks (a shared
PostgreSQL) and of live processes are left alone.

Real redis-server, a real process running the real ``faceloop.train`` body (claim, lock,
heartbeat; training replaced by a sleep: tests/faults/train_probe.py) killed as ``faceloop up``'s
stop kills a worker that has not finished in 15 s, SQLite in tmp_path."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import redis
from sqlmodel import select

from backend import registry
from backend.db import session_scope
from backend.models import TrainingJob, utcnow
from ml_worker.tasks import alive_key, parse_worker, recover_own_jobs, sweep
from tests.helpers_unit import make_settings

PROBE = Path(__file__).with_name("train_probe.py")
STACK = "a1b2c3d4e5f60718"


def _job(settings, job_id):
    with session_scope(settings.database_url) as s:
        return s.get(TrainingJob, job_id)


def _wait(cond, timeout, step=0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        time.sleep(step)
    raise AssertionError("condition not met in time")


def _running(settings, project, worker="", started_s_ago=120.0) -> int:
    with session_scope(settings.database_url) as s:
        registry.upsert_project(s, project)
        job, _ = registry.request_training(s, project, "start_training")
        job.state, job.stage, job.worker = "running", "train", worker
        job.started_at = utcnow() - timedelta(seconds=started_s_ago)
        return job.id


def test_worker_start_fails_this_stacks_dead_job_at_once_and_reruns_it(tmp_path, redis_server):
    s = make_settings(tmp_path, celery_broker_url=redis_server.url, label_studio_instance=STACK)
    with session_scope(s.database_url) as db:
        registry.upsert_project(db, 7)
        job, _ = registry.request_training(db, 7, "start_training")
        job_id = job.id
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "DATABASE_URL": s.database_url,
           "VAR_DIR": str(s.var_dir), "CELERY_BROKER_URL": s.celery_broker_url, "LABEL_STUDIO_INSTANCE": STACK}
    log = open(tmp_path / "probe.log", "wb")
    proc = subprocess.Popen([sys.executable, str(PROBE), str(job_id)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path)
    alive = subprocess.Popen(["sleep", "120"])  # a live process of this host and stack
    try:
        _wait(lambda: _job(s, job_id).stage == "training", 60)
        w = parse_worker(_job(s, job_id).worker)
        assert w == {"host": socket.gethostname(), "pid": str(proc.pid), "stack": STACK}
        with session_scope(s.database_url) as db:
            j = db.get(TrainingJob, job_id)
            j.stage, j.epoch, j.epochs = "train detector", 7, 20  # where the trial's job stood
        # other running jobs in a shared database
        host = socket.gethostname()
        other_host = _running(s, 8, f"host=other-{host} pid={proc.pid} stack={STACK}")
        other_stack = _running(s, 9, f"host={host} pid={proc.pid} stack=another")
        live = _running(s, 10, f"host={host} pid={alive.pid} stack={STACK}")
        unrecorded_fresh = _running(s, 11, "", started_s_ago=1)
        unrecorded_old = _running(s, 12, "")
        r = redis.Redis.from_url(redis_server.url)
        beating = _running(s, 13, "")
        r.set(alive_key(beating), str(time.time()))

        proc.send_signal(signal.SIGKILL)  # faceloop up's stop: SIGKILL after 15 s
        proc.wait(10)
        t0 = time.monotonic()
        out = recover_own_jobs(s)  # what the stack's worker runs when it starts
        took = time.monotonic() - t0
        print(f"\ndead job failed and re-run {took:.2f} s after the worker start's check (was 40-60 s): {out}")
        assert set(out) == {job_id, unrecorded_old}
        j = _job(s, job_id)
        assert j.state == "failed" and j.finished_at is not None
        assert "stopped with its worker (Ctrl-C of faceloop up, or killed)" in j.error
        assert "stage 'train detector', epoch 7 of 20 (detector and classifier together)" in j.error and f"pid {proc.pid}" in j.error
        assert j.error.endswith(f"re-run as job {out[job_id]}")
        assert "no worker recorded" in _job(s, unrecorded_old).error
        for i in (other_host, other_stack, live, unrecorded_fresh, beating):
            assert _job(s, i).state == "running", i
        with session_scope(s.database_url) as db:
            rerun = db.get(TrainingJob, out[job_id])
            assert (rerun.project_id, rerun.trigger, rerun.state) == (7, "recovery", "queued") and rerun.celery_id
        assert r.llen("train") >= 1  # sent to the broker: the starting worker takes it
        assert recover_own_jobs(s) == {}  # once
        assert job_id not in sweep(s)["lost"]  # not failed a second time by the heartbeat sweep
    finally:
        for p in (proc, alive):
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_a_dead_recovery_run_is_not_rerun_again(tmp_path, redis_server):
    s = make_settings(tmp_path, celery_broker_url=redis_server.url, label_studio_instance=STACK)
    gone = subprocess.Popen(["true"])
    gone.wait()
    with session_scope(s.database_url) as db:
        registry.upsert_project(db, 5)
        job, _ = registry.request_training(db, 5, "recovery")
        job.state, job.started_at = "running", utcnow()
        job.worker = f"host={socket.gethostname()} pid={gone.pid} stack={STACK}"
        job_id = job.id
    assert recover_own_jobs(s) == {job_id: None}
    assert _job(s, job_id).error.endswith("not re-run: it was already a recovery run")
    with session_scope(s.database_url) as db:
        assert len(db.exec(select(TrainingJob)).all()) == 1


REPO = Path(__file__).resolve().parents[2]


def _celery_worker(env, tmp_path, name):
    """A Celery worker as ``faceloop up`` runs it (``-Q train,score --pool solo``), with the
    training replaced by a sleep (tests/faults/slow_training.py)."""
    log = open(tmp_path / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "ml_worker.celery_app:app", "worker",
                             "-Q", "train,score", "-c", "1", "--pool", "solo", "-I", "tests.faults.slow_training",
                             "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _ready(tmp_path, name):
    return b"ready." in (tmp_path / f"{name}.log").read_bytes()


def test_ctrl_c_during_training_then_up_again_fails_and_reruns_the_job_when_the_worker_is_ready(tmp_path,
                                                                                                 redis_server):
    """Ctrl-C: SIGTERM to the worker, SIGKILL when it has not finished (``Stack.stop``, after 15 s;
    3 s here); the next ``up`` has a fresh Redis (no persistence) and starts a worker. Default
    heartbeat TTL (45 s) and recovery interval (20 s): the sweep alone took 40-60 s."""
    s = make_settings(tmp_path, celery_broker_url=redis_server.url, label_studio_instance=STACK)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
           "CELERY_BROKER_URL": redis_server.url, "DATABASE_URL": s.database_url, "VAR_DIR": str(tmp_path),
           "LABEL_STUDIO_INSTANCE": STACK, "FACELOOP_TEST_TRAIN_S": "600"}
    from backend.events import queue_training

    with session_scope(s.database_url) as db:
        registry.upsert_project(db, 3)
    w1 = _celery_worker(env, tmp_path, "w1")
    w2 = None
    try:
        job_id = int(queue_training(s, 3, "start_training")["job"])
        _wait(lambda: _job(s, job_id).stage == "train detector", 120)
        os.killpg(w1.pid, signal.SIGTERM)  # Ctrl-C
        try:
            w1.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(w1.pid, signal.SIGKILL)  # still training: killed
            w1.wait(10)
        assert _job(s, job_id).state == "running"  # what the status page showed for 40-60 s
        redis.Redis.from_url(redis_server.url).flushall()  # the next up's Redis starts empty
        env["FACELOOP_TEST_TRAIN_S"] = "1"
        w2 = _celery_worker(env, tmp_path, "w2")
        _wait(lambda: _ready(tmp_path, "w2"), 120)
        ready = time.monotonic()
        _wait(lambda: _job(s, job_id).state != "running", 15)
        failed_after = time.monotonic() - ready
        j = _job(s, job_id)
        assert j.state == "failed", (j.state, j.error)
        assert "stopped with its worker (Ctrl-C of faceloop up, or killed) at stage 'train detector', epoch 7 of 20" \
            in j.error, j.error
        rerun_id = int(j.error.rsplit("re-run as job ", 1)[1])
        _wait(lambda: _job(s, rerun_id).state == "succeeded", 60)
        rerun = _job(s, rerun_id)
        assert rerun.trigger == "recovery" and parse_worker(rerun.worker)["pid"] == str(w2.pid)
        print(f"\njob {job_id} failed {failed_after:.1f} s after the new worker was ready (the heartbeat sweep: "
              f"40-60 s); re-run job {rerun_id} succeeded on it: {j.error}")
    finally:
        for p in (w1, w2):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
