"""Pool scoring in images/s with one and two Celery workers on ONE project's pool (issue 12 §4).

Real parts: redis-server (broker and result backend), a SQLite file, ``celery worker -Q score``
processes each pinned to one core with ``taskset -c K`` (``-c 1``: one pool process), the shipped
default model (ONNX Runtime; one intra-op thread per pinned worker), awake/sleep images read through
``/data/local-files/`` (``LOCAL_FILES_DOCUMENT_ROOT``). What is timed is the chunked path of a
scoring run: from sending the chord (:func:`ml_worker.tasks.send_chunks`, chunks of
``--chunk`` tasks) until the finish step has recorded the run ``succeeded`` (scores stored,
queue ranked, write-back queued). Label Studio is not involved: the pool is given as the plan
``read_pool`` would return, and the write-back stays in the outbox (nothing listens at the
Label Studio URL).

Each worker runs in a session of its own (``setsid``): with the kernel's autogroup scheduling
(``/proc/sys/kernel/sched_autogroup_enabled`` = 1) all processes of one session share one
group's CPU share, so two workers started from one shell get no more CPU than one on a machine
busy with other sessions; two machines, or two sessions, do not share it.

One worker vs two: both workers run throughout; for "one worker" the second stops consuming the
``score`` queue (Celery remote control ``cancel_consumer``), so the configurations are interleaved
(1, 2, 1, 2, ...) on a machine whose load changes. Reports each run and the median ratio.

Usage: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/score_chunks.py --images 256 --chunk 32 --reps 3``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "awake_sleep" / "images" / "train"
DEAD_LS = "http://127.0.0.1:9"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise SystemExit(f"{text!r} not in {path} after {timeout} s:\n{path.read_text(errors='replace')[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cores", default="0,1", help="the two cores to pin the workers to")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"awake/sleep images not found at {DATA}")
    tmp = Path(tempfile.mkdtemp(prefix="score_chunks_"))
    procs = []
    try:
        port = _port()
        redis_url = f"redis://127.0.0.1:{port}/0"
        procs.append(subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        db = f"sqlite:///{tmp / 'faceloop.db'}"
        env = {**os.environ, "DATABASE_URL": db, "CELERY_BROKER_URL": redis_url, "LABEL_STUDIO_URL": DEAD_LS,
               "LABEL_STUDIO_API_KEY": "", "LOCAL_FILES_DOCUMENT_ROOT": str(DATA), "RECOVERY_INTERVAL_S": "0",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "QUERY_BATCH_SIZE": "20",
               "SCORE_CHUNK_SIZE": str(args.chunk)}
        os.environ.update({k: env[k] for k in ("DATABASE_URL", "CELERY_BROKER_URL", "LABEL_STUDIO_URL",
                                               "LOCAL_FILES_DOCUMENT_ROOT", "RECOVERY_INTERVAL_S",
                                               "SCORE_CHUNK_SIZE", "QUERY_BATCH_SIZE")})
        sys.path.insert(0, str(REPO))
        from backend import registry
        from backend.config import get_settings
        from backend.db import session_scope
        from backend.models import ScoringRun
        from ml_worker.celery_app import make_celery
        from ml_worker.scoring import chunks_of
        from ml_worker.tasks import claim_scoring, new_scoring_run, send_chunks

        settings = get_settings()
        config = (REPO / "label_config" / "awake_sleep.xml").read_text()
        with session_scope(db) as s:
            registry.upsert_project(s, 1, label_config=config, ls_url=DEAD_LS)
            version = registry.promoted_version(s, 1, settings).version
        files = sorted(DATA.glob("*.jpg"))[: args.images]
        todo = [{"id": 1000 + i, "data": {"image": f"/data/local-files/?d={f.name}"}} for i, f in enumerate(files)]
        plan = {"project_id": 1, "version": version, "ls_url": DEAD_LS, "label_config": config,
                "measure": settings.uncertainty_measure, "todo": todo, "n_unlabelled": len(todo),
                "pool": [t["id"] for t in todo], "existing": [], "has_version": False, "partial": False}
        cores = args.cores.split(",")
        names = [f"bench{k}@{socket.gethostname()}" for k in range(len(cores))]
        logs = [tmp / f"worker{k}.log" for k in range(len(cores))]
        for k, core in enumerate(cores):
            procs.append(subprocess.Popen(
                ["taskset", "-c", core, sys.executable, "-m", "celery", "-A", "ml_worker.celery_app", "worker",
                 "-Q", "score", "-c", "1", "-n", names[k], "--loglevel", "INFO", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                env={**env, "VAR_DIR": str(tmp / f"var{k}")}, cwd=tmp, stdout=open(logs[k], "wb"),
                stderr=subprocess.STDOUT, start_new_session=True))  # own session: own autogroup (below)
        for log in logs:
            _wait_for(log, "ready.")
        capp = make_celery(settings)

        def run(pool: dict) -> float:
            rid = new_scoring_run(settings, 1, "manual")
            assert claim_scoring(settings, rid)
            t0 = time.time()
            send_chunks(settings, rid, pool, chunks_of(pool, args.chunk), t0)
            while True:
                with session_scope(db) as s:
                    r = s.get(ScoringRun, rid)
                    if r.state != "running":
                        assert r.state == "succeeded", r.error
                        return time.time() - t0
                time.sleep(0.05)

        def times(log: Path, task: str) -> list[float]:  # seconds of each finished task, from Celery's INFO line
            return [float(x) for x in re.findall(rf"Task faceloop\.{task}\[[0-9a-f-]+\] succeeded in ([0-9.]+)s",
                                                  log.read_text(errors="replace"))]

        def cpu_s(pid: int) -> float:  # user + system CPU seconds of a worker and its pool processes (/proc)
            pids = [pid] + [int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], check=False, capture_output=True,
                                                           text=True).stdout.split()]
            total = 0
            for p in pids:
                try:
                    fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                    total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
                except (OSError, IndexError, ValueError):
                    pass
            return total / os.sysconf("SC_CLK_TCK")

        workers = procs[1:]

        def done(log: Path) -> int:  # chunks this worker finished so far
            return len(times(log, "score_chunk"))

        # warm-up: every worker loads the model (more chunks than workers)
        run({**plan, "todo": todo[: 4 * args.chunk], "pool": plan["pool"][: 4 * args.chunk],
             "n_unlabelled": 4 * args.chunk})
        rows = []
        for rep in range(args.reps):
            for n in (1, 2):
                if n == 1:
                    capp.control.cancel_consumer("score", destination=[names[1]], reply=True, timeout=5)
                else:
                    capp.control.add_consumer("score", destination=[names[1]], reply=True, timeout=5)
                time.sleep(1.0)
                load = os.getloadavg()[0]
                before = [done(log) for log in logs]
                fin0 = [len(times(log, "score_finish")) for log in logs]
                cpu0 = [cpu_s(w.pid) for w in workers]
                sec = run(plan)
                time.sleep(0.5)  # the finish step's INFO line follows its database write
                cpu = sum(cpu_s(w.pid) for w in workers) - sum(cpu0)
                rows.append({"rep": rep, "workers": n, "seconds": round(sec, 2),
                             "images_per_s": round(len(todo) / sec, 1), "load1": round(load, 2),
                             "chunks_by_worker": [done(log) - b for log, b in zip(logs, before)],
                             "chunk_busy_s_by_worker": [round(sum(times(log, "score_chunk")[b:]), 2)
                                                        for log, b in zip(logs, before)],
                             "worker_cpu_s": round(cpu, 2), "images_per_cpu_s": round(len(todo) / cpu, 1),
                             "finish_s": round(sum(t for log, f in zip(logs, fin0)
                                                   for t in times(log, "score_finish")[f:]), 2)})
                print(json.dumps(rows[-1]), flush=True)
        ones = [r["images_per_s"] for r in rows if r["workers"] == 1]
        twos = [r["images_per_s"] for r in rows if r["workers"] == 2]
        ratios = [b / a for a, b in zip(ones, twos)]
        summary = {"images": len(todo), "chunk": args.chunk, "cores": args.cores,
                   "one_worker_images_per_s_median": statistics.median(ones),
                   "two_workers_images_per_s_median": statistics.median(twos),
                   "ratio_per_rep": [round(x, 2) for x in ratios], "ratio_median": round(statistics.median(ratios), 2),
                   "runs": rows, "nproc": os.cpu_count()}
        print(json.dumps(summary, indent=1))
        if args.out:
            args.out.write_text(json.dumps(summary, indent=1))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
