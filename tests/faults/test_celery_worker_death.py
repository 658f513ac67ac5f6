"""Issue 9 §6: a task whose worker dies is delivered again (acks_late + reject_on_worker_lost +
visibility timeout), with a real Celery worker on a real redis-server, killed with SIGKILL.

The task is a test-only sleeper (tests/faults/sleepy_task.py) on the ``score`` queue, so the
case needs neither Label Studio nor a model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from celery import Celery

REPO = Path(__file__).resolve().parents[2]
VISIBILITY_S = 5


def _worker(redis_url, tmp_path, name):
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "CELERY_BROKER_URL": redis_url, "DATABASE_URL": f"sqlite:///{tmp_path / 'faceloop.db'}",
           "VAR_DIR": str(tmp_path), "CELERY_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S), "RECOVERY_INTERVAL_S": "0"}
    log = open(tmp_path / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "ml_worker.celery_app:app", "worker", "-Q", "score",
                             "-c", "1", "--pool", "prefork", "-I", "tests.faults.sleepy_task", "-n", f"{name}@%h",
                             "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _send(redis_url, key, seconds):
    app = Celery(broker=redis_url)
    app.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_S}
    app.send_task("faceloop.test_sleep", args=[key, seconds], queue="score", ignore_result=True)


def _wait(cond, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.2)
    return None


def _stop(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def test_killed_pool_process_task_is_redelivered_at_once(tmp_path, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    w = _worker(redis_server.url, tmp_path, "w1")
    try:
        _send(redis_server.url, "k1", 3)
        assert _wait(lambda: r.llen("k1") == 1, 90) is not None, (tmp_path / "w1.log").read_text()[-3000:]
        child = int(r.lindex("k1", 0))
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        again = _wait(lambda: r.llen("k1") == 2, 60)
        assert again is not None, (tmp_path / "w1.log").read_text()[-3000:]
        assert _wait(lambda: r.llen("k1:done") == 1, 30) is not None
        assert int(r.lindex("k1", 1)) != child  # run again by the new pool process
        print(f"\npool process killed: the task started again {again:.1f} s later and finished "
              f"({time.monotonic() - killed:.1f} s after the kill)")
    finally:
        _stop(w)


def test_killed_worker_task_is_redelivered_to_the_next_worker(tmp_path, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    w1 = _worker(redis_server.url, tmp_path, "w1")
    w2 = None
    try:
        _send(redis_server.url, "k2", 3)
        assert _wait(lambda: r.llen("k2") == 1, 90) is not None, (tmp_path / "w1.log").read_text()[-3000:]
        os.killpg(w1.pid, signal.SIGKILL)  # the whole worker: main process and pool
        w1.wait(10)
        w2 = _worker(redis_server.url, tmp_path, "w2")
        again = _wait(lambda: r.llen("k2") == 2, 120)
        assert again is not None, (tmp_path / "w2.log").read_text()[-3000:]
        assert _wait(lambda: r.llen("k2:done") == 1, 30) is not None
        print(f"\nwhole worker killed: the next worker ran the task {again:.1f} s later "
              f"(visibility timeout {VISIBILITY_S} s in this test; CELERY_VISIBILITY_TIMEOUT_S defaults to 3600)")
    finally:
        _stop(w1)
        if w2 is not None:
            _stop(w2)


def test_sigterm_warm_shutdown_finishes(tmp_path, redis_server):
    # issue 9 §6: SIGTERM to a worker hung in warm shutdown; it must finish the running task and exit
    r = redis.Redis.from_url(redis_server.url)
    w = _worker(redis_server.url, tmp_path, "w3")
    try:
        _send(redis_server.url, "k3", 4)
        assert _wait(lambda: r.llen("k3") == 1, 90) is not None, (tmp_path / "w3.log").read_text()[-3000:]
        w.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        w.wait(60)
        print(f"\nSIGTERM during a 4 s task: worker exited {time.monotonic() - t0:.1f} s later, task finished: "
              f"{r.llen('k3:done') == 1}")
        assert r.llen("k3:done") == 1
    finally:
        _stop(w)
