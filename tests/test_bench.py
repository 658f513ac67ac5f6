"""`faceloop evaluate` and `faceloop bench-accept` on real labelled faces (tiny sizes)."""

from __future__ import annotations

import csv
import json

import pytest

from backend.config import DEFAULT_MODEL_PATH
from tests.conftest import AWAKE_SLEEP, SHARED_DATA, require_data
from tests.helpers_unit import make_settings


def test_evaluate_folder_expressions(tmp_path):
    from ml_worker.bench import evaluate_folder

    data = require_data(SHARED_DATA / "expressions")
    r = evaluate_folder(DEFAULT_MODEL_PATH, data, "val", make_settings(tmp_path), limit=8)
    assert r["images"] == 8 and r["faces"] >= 8
    assert r["accepted"] + r["class_fixed"] + r["box_fixed"] + r["missed"] == r["faces"]
    assert 0 <= r["acceptance_rate"] <= 1 and 0 <= r["face_mAP50"] <= 1


def test_evaluate_cli_errors(tmp_path):
    from typer.testing import CliRunner

    from backend.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(DEFAULT_MODEL_PATH), str(tmp_path)])
    assert res.exit_code == 1 and "no data.yaml" in res.output


@pytest.mark.slow
def test_bench_accept_tiny(tmp_path):
    from ml_worker.bench import bench_accept

    data = require_data(AWAKE_SLEEP)
    settings = make_settings(tmp_path, imgsz=160, train_batch=4, detector_epochs=1, classifier_epochs=2)
    res = bench_accept(data, [0, 6], [0], tmp_path / "out", settings, strategies=("random", "sampler"), test_limit=6)
    rows = res["rows"]
    assert [(r["strategy"], r["labels"]) for r in rows] == [("random", 0), ("random", 6), ("cluster_margin", 0),
                                                          ("cluster_margin", 6)]
    assert rows[0]["acceptance_rate"] == 0.0, "day 0 knows no awake/sleep class: nothing is accepted as is"
    assert all(r["images"] == 6 for r in rows)
    with open(res["files"]["rounds_csv"]) as f:
        assert len(list(csv.DictReader(f))) == 4
    summary = json.loads(res["files"]["summary_json"].read_text())
    assert summary["random"]["6"]["acceptance_rate"]["n"] == 1
    assert (tmp_path / "out" / "models" / "random_s0_n6" / "bundle.json").exists()
    assert res["files"]["plot"].exists()
