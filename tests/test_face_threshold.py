"""The face threshold a retrain stores: the labelled images' choice shrunk toward the parent
version's threshold by the number of labelled faces (ml_worker.face_threshold; docs/training.md)."""

from __future__ import annotations

import numpy as np
import pytest

from backend.config import DEFAULT_MODEL_PATH
from ml_worker.face_threshold import PRIOR_FACES, shrink_face_threshold
from tests.helpers_unit import make_settings


def test_few_faces_stay_near_the_parent_many_faces_near_the_fit():
    # the new-user trial's first retrain: 25 labelled faces, the labelled images' choice 0.05, parent 0.5
    assert shrink_face_threshold(0.05, 0.5, 25) == 0.25  # 0.5 - 0.45 * 25/45 = 0.25
    assert shrink_face_threshold(0.05, 0.5, 20) == 0.25  # halfway (0.275) rounded down
    assert shrink_face_threshold(0.05, 0.5, 40) == 0.2   # 0.2
    assert shrink_face_threshold(0.15, 0.5, 80) == 0.2   # 0.22 rounded down
    assert shrink_face_threshold(0.05, 0.5, 10_000) == 0.05  # enough faces: the fit
    assert shrink_face_threshold(0.05, 0.5, 0) == 0.5  # no face: the parent's
    # toward the parent both ways: a fit above a low parent comes down
    assert shrink_face_threshold(0.45, 0.05, 20) == 0.25


def test_rounding_goes_down_a_missed_face_costs_more_than_a_false_box():
    t = shrink_face_threshold(0.1, 0.5, PRIOR_FACES * 3)  # 0.5 - 0.4 * 3/4 = 0.2 exactly
    assert t == 0.2, "a value on the grid is kept (no floating-point step down)"
    assert shrink_face_threshold(0.1, 0.5, 61) == 0.15  # 0.1988: the lower grid point
    assert shrink_face_threshold(0.05, 0.06, 5) == 0.05  # never below the grid's lowest point
    assert shrink_face_threshold(0.05, 0.05, 5) == 0.05


def test_no_parent_threshold_or_no_prior_keeps_the_fit():
    assert shrink_face_threshold(0.05, None, 3) == 0.05
    assert shrink_face_threshold(0.05, 0.5, 3, prior_faces=0) == 0.05


@pytest.mark.parametrize("args", [(0.1, 0.5, -1), (1.2, 0.5, 3), (0.1, -0.1, 3)])
def test_bad_input_is_refused(args):
    with pytest.raises(ValueError):
        shrink_face_threshold(*args)
    with pytest.raises(ValueError):
        shrink_face_threshold(0.1, 0.5, 3, step=0)


def test_the_retrain_stores_the_shrunk_threshold_and_its_figures(tmp_path):
    """ml_worker.training's step after tune_face_threshold: parent from the bundle the retrain starts
    from (the shipped default, 0.5), the figures recomputed at the stored threshold."""
    from facemodels.detector import Detection, ImageDetections
    from ml_worker.dataset import Sample
    from ml_worker.training import _shrunk_face_threshold, tune_face_threshold

    img = np.zeros((100, 200, 3), np.uint8)
    # 20 images, one face each; the detector finds every face at 0.6 and one false box at 0.1 per image
    samples = [Sample(i, "train" if i < 16 else "val", img, [(10, 10, 50, 50, 0)]) for i in range(20)]
    dets = [ImageDetections(200, 100, [Detection((11, 10, 50, 51), 0.6, 0, np.array([1.0]), 0.6),
                                       Detection((120, 40, 170, 90), 0.1, 0, np.array([1.0]), 0.1)])
            for _ in samples]
    settings = make_settings(tmp_path)
    fit, info = tune_face_threshold(None, samples, 160, dets=dets)
    assert fit == 0.15 and info["precision"] == 1.0  # the lowest within 0.02 F1 of the best
    t, fig = _shrunk_face_threshold(fit, info, DEFAULT_MODEL_PATH, settings, samples, dets)
    assert t == 0.3  # 0.5 - 0.35 * 20/40 = 0.325, rounded down
    assert fig["fit_threshold"] == 0.15 and fig["parent_threshold"] == 0.5 and fig["faces"] == 20
    assert fig["prior_threshold"] == 0.5  # the shipped default starts the chain
    assert fig["recall"] == 1.0 and fig["precision"] == 1.0 and fig["boxes_per_face"] == 1.0


def test_a_real_retrain_stores_the_shrunk_threshold_and_reports_its_prediction_time(tmp_path):
    """train_two_stage on 12 real awake_sleep images (1 detector epoch, 1 classifier epoch): the
    bundle's threshold is the shrunk one with its provenance, and the detector stage reports the
    seconds its run on the labelled images took (the status page's evaluate time, backend.jobprogress)."""
    from backend.config import DEFAULT_MODEL_PATH
    from facemodels.two_stage import read_bundle
    from ml_worker.dataset import build_dataset
    from ml_worker.face_threshold import shrink_face_threshold
    from ml_worker.training import train_two_stage
    from tests.test_two_stage import _tasks

    tasks, schema, data = _tasks(12)
    settings = make_settings(tmp_path, local_files_document_root=str(data), imgsz=160, train_batch=4,
                             detector_epochs=1, classifier_epochs=1)
    ds = build_dataset(tasks, schema, tmp_path / "ds", settings)
    seen = []
    out = train_two_stage(ds, schema, DEFAULT_MODEL_PATH, settings, tmp_path / "job", progress=seen.append)
    fit = read_bundle(out["bundle"])["face_threshold_fit"]
    faces = sum(len(s.boxes) for s in ds.samples)
    assert fit["parent_threshold"] == read_bundle(DEFAULT_MODEL_PATH)["face_threshold"] and fit["faces"] == faces
    assert out["face_threshold"] == shrink_face_threshold(fit["fit_threshold"], fit["parent_threshold"], faces)
    assert read_bundle(out["bundle"])["face_threshold"] == out["face_threshold"]
    (timed,) = [f for f in seen if "predict_seconds" in f]
    assert timed["stage"] == "train detector" and timed["predict_images"] == len(ds.samples) == 12
    assert 0 < timed["predict_seconds"] < 600


def test_a_chain_of_retrains_shrinks_toward_where_it_started():
    """The prior of a retrain is the chain's start, not the last retrain's threshold (which already
    holds the pull of the faces the next fit sees again). The new user's trial: fits 0.15 / 0.15 /
    0.35 / 0.40 on 24 / 29 / 40 / 49 faces stored 0.30 / 0.20 / 0.30 / 0.35 toward the last retrain."""
    from ml_worker.face_threshold import prior_threshold

    shipped = {"face_threshold": 0.5}  # the shipped default: no fit on the project's labels
    assert prior_threshold(shipped) == 0.5
    assert prior_threshold({}) is None  # a legacy .pt: no threshold
    parent, stored = shipped, []
    for fit, faces in ((0.15, 24), (0.15, 29), (0.35, 40), (0.40, 49)):
        prior = prior_threshold(parent)
        t = shrink_face_threshold(fit, prior, faces)
        stored.append(t)
        parent = {"face_threshold": t, "face_threshold_fit": {"fit_threshold": fit, "parent_threshold":
                                                              parent["face_threshold"], "prior_threshold": prior}}
    assert stored == [0.3, 0.25, 0.4, 0.4]
    # a retrain stored before priors were recorded: its parent's threshold (exact for a first retrain)
    assert prior_threshold({"face_threshold": 0.3, "face_threshold_fit": {"parent_threshold": 0.5}}) == 0.5
