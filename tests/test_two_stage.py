"""Two-stage model versions: bundle files, the detector + classifier prediction path, training of
both stages on a real (tiny) annotated set, and the promotion gate's rules."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from backend.config import DEFAULT_MODEL_PATH
from backend.labels import Box, ProjectSchema
from backend.lsapi import SnapshotTask
from facemodels.two_stage import read_bundle, write_bundle
from ml_worker.training import gate
from tests.conftest import AWAKE_SLEEP, require_data
from tests.helpers_unit import config_text, make_settings


def test_shipped_default_is_a_bundle_whose_files_match():
    b = read_bundle(DEFAULT_MODEL_PATH)
    from backend.hashing import file_sha256

    assert file_sha256(b["detector_path"]) == b["detector_sha256"]
    assert file_sha256(b["classifier_path"]) == b["classifier_sha256"]
    assert "happy" in b["classes"]


def test_shipped_default_serves_the_expression_fine_tune_and_starts_new_classes_from_the_port():
    """Expression projects are served by face_expression_ft.pt from day 0; a retrain for classes it does
    not know (awake/sleep) starts stage 2 from the original port, which measured better on unseen people
    (docs/classifier.md); a retrain of an expression project continues from the fine-tune."""
    from backend.hashing import file_sha256
    from facemodels.two_stage import classifier_init_path

    b = read_bundle(DEFAULT_MODEL_PATH)
    assert Path(b["classifier_path"]).name == "face_expression_ft.pt"
    assert Path(b["classifier_init_path"]).name == "face_expression.pt"
    assert file_sha256(b["classifier_init_path"]) == b["classifier_init_sha256"]
    assert b["classes"] == ["neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised"]
    assert classifier_init_path(b, ["awake", "sleep"]) == b["classifier_init_path"]
    expressions = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt"]
    assert classifier_init_path(b, expressions) == b["classifier_path"]
    no_init = {k: v for k, v in b.items() if not k.startswith("classifier_init")}
    assert classifier_init_path(no_init, ["awake", "sleep"]) == b["classifier_path"]


def test_classifier_recipe_known_for_expression_projects_only():
    """An expression project's retrains fine-tune the classifier that knew its classes gently; a project
    with new classes gets the new-class recipe; a project's bundle carries its choice to later retrains."""
    from facemodels.two_stage import classifier_recipe

    b = read_bundle(DEFAULT_MODEL_PATH)
    expressions = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt"]
    assert classifier_recipe(b, expressions) == "known"
    assert classifier_recipe(b, ["awake", "sleep"]) == "new"
    # a project's version: its recorded choice holds whatever the labels, so an awake/sleep project's
    # classifier (which now knows awake/sleep) keeps the recipe it was trained with
    project = {k: v for k, v in b.items() if not k.startswith("classifier_init")}
    assert classifier_recipe({**project, "classes": ["awake", "sleep"]}, ["awake", "sleep"]) == "new"
    assert classifier_recipe({**project, "classifier_recipe": "known"}, expressions) == "known"
    assert classifier_recipe({**project, "classifier_recipe": "new"}, expressions) == "new"
    assert classifier_recipe({**project, "classifier_recipe": "bogus"}, expressions) == "new"


def test_bundle_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_bundle(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a faceloop-two-stage bundle"):
        read_bundle(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"format": "faceloop-two-stage", "detector": "d.pt",
                                                 "classifier": "c.pt"}))
    with pytest.raises(FileNotFoundError, match="detector weights"):
        read_bundle(tmp_path / "y.json")


def test_write_bundle_is_atomic_and_refuses_to_overwrite(tmp_path):
    b = read_bundle(DEFAULT_MODEL_PATH)
    out = write_bundle(tmp_path / "v1", Path(b["detector_path"]), Path(b["classifier_path"]), ["a", "b"])
    assert read_bundle(out)["classes"] == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no temporary folder left behind
    with pytest.raises(FileExistsError):
        write_bundle(tmp_path / "v1", Path(b["detector_path"]), Path(b["classifier_path"]), ["a"])


