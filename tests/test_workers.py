"""Two Celery workers standing in for two machines (issue 12 §2), on real parts: redis-server,
Label Studio, the backend, the database (a SQLite file, and PostgreSQL when its binaries are here).

Each worker is started with ``faceloop worker -Q ...`` and nothing but ``DATABASE_URL``,
``CELERY_BROKER_URL``, ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, its own ``VAR_DIR`` (a
folder no other process uses) and the training sizes: no ``LOCAL_FILES_DOCUMENT_ROOT``, no backend
disk, a working directory without ``.env``. The backend has a third ``VAR_DIR``. Checked:

- two projects train at the same time (Start Training in both: their jobs' intervals overlap,
  on different workers);
- one project never trains twice at once (Start Training again while its job runs: the other
  worker takes the new job and waits on the project's lock; the runs do not overlap);
- scores from either worker reach Label Studio (new tasks of both projects are pre-annotated, one
  project by each worker, with versions trained on whichever machine);
- model versions travel through the database: the backend serves ``/predict`` and the status
  page's plots of versions it never had on its disk.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from tests.conftest import REPO, require_data

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: The smallest training the code offers that still promotes on awake/sleep (the default model
#: names neither class: a candidate needs one right class to beat its mAP50 of 0).
TINY = {"DETECTOR_EPOCHS": "1", "CLASSIFIER_EPOCHS": "8", "TRAIN_BATCH": "4", "IMGSZ": "256",
        "RETRAIN_MIN_ANNOTATIONS": "1000", "QUERY_BATCH_SIZE": "2", "RECOVERY_INTERVAL_S": "10"}
N_LABELLED, N_NEW = 10, 2
WAIT_S = 600  # bound of every wait (the whole test takes a few minutes on 2 shared cores)


@pytest.fixture(scope="module")
def ls_stack(tmp_path_factory):
    """redis-server, Label Studio and the backend (no worker); backends are restarted per database."""
    from backend.stack import Stack

    st = Stack.start(tmp_path_factory.mktemp("workers_stack"), worker=False, extra_env=TINY)
    yield st
    st.stop()


def _restart_backend(st, database_url: str) -> None:
    p = st.procs.pop("backend")
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(30)
    st._start_backend({**TINY, "DATABASE_URL": database_url})


class Worker:
    """``faceloop worker`` in its own process group, VAR_DIR and log."""

    def __init__(self, name: str, var_dir: Path, queues: str, env: dict):
        self.name, self.var_dir = name, var_dir
        var_dir.mkdir(parents=True)
        self.log = var_dir / "worker.log"
        full = {"PATH": os.environ["PATH"], "HOME": str(var_dir), "LANG": "C.UTF-8", "PYTHONPATH": str(REPO),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "VAR_DIR": str(var_dir), **TINY, **env}
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "-Q", queues, "-n",
                                          f"{name}@%h"], env=full, cwd=var_dir, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "ready." in self.text():
                return
            assert self.proc.poll() is None, f"worker {self.name} exited:\n{self.text()[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"worker {self.name} not ready in {timeout} s:\n{self.text()[-3000:]}")

    def received(self, celery_id: str) -> bool:
        return f"[{celery_id}] received" in self.text()

    def results(self, task: str) -> list[dict]:
        """Return values of the ``faceloop.<task>`` tasks this worker finished (Celery's INFO line)."""
        out = []
        for m in re.finditer(rf"Task faceloop\.{task}\[[0-9a-f-]+\] succeeded in [0-9.]+s: (\{{.*\}})", self.text()):
            out.append(ast.literal_eval(m.group(1)))
        return out

    def stop(self) -> None:
        from backend.stack import terminate_group

        terminate_group(self.proc)


def _wait(cond, what: str, timeout: float = WAIT_S, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _jobs(url, pid):
    from backend.db import session_scope
    from backend.models import TrainingJob

    with session_scope(url) as s:
        return s.exec(select(TrainingJob).where(TrainingJob.project_id == pid).order_by(TrainingJob.id)).all()


def _runs(url):
    from backend.db import session_scope
    from backend.models import ScoringRun

    with session_scope(url) as s:
        return s.exec(select(ScoringRun).order_by(ScoringRun.id)).all()


def _quiet(url) -> bool:
    """No training job or scoring run queued or running, no write-back pending."""
    from backend.db import session_scope
    from backend.models import ScoringRun, TrainingJob

    with session_scope(url) as s:
        busy = s.exec(select(TrainingJob).where(TrainingJob.state.in_(("queued", "running")))).all()
        runs = s.exec(select(ScoringRun).where(ScoringRun.state.in_(("queued", "running")))).all()
        pending = s.exec(select(ScoringRun).where(ScoringRun.write_state == "pending")).all()
        return not busy and not runs and not pending


def _overlap(a, b) -> bool:
    return a.started_at < b.finished_at and b.started_at < a.finished_at


def _promoted(url, pid):
    from backend.db import session_scope
    from backend.models import ModelVersion, Project

    with session_scope(url) as s:
        return s.get(ModelVersion, s.get(Project, pid).promoted_version_id)


@pytest.fixture(params=["sqlite", "postgres"])
def shared_db(request, tmp_path):
    """The one database both workers and the backend use: a SQLite file in a folder of its own,
    or a database on the throwaway PostgreSQL server (skipped without its binaries, except in CI)."""
    if request.param == "sqlite":
        yield f"sqlite:///{(tmp_path / 'db').resolve() / 'faceloop.db'}"
        return
    yield request.getfixturevalue("postgres").create_database("workers")


def test_two_workers_share_only_database_redis_and_label_studio(ls_stack, shared_db, tmp_path):
    data = require_data()
    from label_studio_sdk import LabelStudio

    from backend.demo import annotate_from_ground_truth, dataset_names
    from backend.labels import ProjectSchema
    from backend.lsapi import connect_backend, create_project, upload_images

    st, url = ls_stack, shared_db
    t0 = time.time()
    _restart_backend(st, url)
    env = {"DATABASE_URL": url, "CELERY_BROKER_URL": st.redis_url, "LABEL_STUDIO_URL": st.ls_url,
           "LABEL_STUDIO_API_KEY": st.api_key}
    workers = [Worker("machine-a", tmp_path / "machine-a", "train,score,machine-a", env),
               Worker("machine-b", tmp_path / "machine-b", "train,score,machine-b", env)]
    try:
        client = LabelStudio(base_url=st.ls_url, api_key=st.api_key)
        xml = (REPO / "label_config" / "awake_sleep.xml").read_text()
        schema = ProjectSchema.parse(xml)
        names = dataset_names(data)
        imgs = sorted((data / "images" / "train").glob("*.jpg"))
        per = N_LABELLED + N_NEW
        files = imgs[:: len(imgs) // (2 * per)][: 2 * per]
        projects = {}
        for k in range(2):
            mine = files[k * per:(k + 1) * per]
            pid = create_project(client, f"workers {k}", xml)
            ids = upload_images(client, st.ls_url, pid, mine[:N_LABELLED])
            annotate_from_ground_truth(client, pid, dict(zip(ids, mine[:N_LABELLED])), schema, names)
            connect_backend(client, pid, st.backend_url, basic_auth=st.basic_auth, webhook_secret=st.webhook_secret)
            projects[pid] = {"ml": client.ml.list(project=pid)[0].id, "new": mine[N_LABELLED:]}
        p1, p2 = projects
        for w in workers:
            w.wait_ready()
        t_setup = time.time() - t0

        # 1. Start Training in both projects: the two workers train them at the same time
        t1 = time.time()
        client.ml.train(id=projects[p1]["ml"])
        client.ml.train(id=projects[p2]["ml"])
        _wait(lambda: _quiet(url) and all(_jobs(url, p) for p in projects), "both trainings and their scorings")
        j1, j2 = _jobs(url, p1)[0], _jobs(url, p2)[0]
        assert (j1.state, j2.state) == ("succeeded", "succeeded"), (j1.error, j2.error)
        assert _overlap(j1, j2), f"project trainings did not overlap: {j1.started_at}-{j1.finished_at}, " \
                                 f"{j2.started_at}-{j2.finished_at}"
        ran = {w.name: {r["job"] for r in w.results("train")} for w in workers}
        assert {frozenset(v) for v in ran.values()} == {frozenset({j1.id}), frozenset({j2.id})}, ran
        v1, v2 = _promoted(url, p1), _promoted(url, p2)
        assert v1.version == f"p{p1}-v1" and v2.version == f"p{p2}-v1", (v1.gate_reason, v2.gate_reason)
        t_parallel = time.time() - t1

        # 2. Start Training twice in one project: the second job waits for the first
        t2 = time.time()
        client.ml.train(id=projects[p1]["ml"])
        first = _wait(lambda: next((j for j in _jobs(url, p1)[1:] if j.state == "running" and j.labels_sha), None),
                      "the rerun to start and take its snapshot")
        # a label changed during the run, after its snapshot: the second press's job trains (on the
        # same labels it would be skipped: ml_worker.tasks.take_snapshot)
        ann = client.tasks.get(id=client.tasks.list(project=p1).items[0].id).annotations[0]
        result = [dict(r) for r in ann["result"]]
        result[0] = {**result[0], "value": {**result[0]["value"], "rectanglelabels": [
            "sleep" if result[0]["value"]["rectanglelabels"] == ["awake"] else "awake"]}}
        client.annotations.update(id=ann["id"], result=result)
        client.ml.train(id=projects[p1]["ml"])
        second = _wait(lambda: next((j for j in _jobs(url, p1) if j.id > first.id and j.celery_id), None),
                       "the second press's job")
        runner = next(w for w in workers if w.received(first.celery_id))
        other = next(w for w in workers if w is not runner)
        # the idle worker takes the job while the first still runs, and waits on the project's lock
        _wait(lambda: other.received(second.celery_id), "the other worker to take the second job", timeout=60)
        held = {j.id: j.state for j in _jobs(url, p1)}
        if held[first.id] == "running":
            assert held[second.id] == "queued", "the second job started while the first ran"
        _wait(lambda: _quiet(url), "both runs of one project")
        a, b = [j for j in _jobs(url, p1) if j.id in (first.id, second.id)]
        assert (a.state, b.state) == ("succeeded", "succeeded"), (a.error, b.error)
        assert not _overlap(a, b) and b.started_at >= a.finished_at, \
            f"one project trained twice at once: {a.started_at}-{a.finished_at} and {b.started_at}-{b.finished_at}"
        assert second.id in {r["job"] for r in other.results("train")}
        t_serial = time.time() - t2

        # 3. New tasks in both projects, both workers idle: each pre-annotates one project and its
        # predictions (of versions trained on either machine) reach Label Studio
        before = {r.id for r in _runs(url)}
        new_ids = {pid: upload_images(client, st.ls_url, pid, p["new"]) for pid, p in projects.items()}
        _wait(lambda: len([r for r in _runs(url) if r.id not in before and r.trigger == "new_tasks"]) == 2
              and _quiet(url), "pre-annotation of the new tasks")
        runs = {r.project_id: r for r in _runs(url) if r.id not in before}
        by_worker = {w.name: {r["run"] for r in w.results("preannotate")} for w in workers}
        assert sorted(len(v) for v in by_worker.values()) == [1, 1], by_worker  # one project each
        for pid, ids in new_ids.items():
            r = runs[pid]
            served = _promoted(url, pid)
            assert r.state == "succeeded" and r.model_version == served.version and r.scored == N_NEW, r
            for tid in ids:
                preds = client.tasks.get(id=tid).predictions or []
                assert served.version in [p.model_version for p in preds], (tid, [p.model_version for p in preds])

        # model versions travelled through the database: each worker's own folder holds a version
        # trained by the other one (copied when it continued training or scored)
        from backend.db import session_scope
        from backend.models import ModelVersion

        with session_scope(url) as s:
            trained = s.exec(select(ModelVersion).where(ModelVersion.training_job_id.is_not(None))).all()
        job_worker = {j: w for w in workers for r in w.results("train") for j in [r["job"]]}
        crossed = []
        for w in workers:
            for v in trained:
                if job_worker[v.training_job_id] is not w and \
                        (w.var_dir / "models" / f"project_{v.project_id}" / v.version / "bundle.json").is_file():
                    crossed.append((w.name, v.version))
        assert crossed, "no worker used a version trained by the other"

        # the backend (a third VAR_DIR) serves both projects' versions and their plots from the database
        auth = st.basic_auth
        for pid in projects:
            served = _promoted(url, pid)
            tid = new_ids[pid][0]
            r = httpx.post(st.backend_url + "/predict", auth=auth, timeout=120,
                           json={"tasks": [{"id": tid, "project": pid, "data": client.tasks.get(id=tid).data}]})
            assert r.status_code == 200 and r.json()["results"][0]["model_version"] == served.version, r.text
            assert (st.var_dir / "models" / f"project_{pid}" / served.version / "bundle.json").is_file()
            k = sorted(served.metrics["plots"]).index("detector results.png")
            r = httpx.get(f"{st.backend_url}/status/{pid}/versions/{served.id}/plots/{k}", auth=auth, timeout=30)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert not (st.var_dir / "jobs").exists()  # the backend's disk never saw a training
        print(f"\nWORKERS ({url.split(':')[0]}): set-up {t_setup:.0f} s, two projects in parallel {t_parallel:.0f} s "
              f"(overlap {min(j1.finished_at, j2.finished_at) - max(j1.started_at, j2.started_at)}), one project "
              f"twice {t_serial:.0f} s, jobs by worker {ran}, versions used across machines {crossed}, "
              f"whole test {time.time() - t0:.0f} s")
    finally:
        for w in workers:
            w.stop()
