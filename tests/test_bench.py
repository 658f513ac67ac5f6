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
    from ml_worker.sampler import DEFAULT_QUERY_STRATEGY

    data = require_data(AWAKE_SLEEP)
    settings = make_settings(tmp_path, imgsz=160, train_batch=4, detector_epochs=1, classifier_epochs=2,
                             classifier_refit_epochs=1)
    res = bench_accept(data, [0, 6], [0], tmp_path / "out", settings, strategies=("random", "sampler"), test_limit=6)
    rows = res["rows"]
    assert all(r["refit_seconds"] > 0 and r["train_cpu_seconds"] > 0 for r in rows if r["labels"] == 6), \
        "each round's candidate gets the worker's refit on every labelled face"
    assert [(r["strategy"], r["labels"]) for r in rows] == [("random", 0), ("random", 6), (DEFAULT_QUERY_STRATEGY, 0),
                                                          (DEFAULT_QUERY_STRATEGY, 6)]
    assert rows[0]["acceptance_rate"] == 0.0, "day 0 knows no awake/sleep class: nothing is accepted as is"
    assert all(r["images"] == 6 for r in rows)
    with open(res["files"]["rounds_csv"]) as f:
        assert len(list(csv.DictReader(f))) == 4
    summary = json.loads(res["files"]["summary_json"].read_text())
    assert summary["random"]["6"]["acceptance_rate"]["n"] == 1
    assert (tmp_path / "out" / "models" / "random_s0_n6" / "bundle.json").exists()
    assert res["files"]["plot"].exists()


@pytest.mark.slow
def test_bench_accept_typiclust_runs_with_the_labelled_embeddings(tmp_path):
    """A strategy that reads the labelled images' embeddings (typiclust, diverse_*) gets them in the
    benchmark as the scoring station passes them, so its second batch is the product's."""
    from ml_worker.bench import bench_accept

    data = require_data(AWAKE_SLEEP)
    settings = make_settings(tmp_path, imgsz=160, train_batch=4, detector_epochs=1, classifier_epochs=1,
                             classifier_refit_epochs=0, query_strategy="typiclust")
    res = bench_accept(data, [3, 6], [0], tmp_path / "out", settings, strategies=("sampler",), test_limit=4)
    assert [(r["strategy"], r["labels"]) for r in res["rows"]] == [("typiclust", 3), ("typiclust", 6)]
    imgs = sorted((tmp_path / "out" / "work" / "sampler_s0_n6" / "dataset" / "images").rglob("*.jpg"))
    assert len(imgs) == 6 and len({p.read_bytes() for p in imgs}) == 6, "six different pool images labelled"


@pytest.mark.slow
def test_bench_accept_query_batch_labels_the_head_of_a_larger_pick(tmp_path):
    """``query_batch``: the product picks QUERY_BATCH_SIZE and a person labels its head before the
    next retrain re-picks; the 3 images labelled are 3 of the 6 the sampler picks for a batch of 6."""
    from ml_worker.bench import bench_accept

    data = require_data(AWAKE_SLEEP)
    settings = make_settings(tmp_path, imgsz=160, train_batch=4, detector_epochs=1, classifier_epochs=1,
                             classifier_refit_epochs=0, query_strategy="typiclust")

    def labelled(out, size, query_batch):
        bench_accept(data, [size], [0], out, settings, strategies=("sampler",), test_limit=2, query_batch=query_batch)
        return {p.read_bytes() for p in (out / "work" / f"sampler_s0_n{size}" / "dataset" / "images").rglob("*.jpg")}

    head = labelled(tmp_path / "a", 3, 6)
    assert len(head) == 3 and head <= labelled(tmp_path / "b", 6, 0)


def _rows(strategy, seed, curve):
    return [{"strategy": strategy, "seed": seed, "labels": n, "acceptance_rate": v, "mAP50": v / 2}
            for n, v in curve.items()]


def test_labels_to_target_full_pool_reference():
    """Labels to 95% of the full-pool figure, per seed and on the mean curve (simulate's definition)."""
    from ml_worker.bench import labels_to_target

    rows = (_rows("random", 0, {0: 0.0, 10: 0.5, 20: 0.7, 40: 0.8}) + _rows("random", 1, {0: 0.0, 10: 0.5, 20: 0.8, 40: 0.8})
            + _rows("cluster_margin", 0, {0: 0.0, 10: 0.8, 20: 0.8, 40: 0.8})
            + _rows("cluster_margin", 1, {0: 0.0, 10: 0.6, 20: 0.6, 40: 0.7}))
    lt = labels_to_target(rows, {"labels": 725, "acceptance_rate": 0.8, "mAP50": 0.4})
    acc = lt["acceptance_rate"]
    assert acc["goal"] == pytest.approx(0.76) and acc["reference_source"] == "full pool (725 labels)"
    by = {o["strategy"]: o for o in acc["strategies"]}
    assert [o["strategy"] for o in acc["strategies"]][0] == "random"
    assert by["random"]["labels_to_target"] == 40  # mean curve 0.75 at 20 < 0.76
    assert by["random"]["labels_to_target_per_seed"] == "0:40 1:20"
    assert by["cluster_margin"]["labels_to_target_per_seed"] == "0:10 1:-"
    assert by["cluster_margin"]["labels_to_target"] is None  # its mean curve peaks at 0.75
    assert by["cluster_margin"]["ratio_per_seed_mean"] == 0.25 and by["cluster_margin"]["seeds_with_ratio"] == "1/2"
    assert lt["mAP50"]["goal"] == pytest.approx(0.38)


def test_labels_to_target_best_size_and_report(tmp_path):
    """Without a reference the best mean size is the reference; bench-report rewrites the report."""
    from typer.testing import CliRunner

    from backend.cli import app
    from ml_worker.bench import _write, labels_to_target

    rows = _rows("random", 0, {0: 0.0, 20: 0.5, 40: 0.9}) + _rows("cluster_margin", 0, {0: 0.0, 20: 0.9, 40: 0.9})
    lt = labels_to_target(rows)
    by = {o["strategy"]: o for o in lt["acceptance_rate"]["strategies"]}
    assert lt["acceptance_rate"]["reference_source"] == "best size" and lt["acceptance_rate"]["reference"] == 0.9
    assert by["random"]["labels_to_target"] == 40 and by["cluster_margin"]["labels_to_target"] == 20
    assert by["cluster_margin"]["ratio_to_random"] == 0.5
    full = [dict(r, train_seconds=1.0, edits_per_image=0.1, face_mAP50=0.9, class_accuracy=0.9, boxes_per_face=1.0,
                 recall_iou30=1.0, false_boxes_per_image=0.0) for r in rows]
    _write(full, tmp_path)
    (tmp_path / "reference.json").write_text(json.dumps({"labels": 725, "acceptance_rate": 1.0, "mAP50": 0.5}))
    res = CliRunner().invoke(app, ["bench-report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "labels_to_target.md").read_text()
    assert "full pool (725 labels)" in md and "not reached" in md
    assert CliRunner().invoke(app, ["bench-report", str(tmp_path / "nothing")]).exit_code == 1