def test_gate_rules():
    cand = {"mAP50": 0.6, "acceptance_rate": 0.5}
    ok, why = gate(cand, {"mAP50": 0.5, "acceptance_rate": 0.4}, 10)
    assert ok and "tie" not in why and why.startswith("accepted as is 5 of 10 validation faces > current 4")
    # equal acceptance: mAP50 decides, ties to the newer labels (a new user saw "0.995 >= 0.995" on 5 faces)
    ok, why = gate({"mAP50": 0.995, "acceptance_rate": 0.8}, {"mAP50": 0.995, "acceptance_rate": 0.8}, 5)
    assert ok and why.endswith("a tie: 5 validation faces do not tell the versions apart, the newer labels win")
    assert not gate({"mAP50": 0.6, "acceptance_rate": 0.4}, {"mAP50": 0.7, "acceptance_rate": 0.4}, 10)[0]
    # a new user's trial: rejected on mAP50 while accepting more faces, and better on the unlabelled images
    ok, why = gate({"mAP50": 0.626, "accepted": 6}, {"mAP50": 0.723, "accepted": 5}, 11)
    assert ok and why == ("accepted as is 6 of 11 validation faces > current 5: acceptance decides "
                          "(mAP50 0.626, current 0.723)")
    # fewer faces accepted: kept out, whatever mAP50 says (promoted before at 0.995 >= 0.953)
    ok, why = gate({"mAP50": 0.995, "acceptance_rate": 7 / 8, "accepted": 7},
                   {"mAP50": 0.953, "acceptance_rate": 1.0, "accepted": 8}, 8)
    assert not ok and why.startswith("accepted as is 7 of 8 validation faces < current 8: acceptance decides")
    ok, why = gate(cand, {"mAP50": 0.5, "acceptance_rate": 0.4}, 0)
    assert not ok and "no labelled face" in why
    ok, why = gate({"mAP50": 0.0, "acceptance_rate": 0.0}, {"mAP50": 0.0, "acceptance_rate": 0.0}, 5)
    assert not ok and "neither" in why


