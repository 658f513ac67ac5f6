"""The model version store (modelstore): a version's files in the database, a verified local copy
per machine. Runs on SQLite and on a real PostgreSQL server (``db_url``).

Two ``MODEL_DIR``s stand in for two machines that share only the database.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

import modelstore
from backend.config import DEFAULT_MODEL_PATH
from backend.db import session_scope
from backend.models import ModelArtifact, ModelVersion, Project
from tests.helpers_unit import make_settings

PID = 7


def _machine(tmp_path: Path, name: str, db_url: str):
    return make_settings(tmp_path / name, database_url=db_url)


def _trained_version(folder: Path) -> Path:
    """A version folder as the worker writes it: the shipped default's weights under the names a
    trained version uses, its bundle JSON, a plot PNG, a CSV and an extra file in a subfolder."""
    from facemodels.two_stage import read_bundle, write_bundle

    b = read_bundle(DEFAULT_MODEL_PATH)
    bundle = write_bundle(folder, Path(b["detector_path"]), Path(b["classifier_path"]), b["classes"], imgsz=256)
    from tests.test_status import png_bytes

    (folder / "detector_results.png").write_bytes(png_bytes())
    (folder / "detector_results.csv").write_text("epoch,loss\n1,1.5\n")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "detector.onnx").write_bytes(b"onnx bytes")
    return bundle


def _register(settings, folder: Path, name: str = "p7-v1") -> int:
    with session_scope(settings.database_url) as s:
        if s.get(Project, PID) is None:
            s.add(Project(id=PID, title="faces"))
            s.flush()
        modelstore.store_folder(s, PID, name, folder)
        v = ModelVersion(project_id=PID, version=name, path=str(folder / "bundle.json"), sha256="0", status="promoted",
                         metrics_json=json.dumps({"plots": {"detector results.png": "detector_results.png",
                                                            "detector results.csv": "detector_results.csv",
                                                            "bundle": "bundle.json"}}))
        s.add(v)
        s.flush()
        s.get(Project, PID).promoted_version_id = v.id
        return v.id


def test_a_version_registered_on_one_machine_loads_on_another(tmp_path, db_url):
    a, b = _machine(tmp_path, "a", db_url), _machine(tmp_path, "b", db_url)
    work = tmp_path / "a" / "jobs" / "job_1" / "p7-v1"
    _trained_version(work)
    on_disk = [n for n, _p in modelstore.folder_files(work)]
    vid = _register(a, work)
    shutil.rmtree(tmp_path / "a" / "jobs")  # machine A's job folder is gone: only the database holds it
    with session_scope(db_url) as s:
        v = s.get(ModelVersion, vid)
        names = [n for n, _sha, _size in modelstore.listing(s, PID, "p7-v1")]
    assert names == on_disk  # every file of the folder (ONNX exports too, where write_bundle makes them)
    assert {"bundle.json", "classifier.pt", "detector.pt", "detector_results.csv", "detector_results.png",
            "onnx/detector.onnx"} <= set(names)
    path = modelstore.model_path(b, v)
    assert path == Path(b.model_dir) / "project_7" / "p7-v1" / "bundle.json"
    from facemodels.detector import ModelCache

    model = ModelCache().get(path)  # the two-stage model loads from machine B's copy
    assert model.names == json.loads(DEFAULT_MODEL_PATH.read_text())["classes"]
    assert (path.parent / "onnx" / "detector.onnx").read_bytes() == b"onnx bytes"
    assert not list(path.parent.rglob(".*"))  # no temporary file left


def test_local_copy_is_checked_and_repaired(tmp_path, db_url):
    a = _machine(tmp_path, "a", db_url)
    src = tmp_path / "src"
    _trained_version(src)
    _register(a, src)
    folder = modelstore.materialise(a, PID, "p7-v1")
    det = folder / "detector.pt"
    good = det.read_bytes()
    det.write_bytes(b"half a file")  # damaged on disk (e.g. a crash before the store existed)
    (folder / "bundle.json").unlink()
    modelstore.materialise(a, PID, "p7-v1")
    assert det.read_bytes() == good and (folder / "bundle.json").is_file()
    assert modelstore.materialise(a, PID, "p8-v1") is None  # nothing stored: nothing made


def test_damaged_database_copy_is_refused(tmp_path, db_url):
    a, b = _machine(tmp_path, "a", db_url), _machine(tmp_path, "b", db_url)
    src = tmp_path / "src"
    _trained_version(src)
    vid = _register(a, src)
    with session_scope(db_url) as s:
        s.exec(update(ModelArtifact).where(ModelArtifact.name == "detector.pt").values(data=b"corrupt"))
    with session_scope(db_url) as s:
        v = s.get(ModelVersion, vid)
    with pytest.raises(modelstore.ArtifactError, match="does not match its sha256"):
        modelstore.model_path(b, v)
    assert not (Path(b.model_dir) / "project_7" / "p7-v1" / "detector.pt").exists()
    assert not (Path(b.model_dir) / "project_7" / "p7-v1" / "bundle.json").exists()  # JSON comes last


def test_a_version_never_changes(tmp_path, db_url):
    a = _machine(tmp_path, "a", db_url)
    src = tmp_path / "src"
    _trained_version(src)
    _register(a, src)
    with session_scope(db_url) as s:
        n = len(modelstore.listing(s, PID, "p7-v1"))
        assert len(modelstore.store_folder(s, PID, "p7-v1", src)) == n  # the same bytes again: no-op
        assert len(modelstore.listing(s, PID, "p7-v1")) == n
    (src / "detector_results.csv").write_text("other\n")
    with pytest.raises(modelstore.ArtifactError, match="already has a different detector_results.csv"), \
            session_scope(db_url) as s:
        modelstore.store_folder(s, PID, "p7-v1", src)


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.pt", "a/../../x", "", ".hidden", "a\\b", "a//b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(modelstore.ArtifactError):
        modelstore.check_name(name)


def test_shipped_default_is_found_in_this_checkout(tmp_path, db_url):
    """The default model's row names the path of the machine that registered it first; another
    machine finds the same file (same SHA-256) in its own checkout."""
    from backend.hashing import file_sha256

    b = _machine(tmp_path, "b", db_url)
    with session_scope(db_url) as s:
        s.add(Project(id=PID))
        s.flush()
        v = ModelVersion(project_id=PID, version="base-x", path="/elsewhere/models/faceloop-default.json",
                         sha256=file_sha256(DEFAULT_MODEL_PATH), status="promoted")
        s.add(v)
        s.flush()
        other = ModelVersion(project_id=PID, version="p7-v9", path="/elsewhere/p7-v9/bundle.json", sha256="0")
    assert modelstore.model_path(b, v) == Path(b.default_model_path)
    with pytest.raises(FileNotFoundError, match="neither in the database's model store"):
        modelstore.model_path(b, other)


def test_status_page_plots_come_from_the_store(tmp_path, db_url):
    """The backend (machine B) serves the plots of a version trained on machine A."""
    from backend.app import create_app
    from tests.test_status import LOOPBACK, png_bytes

    a, b = _machine(tmp_path, "a", db_url), _machine(tmp_path, "b", db_url)
    src = tmp_path / "a" / "work"
    _trained_version(src)
    vid = _register(a, src)
    shutil.rmtree(src)
    c = TestClient(create_app(b), client=LOOPBACK)
    html = c.get(f"/status/{PID}").text
    names = sorted(["detector results.png", "detector results.csv", "bundle"])  # plots are listed by name
    k = {n: i for i, n in enumerate(names)}
    assert f'src="{PID}/versions/{vid}/plots/{k["detector results.png"]}"' in html
    r = c.get(f"/status/{PID}/versions/{vid}/plots/{k['detector results.png']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == png_bytes()
    r = c.get(f"/status/{PID}/versions/{vid}/plots/{k['detector results.csv']}")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    assert c.get(f"/status/{PID}/versions/{vid}/plots/{k['bundle']}").status_code == 404  # JSON is no plot
    assert (Path(b.model_dir) / "project_7" / "p7-v1" / "detector_results.png").read_bytes() == png_bytes()


def test_versions_trained_before_the_store_are_adopted(tmp_path, db_url):
    """An install from before the store kept versions on the training machine's disk only; that
    machine stores them at start, then another machine serves them."""
    from backend.hashing import file_sha256

    a, b = _machine(tmp_path, "a", db_url), _machine(tmp_path, "b", db_url)
    old = Path(a.model_dir) / "project_7" / "p7-v1"
    _trained_version(old)
    legacy_pt = Path(a.model_dir) / "project_7" / "p7-v0.pt"
    legacy_pt.write_bytes(b"weights of the first release")
    outside = tmp_path / "elsewhere" / "bundle.json"
    outside.parent.mkdir()
    outside.write_text("{}")
    with session_scope(db_url) as s:
        s.add(Project(id=PID))
        s.flush()
        rows = [ModelVersion(project_id=PID, version="p7-v1", path=str(old / "bundle.json"), sha256="0"),
                ModelVersion(project_id=PID, version="p7-v0", path=str(legacy_pt), sha256="0"),
                ModelVersion(project_id=PID, version="p7-v9", path=str(outside), sha256="0"),
                ModelVersion(project_id=PID, version="base-x", path=str(DEFAULT_MODEL_PATH),
                             sha256=file_sha256(DEFAULT_MODEL_PATH))]
        s.add_all(rows)
    assert sorted(modelstore.adopt_local_versions(a)) == ["p7-v0", "p7-v1"]
    assert modelstore.adopt_local_versions(a) == []  # once
    with session_scope(db_url) as s:
        assert [n for n, _sha, _size in modelstore.listing(s, PID, "p7-v0")] == ["p7-v0.pt"]
        assert not modelstore.listing(s, PID, "p7-v9") and not modelstore.listing(s, PID, "base-x")
    p = modelstore.model_path(b, rows[0])
    assert p == Path(b.model_dir) / "project_7" / "p7-v1" / "bundle.json" and p.read_bytes() == (old / "bundle.json").read_bytes()
    assert modelstore.model_path(b, rows[1]).read_bytes() == b"weights of the first release"


def test_prune_deletes_only_weights_no_one_serves(tmp_path, db_url):
    """Rejected versions and retired ones beyond the newest ``keep_retired`` lose their weights
    (database and local copy); the promoted and candidate versions, and every version's plots and
    bundle JSON, stay."""
    from datetime import datetime, timedelta, timezone

    a = _machine(tmp_path, "a", db_url)
    src = tmp_path / "src"
    _trained_version(src)
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    plan = {"p7-v1": "retired", "p7-v2": "retired", "p7-v3": "rejected", "p7-v4": "retired",
            "p7-v5": "promoted", "p7-v6": "candidate"}
    with session_scope(db_url) as s:
        s.add(Project(id=PID, title="faces"))
        s.flush()
        for i, (name, status) in enumerate(plan.items()):
            modelstore.store_folder(s, PID, name, src)
            s.add(ModelVersion(project_id=PID, version=name, path=str(src / "bundle.json"), sha256="0", status=status,
                               promoted_at=t0 + timedelta(days=i) if status in ("retired", "promoted") else None))
    for name in plan:
        modelstore.materialise(a, PID, name)

    def names(version):
        with session_scope(db_url) as s:
            return {n for n, _sha, _size in modelstore.listing(s, PID, version)}

    everything = names("p7-v1")
    weights = {n for n in everything if n.endswith((".pt", ".onnx"))}
    assert weights and everything - weights

    listed = modelstore.prune(a, keep_retired=1)  # dry run: nothing deleted
    assert [(r["version"], r["status"]) for r in listed] == [("p7-v1", "retired"), ("p7-v2", "retired"),
                                                            ("p7-v3", "rejected")]
    assert all(set(r["files"]) == weights and r["bytes"] > 0 for r in listed)
    assert names("p7-v1") == everything

    assert modelstore.prune(a, keep_retired=1, dry_run=False) == listed
    for name in ("p7-v1", "p7-v2", "p7-v3"):
        assert names(name) == everything - weights
        folder = modelstore.version_dir(a, PID, name)
        assert not any((folder / w).exists() for w in weights)
        assert (folder / "bundle.json").is_file() and (folder / "detector_results.png").is_file()
    for name in ("p7-v4", "p7-v5", "p7-v6"):  # newest retired, promoted, candidate
        assert names(name) == everything
    assert modelstore.prune(a, keep_retired=1, dry_run=False) == []  # once
    with pytest.raises(ValueError):
        modelstore.prune(a, keep_retired=-1)
