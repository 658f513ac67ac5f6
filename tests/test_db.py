"""Schema migrations (Alembic, backend/migrations) on SQLite and on a real PostgreSQL server.

- the newest revision builds exactly the models' schema (``alembic check``: autogenerate finds
  nothing to do), so a model change without a migration fails here;
- a database made by ``create_all`` before migrations is adopted at the baseline, nothing lost;
- several processes upgrading one database at once is safe;
- the partial unique index (one queued training job per project) holds on both databases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, select

from backend import db as dbmod
from backend.acceptance import PrelabelAcceptance
from backend.models import ModelVersion, Project, TrainingJob
from tests.conftest import REPO

TABLES = {"project", "modelversion", "trainingjob", "taskscore", "webhookevent", "scoringrun", "outboxwrite",
          "prelabelacceptance"}


def schema_diff(url: str) -> list:
    """Autogenerate's differences between the database at ``url`` and the models (as ``alembic check``)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    eng = create_engine(url)
    try:
        with eng.connect() as conn, warnings.catch_warnings():
            # project <-> modelversion reference each other; sorting them for the diff warns
            warnings.filterwarnings("ignore", message="Cannot correctly sort tables")
            mc = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True,
                                                        "target_metadata": SQLModel.metadata})
            return compare_metadata(mc, SQLModel.metadata)
    finally:
        eng.dispose()


def test_head_migration_builds_the_models_schema(db_url):
    dbmod.get_engine(db_url)
    assert dbmod.current_revision(db_url) == dbmod.head_revision()
    assert TABLES <= set(inspect(dbmod.get_engine(db_url)).get_table_names())
    diff = schema_diff(db_url)
    assert diff == [], ("the models differ from the newest migration: add one (README, 'Database'): "
                        f"{diff}")


def test_every_revision_downgrades_and_upgrades_again(db_url):
    dbmod.get_engine(db_url)
    dbmod.forget_engine(db_url)
    dbmod.downgrade_schema(db_url, "base")
    eng = create_engine(db_url)
    assert set(inspect(eng).get_table_names()) <= {"alembic_version"}
    eng.dispose()
    dbmod.upgrade_schema(db_url)
    assert dbmod.current_revision(db_url) == dbmod.head_revision() and schema_diff(db_url) == []


