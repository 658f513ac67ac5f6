"""The shipped face detector (stage 1, ``models/faceloop-face.pt``) and its day-0 benchmark helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import AWAKE_SLEEP, REPO, require_data

sys.path.insert(0, str(REPO / "benchmarks"))

FACE_MODEL = REPO / "models" / "faceloop-face.pt"
#: One frame of each awake_sleep val source: the seen driver and the two people never seen in training.
VAL_IMAGES = ["augstartups", "harish", "agufsamudra"]


def test_shipped_detector_has_one_class_face_and_metadata():
    from facemodels.detector_meta import read_class_names

    meta = json.loads(FACE_MODEL.with_suffix(".json").read_text())
    assert meta["names"] == ["face"]
    assert 0 < meta["conf"] < 1 and meta["imgsz"] in (256, 320)
    assert read_class_names(FACE_MODEL) == ["face"]
    assert FACE_MODEL.stat().st_size < 8_000_000


def test_shipped_detector_finds_faces_in_val_scenes():
    """Through the product's prediction path, at the shipped threshold, each of 3 val scenes gets
    a box with IoU >= 0.3 on its labelled face."""
    require_data()
    from detector_day0 import iou_matrix, load_split

    from facemodels.detector import FaceModel

    meta = json.loads(FACE_MODEL.with_suffix(".json").read_text())
    model = FaceModel(FACE_MODEL)
    assert model.names == ["face"]
    images, gts, names = load_split(AWAKE_SLEEP, "val")
    picks = [next(i for i, n in enumerate(names) if n.startswith(p)) for p in VAL_IMAGES]
    res = model.detect([images[i] for i in picks], conf=meta["conf"], imgsz=meta["imgsz"])
    for i, r in zip(picks, res):
        boxes = np.array([d.box for d in r.detections]).reshape(-1, 4)
        assert len(boxes), f"no face found in {names[i]}"
        assert iou_matrix(boxes, gts[i]).max() >= 0.3, f"{names[i]}: best IoU {iou_matrix(boxes, gts[i]).max():.2f}"
        assert all(d.cls == 0 for d in r.detections)


def test_benchmark_matching_counts_duplicates_as_false_boxes():
    from detector_day0 import figures, greedy_nms, iou_matrix, map50

    gt = [np.array([[0, 0, 10, 10]], float), np.array([[0, 0, 10, 10]], float)]
    # image 1: a hit and a duplicate of it (IoU 0.64) plus a box off the face; image 2: nothing
    dets = [(np.array([[0, 0, 10, 10], [1, 1, 9, 9], [50, 50, 60, 60]], float), np.array([0.9, 0.8, 0.3])),
            (np.zeros((0, 4)), np.zeros(0))]
    assert iou_matrix(dets[0][0][:1], dets[0][0][1:2])[0, 0] == pytest.approx(0.64)
    f = figures(dets, gt, conf=0.25, nms_iou=0.7)
    assert f["recall@0.3"] == 0.5 and f["false_per_image"] == 1.0 and f["boxes_per_face"] == 1.5
    assert f["images_without_box"] == 1
    g = figures(dets, gt, conf=0.25, nms_iou=0.5)  # the extra NMS pass removes the duplicate
    assert g["false_per_image"] == 0.5 and g["boxes_per_face"] == 1.0
    assert list(greedy_nms(dets[0][0], dets[0][1], 0.5)) == [0, 2]
    assert map50(dets, gt) == pytest.approx(0.5, abs=0.02)


def test_face_dataset_is_one_class_with_symlinked_images(tmp_path):
    """build_face_dataset on a tiny fake ../shared/data: labels rewritten to class 0, images linked."""
    from PIL import Image

    from ml_worker.base_model import build_face_dataset

    root = tmp_path / "data"
    for ds, cls, full in (("awake_sleep", 1, False), ("expressions", 5, True)):
        (root / ds).mkdir(parents=True)
        (root / ds / "data.yaml").write_text("names: {0: a}\n")
        for split in ("train", "val"):
            (root / ds / "images" / split).mkdir(parents=True)
            (root / ds / "labels" / split).mkdir(parents=True)
            for k in range(3):
                name = f"{'knockcat' if k == 0 else ds}_{k}"
                Image.new("RGB", (64, 48), (k * 40, 80, 120)).save(root / ds / "images" / split / f"{name}.jpg")
                box = "0.5 0.5 1.0 1.0" if full else "0.5 0.5 0.3 0.4"
                (root / ds / "labels" / split / f"{name}.txt").write_text(f"{cls} {box}\n")
    y = build_face_dataset(tmp_path / "out", data_root=root, n_expressions=2, n_synthetic=2, n_val_expressions=1)
    import yaml

    data = yaml.safe_load(y.read_text())
    assert data["names"] == {0: "face"} and data["nc"] == 1
    counts = json.loads((tmp_path / "out" / "counts.json").read_text())
    assert counts == {"awake_sleep_train": 3, "expressions_train": 2, "synthetic_train": 2,
                      "val_awake_sleep_train_knockcat": 1, "val_expressions": 1}
    labels = list((tmp_path / "out" / "labels" / "train").glob("*.txt"))
    assert len(labels) == 7
    assert {ln.split()[0] for p in labels for ln in p.read_text().splitlines()} == {"0"}
    assert all(p.is_symlink() for p in (tmp_path / "out" / "images" / "train").glob("as_*"))
    synth = [ln for p in labels if p.name.startswith("synth") for ln in p.read_text().splitlines()]
    assert len(synth) >= 3  # the scene's own face plus at least one pasted face
    # one person held out: not in train (nor in the synthetic scenes), the val split instead
    build_face_dataset(tmp_path / "ho", data_root=root, n_expressions=2, n_synthetic=2, n_val_expressions=1,
                       holdout="knockcat")
    assert not list((tmp_path / "ho" / "images" / "train").glob("as_knockcat*"))
    assert [p.name for p in (tmp_path / "ho" / "images" / "val").glob("as_*")] == ["as_knockcat_0.jpg"]
    assert json.loads((tmp_path / "ho" / "counts.json").read_text())["awake_sleep_train"] == 2