def _tasks(n: int, data_dir: Path = AWAKE_SLEEP, config: str = "awake_sleep", names: list[str] | None = None):
    """``n`` train images of ``data_dir`` (awake/sleep unless said) as annotated tasks with
    /data/local-files URLs, read from disk; ``names``: the dataset's class names by id (default: the
    config's labels in order)."""
    from PIL import Image

    data = require_data(data_dir)
    schema = ProjectSchema.parse(config_text(config))
    names = names or list(schema.labels)
    files = sorted((data / "images" / "train").glob("*.jpg"))[:: 30][:n]
    tasks = []
    for i, f in enumerate(files):
        w, h = Image.open(f).size
        result = []
        for line in (data / "labels" / "train" / f"{f.stem}.txt").read_text().split("\n"):
            if line.strip():
                c, cx, cy, bw, bh = map(float, line.split())
                box = Box((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h,
                          label=names[int(c)])
                result.append(schema.region(box, w, h))
        rel = f.relative_to(data)
        tasks.append(SnapshotTask(id=100 + i, data={"image": f"/data/local-files/?d={quote(str(rel))}"}, result=result))
    return tasks, schema, data


@pytest.mark.slow
def test_detector_boxes_and_face_crops():
    """Stage 2's crops: every labelled face, plus the detector's shown box on it (IoU >= 0.5), same class."""
    from facemodels.detector import Detection, ImageDetections
    from ml_worker.dataset import Sample
    from ml_worker.training import detector_boxes, face_crops

    img = np.zeros((100, 200, 3), np.uint8)
    samples = [Sample(1, "train", img, [(10, 10, 50, 50, 0), (100, 10, 140, 50, 1)]),
               Sample(2, "val", img, [(10, 10, 50, 50, 1)])]
    dets = [ImageDetections(200, 100, [Detection((12, 8, 52, 52), 0.9, 0, np.array([1.0]), 0.9),     # on face 1
                                       Detection((100, 10, 140, 50), 0.05, 0, np.array([1.0]), 0.05),  # below the threshold
                                       Detection((150, 60, 210, 120), 0.8, 0, np.array([1.0]), 0.8)]),  # no face
            ImageDetections(200, 100, [Detection((30, 30, 70, 70), 0.9, 0, np.array([1.0]), 0.9)])]     # IoU 0.14
    boxes = detector_boxes(dets, samples, threshold=0.3)
    assert boxes == [[(12.0, 8.0, 52.0, 52.0), None], [None]]
    crops = face_crops(samples, ("train",), boxes)
    assert [(tuple(c[1]), c[2]) for c in crops] == [((10, 10, 50, 50), 0), ((12, 8, 52, 52), 0), ((100, 10, 140, 50), 1)]
    assert len(face_crops(samples, ("train", "val"), None)) == 3, "without detector boxes: the labelled faces only"


def test_train_two_stage_on_real_faces(tmp_path):
    from facemodels.detector import ModelCache
    from ml_worker.dataset import build_dataset
    from ml_worker.evaluation import evaluate_model
    from ml_worker.training import _val_samples, train_two_stage

    tasks, schema, data = _tasks(12)
    settings = make_settings(tmp_path, local_files_document_root=str(data), imgsz=160, train_batch=4,
                             detector_epochs=1, classifier_epochs=3)
    ds = build_dataset(tasks, schema, tmp_path / "ds", settings)
    assert ds.problems == [] and len(ds.samples) == 12
    assert {b[4] for s in ds.samples if s.split == "val" for b in s.boxes} == {0, 1}, "val holds both classes"
    seen = []
    out = train_two_stage(ds, schema, DEFAULT_MODEL_PATH, settings, tmp_path / "job", progress=seen.append)
    b = read_bundle(out["bundle"])
    assert b["classes"] == ["awake", "sleep"]
    assert 0.05 <= b["face_threshold"] <= 0.9 and b["face_threshold_fit"]["f1"] >= 0
    # classes the shipped classifier does not know: the new-class recipe from the port, recorded
    from facemodels.classifier import RECIPE, FaceClassifier

    assert b["classifier_recipe"] == out["classifier_recipe"] == "new"
    clf_meta = FaceClassifier.load(b["classifier_path"]).meta["fine_tune"]["recipe"]
    assert clf_meta["crop_margin"] == RECIPE["crop_margin"] and clf_meta["lr"] == RECIPE["lr"]
    assert {f["stage"] for f in seen} >= {"train detector", "train classifier"}
    # per-stage epochs for the status page's time left (backend.jobprogress); the job's epoch counts both
    # (ultralytics ends its last epoch twice, once more after the final validation: recorded once)
    per_stage = list(dict.fromkeys((f["stage"], f["stage_epoch"], f["stage_epochs"], f["epoch"]) for f in seen
                                   if "stage_epoch" in f))
    assert per_stage == [("train detector", 1, 1, 1)] + [("train classifier", k, 3, 1 + k) for k in (1, 2, 3)]
    starts = [f["stage"] for f in seen if "epoch" not in f or f.get("epoch") == 0]
    assert "train classifier" in starts, "the classifier stage starts before its crops are cut"
    model = ModelCache().get(out["bundle"])
    assert model.names == ["awake", "sleep"] and model.face_threshold == b["face_threshold"]
    r = evaluate_model(model, _val_samples(ds, schema), schema, settings)
    assert r["images"] == len(ds.val_ids) and r["faces"] == ds.val_boxes()
    for k in ("mAP50", "face_mAP50", "acceptance_rate", "class_accuracy"):
        assert 0.0 <= r[k] <= 1.0
    assert r["mAP50_top1"] <= r["mAP50"] + 1e-9, "a box's other classes only add hypotheses"
    # stage 2 also learnt from the retrained detector's box on each labelled face it finds
    train_faces = sum(len(s.boxes) for s in ds.samples if s.split == "train")
    found = sum(x is not None for s, row in zip(ds.samples, out["detector_boxes"]) if s.split == "train" for x in row)
    assert [len(row) for row in out["detector_boxes"]] == [len(s.boxes) for s in ds.samples]
    assert out["classifier"]["n_train"] == train_faces + found
    # the predictions carry the project's classes, as probabilities
    det = model.detect([ds.samples[0].image], conf=0.01, imgsz=160)[0]
    for d in det.detections:
        assert d.face_conf is not None and np.isclose(d.class_scores.sum(), 1.0, atol=1e-4)


@pytest.mark.slow
def test_refine_classifier_on_every_labelled_face(tmp_path):
    """The second classifier pass after the gate (CLASSIFIER_REFIT_EPOCHS): it learns from the faces
    of both splits and rewrites the candidate's classifier only; off, or with a bad setting, the
    candidate stays as it is."""
    from backend.hashing import file_sha256
    from facemodels.classifier import FaceClassifier
    from ml_worker.dataset import build_dataset
    from ml_worker.training import refine_classifier, refine_enabled, train_two_stage

    tasks, schema, data = _tasks(8)
    settings = make_settings(tmp_path, local_files_document_root=str(data), imgsz=160, train_batch=4,
                             detector_epochs=1, classifier_epochs=2, classifier_refit_epochs=0)
    assert not refine_enabled(settings)
    ds = build_dataset(tasks, schema, tmp_path / "ds", settings)
    out = train_two_stage(ds, schema, DEFAULT_MODEL_PATH, settings, tmp_path / "job")
    before = read_bundle(out["bundle"])
    assert refine_classifier(out, ds, schema, settings) is None, "CLASSIFIER_REFIT_EPOCHS=0: nothing done"
    gated_copy = tmp_path / "gated.pt"
    gated_copy.write_bytes(Path(before["classifier_path"]).read_bytes())
    assert read_bundle(out["bundle"])["classifier_sha256"] == before["classifier_sha256"]

    s2 = settings.model_copy(update={"classifier_refit_epochs": 1})
    with pytest.raises(ValueError, match="CLASSIFIER_REFIT_FROM"):
        refine_classifier(out, ds, schema, s2.model_copy(update={"classifier_refit_from": "scratch"}))
    assert read_bundle(out["bundle"])["classifier_sha256"] == before["classifier_sha256"], "a bad setting changes nothing"

    seen = []
    r = refine_classifier(out, ds, schema, s2, progress=seen.append)
    after = read_bundle(out["bundle"])
    n_all = sum(len(s.boxes) for s in ds.samples)
    assert r["epochs"] == 1 and r["from"] == "candidate" and r["n_faces"] == n_all, "train + val faces"
    assert n_all > sum(len(s.boxes) for s in ds.samples if s.split == "train")
    assert after["classifier_sha256"] != before["classifier_sha256"]
    assert after["classifier_sha256"] == file_sha256(after["classifier_path"])
    assert after["detector_sha256"] == before["detector_sha256"] and after["face_threshold"] == before["face_threshold"]
    assert after["nms_iou"] == before["nms_iou"] and after["classes"] == ["awake", "sleep"]
    assert FaceClassifier.load(after["classifier_path"]).classes == ["awake", "sleep"]
    assert seen and seen[0]["stage"] == "refine classifier"
    assert [(f["stage"], f["stage_epoch"], f["stage_epochs"]) for f in seen[1:]] == [("refine classifier", 1, 1)]
    assert not (tmp_path / "job" / "candidate_refit").exists()
    # the next gate judges a refit version by the classifier it had at its own gate
    from ml_worker.training import GATED_CLASSIFIER, gate_view

    assert gate_view(out["bundle"], tmp_path / "view") == Path(out["bundle"]), "no gated classifier: the version itself"
    (Path(out["bundle"]).parent / GATED_CLASSIFIER).write_bytes(gated_copy.read_bytes())
    view = read_bundle(gate_view(out["bundle"], tmp_path / "view"))
    assert view["classifier_sha256"] == before["classifier_sha256"] and view["detector_sha256"] == after["detector_sha256"]
    assert view["face_threshold"] == after["face_threshold"] and view["classes"] == after["classes"]
    (Path(out["bundle"]).parent / GATED_CLASSIFIER).unlink()
    # the whole recipe again from the retrain's start, on every labelled face
    r = refine_classifier(out, ds, schema, s2.model_copy(update={"classifier_refit_from": "parent"}))
    assert r["from"] == "parent" and r["n_faces"] == n_all
    from facemodels.detector import ModelCache

    det = ModelCache().get(out["bundle"]).detect([ds.samples[0].image], conf=0.01, imgsz=160)[0]
    assert all(np.isclose(d.class_scores.sum(), 1.0, atol=1e-4) for d in det.detections), "the refit version serves"


@pytest.mark.slow
def test_expression_project_retrain_keeps_the_classifier_crop_and_fine_tunes_gently(tmp_path):
    """An expression project continues from the shipped expression classifier at its own crop margin
    and the known-classes settings (the new-class recipe's margin and lr made every such retrain worse
    than day 0: docs/classifier.md); the refit keeps the same settings and the bundle records them."""
    from facemodels.classifier import KNOWN_CLASSES_RECIPE, FaceClassifier
    from ml_worker.dataset import build_dataset
    from ml_worker.training import refine_classifier, train_two_stage
    from tests.conftest import SHARED_DATA

    names = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt"]
    tasks, schema, data = _tasks(8, SHARED_DATA / "expressions", "face_expressions", names)
    settings = make_settings(tmp_path, local_files_document_root=str(data), imgsz=160, train_batch=4,
                             detector_epochs=1, classifier_epochs=2, classifier_refit_epochs=1)
    ds = build_dataset(tasks, schema, tmp_path / "ds", settings)
    assert ds.problems == []
    seen = []
    out = train_two_stage(ds, schema, DEFAULT_MODEL_PATH, settings, tmp_path / "job", progress=seen.append)
    b = read_bundle(out["bundle"])
    shipped = FaceClassifier.load(read_bundle(DEFAULT_MODEL_PATH)["classifier_path"])
    assert out["classifier_recipe"] == b["classifier_recipe"] == "known"
    assert Path(out["classifier_init"]).name == "face_expression_ft.pt"
    tuned = FaceClassifier.load(b["classifier_path"])
    assert tuned.crop_margin == shipped.crop_margin == 0.2
    rec = tuned.meta["fine_tune"]["recipe"]
    assert rec["crop_margin"] == 0.2 and rec["lr"] == KNOWN_CLASSES_RECIPE["lr"]
    assert any("fine-tuned gently" in f.get("message", "") for f in seen), "the status says which recipe"
    refine_classifier(out, ds, schema, settings)
    after = read_bundle(out["bundle"])
    assert after["classifier_recipe"] == "known"
    rec = FaceClassifier.load(after["classifier_path"]).meta["fine_tune"]["recipe"]
    assert rec["crop_margin"] == 0.2 and rec["lr"] == KNOWN_CLASSES_RECIPE["lr"] and rec["epochs"] == 1