def _legacy_database(url: str, with_acceptance: bool) -> None:
    """What faceloop before migrations left: create_all's tables (``prelabelacceptance`` only once
    the status page had been used) with rows in them, and no ``alembic_version``."""
    eng = create_engine(url)
    tables = [t for t in SQLModel.metadata.tables.values() if with_acceptance or t.name != "prelabelacceptance"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot correctly sort tables")
        SQLModel.metadata.create_all(eng, tables=tables)
    with Session(eng) as s:
        s.add(Project(id=7, title="faces", labels_json='["awake", "sleep"]'))
        s.flush()
        s.add(ModelVersion(project_id=7, version="p7-v1", path="/m/p7-v1.pt", sha256="ab" * 32, status="promoted"))
        s.add(TrainingJob(project_id=7, state="queued", epochs=3))
        if with_acceptance:
            s.add(PrelabelAcceptance(project_id=7, model_version="p7-v1", annotations=2, accepted=5))
        s.commit()
    eng.dispose()


@pytest.mark.parametrize("with_acceptance", [True, False], ids=["with-acceptance", "without-acceptance"])
def test_database_from_before_migrations_is_adopted(db_url, with_acceptance, caplog):
    _legacy_database(db_url, with_acceptance)
    assert dbmod.current_revision(db_url) is None
    with caplog.at_level("WARNING", logger="backend.db"):
        dbmod.get_engine(db_url)
    assert "predates migrations" in caplog.text
    assert dbmod.current_revision(db_url) == dbmod.head_revision()
    assert schema_diff(db_url) == []
    with dbmod.session_scope(db_url) as s:
        assert s.get(Project, 7).labels == ["awake", "sleep"]
        assert [v.version for v in s.exec(select(ModelVersion)).all()] == ["p7-v1"]
        job = s.exec(select(TrainingJob)).one()
        assert (job.state, job.epochs) == ("queued", 3)
        acc = s.exec(select(PrelabelAcceptance)).all()
        assert [(a.model_version, a.accepted) for a in acc] == ([("p7-v1", 5)] if with_acceptance else [])
        s.add(PrelabelAcceptance(project_id=7, model_version="p7-v2"))  # the table works either way
    with pytest.raises(IntegrityError), dbmod.session_scope(db_url) as s:  # the partial index survived
        s.add(TrainingJob(project_id=7, state="queued"))
        s.flush()


def test_concurrent_upgrades_of_one_database(db_url):
    """Backend and workers start together: each upgrades; one does it, the others wait and find it done."""
    errors = []

    def upgrade():
        eng = dbmod._create_engine(db_url)
        try:
            dbmod._upgrade(eng, db_url)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert dbmod.current_revision(db_url) == dbmod.head_revision() and schema_diff(db_url) == []


def test_one_queued_training_job_per_project(db_url):
    with dbmod.session_scope(db_url) as s:
        s.add(Project(id=1))
        s.add(Project(id=2))
    with dbmod.session_scope(db_url) as s:
        s.add(TrainingJob(project_id=1, state="queued"))
        s.add(TrainingJob(project_id=2, state="queued"))  # another project: fine
        s.add(TrainingJob(project_id=1, state="running"))  # not queued: outside the partial index
        s.add(TrainingJob(project_id=1, state="succeeded"))
    with pytest.raises(IntegrityError), dbmod.session_scope(db_url) as s:
        s.add(TrainingJob(project_id=1, state="queued"))
    with dbmod.session_scope(db_url) as s:  # once it runs, one more may queue
        q = select(TrainingJob).where(TrainingJob.state == "queued", TrainingJob.project_id == 1)
        s.exec(q).one().state = "running"
    with dbmod.session_scope(db_url) as s:
        s.add(TrainingJob(project_id=1, state="queued"))
    with dbmod.session_scope(db_url) as s:
        states = sorted(j.state for j in s.exec(select(TrainingJob).where(TrainingJob.project_id == 1)).all())
        assert states == ["queued", "running", "running", "succeeded"]


def test_times_come_back_in_utc(db_url):
    when = datetime(2026, 5, 1, 12, 30, tzinfo=timezone.utc)
    with dbmod.session_scope(db_url) as s:
        s.add(Project(id=3, updated_at=when))
    with dbmod.session_scope(db_url) as s:
        assert s.get(Project, 3).updated_at == when


def test_upgrade_does_not_depend_on_the_working_directory(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", "import sys; from backend.db import upgrade_schema, current_revision; "
                        "upgrade_schema(sys.argv[1]); print(current_revision(sys.argv[1]))", url],
                       cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == dbmod.head_revision()


def test_a_revision_this_code_does_not_know_is_a_clear_error(db_url):
    dbmod.get_engine(db_url)
    dbmod.forget_engine(db_url)
    eng = create_engine(db_url)
    with eng.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    eng.dispose()
    with pytest.raises(RuntimeError, match="9999_from_the_future.*newer faceloop"):
        dbmod.get_engine(db_url)


@pytest.mark.parametrize("project_known", [True, False], ids=["known-project", "new-project"])
def test_concurrent_training_requests_queue_one_job(db_url, project_known):
    """Webhooks arrive in parallel (several backend workers): the partial unique index lets exactly
    one request queue a job; the others join it (backend.registry.request_training)."""
    from backend import registry

    if project_known:
        with dbmod.session_scope(db_url) as s:
            s.add(Project(id=4))
    n = 6
    barrier = threading.Barrier(n)
    results, errors = [], []

    def request():
        try:
            barrier.wait(10)
            with dbmod.session_scope(db_url) as s:
                job, created = registry.request_training(s, 4, "annotations")
                results.append((job.id, created))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=request) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [], errors
    assert len(results) == n and len({i for i, _ in results}) == 1, results
    assert sum(created for _, created in results) == 1
    with dbmod.session_scope(db_url) as s:
        assert len(s.exec(select(TrainingJob).where(TrainingJob.project_id == 4)).all()) == 1


@pytest.mark.parametrize("ci", [False, True], ids=["dev-machine", "ci"])
def test_missing_postgres_skips_except_in_ci(tmp_path, ci):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({"PYTHONPATH": str(REPO), "FACELOOP_POSTGRES_BIN": str(tmp_path / "no-such-bin")})
    if ci:
        env["CI"] = "true"
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                        "tests/test_db.py::test_times_come_back_in_utc"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert "no initdb and postgres" in out, out
    if ci:
        assert r.returncode != 0 and "1 passed" in out and "CI=true" in out, out
    else:
        assert r.returncode == 0 and "1 passed, 1 skipped" in out, out


def _schema(url: str) -> dict:
    """Tables, columns, keys and index definitions as the database itself reports them."""
    eng = create_engine(url)
    out: dict = {}
    try:
        insp = inspect(eng)
        for t in sorted(set(insp.get_table_names()) - {"alembic_version"}):
            out[t] = {
                "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)],
                "pk": insp.get_pk_constraint(t)["constrained_columns"],
                "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                              for f in insp.get_foreign_keys(t)),
                "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(t)),
            }
        with eng.connect() as c:
            if eng.dialect.name == "sqlite":
                rows = c.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))
            else:
                rows = c.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
                                      "AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key'"))
            out["indexes"] = sorted((name, " ".join(sql.split())) for name, sql in rows if "alembic_version" not in sql)
    finally:
        eng.dispose()
    return out



def _snapshot_path(url: str):
    return REPO / "tests" / "fixtures" / f"schema_{dbmod.BASELINE_REVISION}_{url.split(':')[0].split('+')[0]}.json"


def test_baseline_is_the_schema_create_all_made(db_url, request, tmp_path):
    """Revision 0001_baseline = what ``SQLModel.metadata.create_all`` made before migrations
    (columns, types, nullability, keys, and each index's own SQL, partial index included).

    create_all's schema is frozen in tests/fixtures/schema_0001_baseline_<database>.json (written by
    ``FACELOOP_WRITE_SCHEMA=1`` while the baseline was the newest revision and the models equal to it)."""
    dbmod.upgrade_schema(db_url, dbmod.BASELINE_REVISION)
    migrated = _schema(db_url)
    assert any(name == "one_queued_job_per_project" and "queued" in sql for name, sql in migrated["indexes"])
    snap = _snapshot_path(db_url)
    if os.environ.get("FACELOOP_WRITE_SCHEMA") == "1":
        assert dbmod.head_revision() == dbmod.BASELINE_REVISION, "the snapshot is create_all's at the baseline"
        other = f"sqlite:///{tmp_path / 'create_all.db'}" if db_url.startswith("sqlite") else \
            request.getfixturevalue("postgres").create_database("create_all")
        eng = create_engine(other)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Cannot correctly sort tables")
            SQLModel.metadata.create_all(eng)
        eng.dispose()
        snap.write_text(json.dumps(_schema(other), indent=1) + "\n")
    assert json.loads(json.dumps(migrated)) == json.loads(snap.read_text())


def test_copy_database_moves_an_install_to_another_database(tmp_path, db_url):
    """`faceloop db-copy`: a SQLite install's rows (the project ⇄ model version cycle, a version's
    parent, stored files, scores, acceptance counts) reach an empty database (SQLite, then
    PostgreSQL) with their ids; new rows get new ids there; a second copy is refused."""
    from backend.acceptance import Counts, store
    from backend.db import CopyError, copy_database, session_scope
    from backend.models import ModelArtifact, ModelVersion, Project, TaskScore, TrainingJob
    from tests.helpers_unit import make_settings

    src = f"sqlite:///{tmp_path / 'old.db'}"
    with session_scope(src) as s:
        s.add(Project(id=3, title="faces"))
        s.flush()
        v1 = ModelVersion(project_id=3, version="p3-v1", path="/x/a.json", sha256="a", status="retired")
        s.add(v1)
        s.flush()
        v2 = ModelVersion(project_id=3, version="p3-v2", path="/x/b.json", sha256="b", status="promoted",
                          parent_id=v1.id, metrics_json='{"mAP50": 0.7}')
        s.add(v2)
        s.flush()
        s.get(Project, 3).promoted_version_id = v2.id
        s.add(TrainingJob(project_id=3, trigger="manual", state="succeeded"))
        s.add(ModelArtifact(project_id=3, version="p3-v2", name="detector.pt", sha256="c", size=3, data=b"\x00\xff\x01"))
        s.add(TaskScore(project_id=3, task_id=11, model_version="p3-v2", uncertainty=0.4, least_confidence=0.4,
                        margin=0.2, entropy=0.5, in_query_batch=True))
    store(make_settings(tmp_path / "v", database_url=src), 3, {"p3-v2": Counts(annotations=2, predicted=2, accepted=1)})

    seen = []
    counts = copy_database(src, db_url, on_table=lambda name, n: seen.append((name, n)))
    assert counts["project"] == 1 and counts["modelversion"] == 2 and counts["modelartifact"] == 1
    assert counts["taskscore"] == 1 and counts["trainingjob"] == 1 and counts["prelabelacceptance"] == 1
    assert [name for name, _ in seen] == list(counts)
    with session_scope(db_url) as s:
        p = s.get(Project, 3)
        v = s.get(ModelVersion, p.promoted_version_id)
        assert v.version == "p3-v2" and s.get(ModelVersion, v.parent_id).version == "p3-v1"
        assert v.metrics == {"mAP50": 0.7}
        assert bytes(s.exec(select(ModelArtifact)).one().data) == b"\x00\xff\x01"
        assert s.exec(select(TaskScore)).one().in_query_batch is True
        v3 = ModelVersion(project_id=3, version="p3-v3", path="/x/c.json", sha256="d")
        s.add(v3)
        s.flush()
        assert v3.id == 3  # the id sequence continues after the copied ids
    with pytest.raises(CopyError, match="already holds"):
        copy_database(src, db_url)
    with pytest.raises(CopyError, match="same database"):
        copy_database(src, src)


def test_0006_gives_existing_jobs_an_empty_stage_record(db_url):
    """A database at 0005 with a finished and a running job: 0006 adds ``stages_json`` ('[]'), the
    jobs keep their rows, the status page's estimate says it cannot tell for the running one, and
    new progress is recorded per stage."""
    from datetime import timedelta

    from backend.jobprogress import estimate, record

    def job_columns() -> set:
        e = create_engine(db_url)
        try:
            return {c["name"] for c in inspect(e).get_columns("trainingjob")}
        finally:
            e.dispose()

    dbmod.upgrade_schema(db_url, "0005_project_ls_instance")
    assert "stages_json" not in job_columns()
    eng = create_engine(db_url)
    t = datetime(2026, 11, 30, 17, 0, tzinfo=timezone.utc)
    with eng.begin() as c:
        c.execute(text("INSERT INTO project (id, title, labels_json, ls_url, min_annotations_to_start_training, "
                       "updated_at, ls_instance) VALUES (7, 'faces', '[]', '', 0, :t, '')"), {"t": t})
        for state in ("succeeded", "running"):
            c.execute(text("INSERT INTO trainingjob (project_id, trigger, state, epoch, epochs, stage, n_train, "
                           "n_val, celery_id, created_at, started_at) VALUES (7, 'start_training', :s, 3, 50, "
                           "'train', 40, 10, '', :t, :t)"), {"s": state, "t": t})
    eng.dispose()
    dbmod.upgrade_schema(db_url)
    assert dbmod.current_revision(db_url) == dbmod.head_revision() and schema_diff(db_url) == []
    with dbmod.session_scope(db_url) as s:
        jobs = s.exec(select(TrainingJob).order_by(TrainingJob.id)).all()
        assert [(j.state, j.epoch, j.epochs, j.stages) for j in jobs] == [("succeeded", 3, 50, []),
                                                                         ("running", 3, 50, [])]
        assert estimate(jobs[1], jobs[0], t + timedelta(seconds=28)) is None  # no records: no number
        record(jobs[1], {"stage": "train detector", "plan": [{"stage": "train detector", "epochs": 10}]}, now=t)
    with dbmod.session_scope(db_url) as s:
        job = s.exec(select(TrainingJob).where(TrainingJob.state == "running")).one()
        assert [(x["stage"], x["epochs"]) for x in job.stages] == [("train detector", 10)]
    dbmod.forget_engine(db_url)
    dbmod.downgrade_schema(db_url, "0005_project_ls_instance")  # and back
    assert "stages_json" not in job_columns()
