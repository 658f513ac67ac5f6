"""ONNX Runtime inference (issue 12): export of a version, the same boxes and classes as the torch
path on real images, and the torch fallback."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from backend.config import DEFAULT_MODEL_PATH
from backend.hashing import file_sha256
from facemodels import onnx_runtime as ox
from facemodels.two_stage import TwoStageModel, read_bundle, write_bundle
from tests.conftest import AWAKE_SLEEP, SHARED_DATA, require_data


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """A version folder written as the worker writes one: the shipped default's weights, exported."""
    b = read_bundle(DEFAULT_MODEL_PATH)
    folder = tmp_path_factory.mktemp("store") / "p1-v1"
    path = write_bundle(folder, b["detector_path"], b["classifier_path"], b["classes"], imgsz=256,
                        nms_iou=b["nms_iou"], face_threshold=b["face_threshold"])
    return path


@pytest.fixture(autouse=True)
def var_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VAR_DIR", str(tmp_path / "var"))  # the lazy export cache goes there
    monkeypatch.delenv("INFERENCE_BACKEND", raising=False)
    monkeypatch.delenv("INFERENCE_THREADS", raising=False)
    monkeypatch.delenv("INFERENCE_CLASSIFIER_THREADS", raising=False)


def test_a_written_version_holds_both_onnx_files_with_their_sha256(version):
    b = json.loads(version.read_text())
    for key in ("detector", "classifier"):
        f = version.parent / b[f"{key}_onnx"]
        assert f.suffix == ".onnx" and f.is_file()
        assert file_sha256(f) == b[f"{key}_onnx_sha256"]
        assert ox._metadata(f)[ox.SOURCE_KEY] == b[f"{key}_sha256"]  # exported from these very weights
    m = TwoStageModel(version)
    assert m.backend == "onnx"
    assert m.names == b["classes"] and m.detector.nms_iou == b["nms_iou"]
    assert m.detector.threads == len(__import__("os").sched_getaffinity(0))


def test_registering_a_candidate_copies_its_export_instead_of_exporting_again(version, tmp_path):
    b = json.loads(version.read_text())
    again = write_bundle(tmp_path / "p1-v2", version.parent / "detector.pt", version.parent / "classifier.pt",
                         b["classes"], imgsz=256)
    b2 = json.loads(again.read_text())
    assert b2["detector_onnx_sha256"] == b["detector_onnx_sha256"]
    assert b2["classifier_onnx_sha256"] == b["classifier_onnx_sha256"]


def _load(paths):
    from backend.images import decode_image

    return [decode_image(p.read_bytes(), max_pixels=50_000_000).array for p in paths]


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("dataset", ["awake_sleep", "expressions"])
def test_onnx_and_torch_give_the_same_faces_and_classes(version, dataset):
    folder = require_data(SHARED_DATA / dataset)
    files = sorted((folder / "images" / "val").glob("*.jpg"))[:12]
    images = _load(files)
    onnx_m, torch_m = TwoStageModel(version, backend="onnx"), TwoStageModel(version, backend="torch")
    assert (onnx_m.backend, torch_m.backend) == ("onnx", "torch")
    # one image at a time (a single-task /predict), and all in one batch (bulk /predict, pool scoring)
    for batch in (1, 16):
        a = onnx_m.detect(images, conf=0.1, imgsz=256, batch=batch, embed=True)
        t = torch_m.detect(images, conf=0.1, imgsz=256, batch=batch, embed=True)
        n = 0
        for x, y in zip(a, t):
            assert (x.width, x.height) == (y.width, y.height)
            assert len(x.detections) == len(y.detections)
            for p, q in zip(x.detections, y.detections):
                assert _iou(p.box, q.box) >= 0.99
                assert np.abs(np.subtract(p.box, q.box)).max() <= 1.0  # pixels
                assert p.face_conf == pytest.approx(q.face_conf, abs=2e-3)
                assert np.abs(p.class_scores - q.class_scores).max() <= 2e-3
                assert p.cls == q.cls or abs(np.sort(q.class_scores)[-1] - np.sort(q.class_scores)[-2]) < 4e-3
                n += 1
            assert float(x.embedding @ y.embedding) >= 0.9999
        assert n >= len(files) // 2, "too few faces found to compare"


def test_numpy_nms_keeps_exactly_what_ultralytics_nms_keeps(version):
    """The ONNX path's NumPy NMS (issue 12: 0.1 ms instead of torch's per-operation overhead) keeps
    the same anchors, in the same order, with the same rows as ultralytics' ``non_max_suppression``
    on the detector's real outputs, at a low and a usual confidence, one image and a batch."""
    import torch
    from ultralytics.utils import nms

    folder = require_data(AWAKE_SLEEP)
    files = sorted((folder / "images" / "val").glob("*.jpg"))[:24]
    m = TwoStageModel(version, backend="onnx")
    det = m.detector
    kept = 0
    for chunk in ([im] for im in _load(files)):
        raw = det.session.run(["output0"], {"images": det._letterbox(chunk, 256)})[0]
        for conf, iou in ((0.01, det.nms_iou), (0.25, 0.45)):
            want, want_idx = nms.non_max_suppression(torch.from_numpy(raw.copy()), conf, iou, None, True,
                                                     max_det=det.max_det, return_idxs=True)
            got = ox.nms_numpy(raw, conf, iou, det.max_det)
            assert len(got) == len(want)
            for (d, idx), w, wi in zip(got, want, want_idx):
                assert np.array_equal(idx, wi.view(-1).long().numpy())
                assert np.array_equal(d, w.numpy())
                kept += len(d)
    batch = np.concatenate([det.session.run(["output0"], {"images": det._letterbox([im], 256)})[0]
                            for im in _load(files[:4]) if im.shape == _load(files[:1])[0].shape])
    want, want_idx = nms.non_max_suppression(torch.from_numpy(batch.copy()), 0.01, det.nms_iou, None, True,
                                             max_det=det.max_det, return_idxs=True)
    for (d, idx), w, wi in zip(ox.nms_numpy(batch, 0.01, det.nms_iou, det.max_det), want, want_idx):
        assert np.array_equal(idx, wi.view(-1).long().numpy()) and np.array_equal(d, w.numpy())
    assert kept >= len(files), "too few boxes kept to compare"
    empty = ox.nms_numpy(np.zeros((1, 5, 10), np.float32), 0.01, 0.7)
    assert empty[0][0].shape == (0, 6) and empty[0][1].shape == (0,)


def test_the_classifier_alone_matches_on_ground_truth_faces(version):
    from facemodels.classifier import FaceClassifier

    folder = require_data(AWAKE_SLEEP)
    files = sorted((folder / "images" / "val").glob("*.jpg"))[:8]
    items = []
    for img, f in zip(_load(files), files):
        rows = np.loadtxt(folder / "labels" / "val" / (f.stem + ".txt"), ndmin=2)
        h, w = img.shape[:2]
        xyxy = np.stack([(rows[:, 1] - rows[:, 3] / 2) * w, (rows[:, 2] - rows[:, 4] / 2) * h,
                         (rows[:, 1] + rows[:, 3] / 2) * w, (rows[:, 2] + rows[:, 4] / 2) * h], 1)
        items.append((img, xyxy))
    b = json.loads(version.read_text())
    o = ox.OnnxClassifier(version.parent / b["classifier_onnx"])
    t = FaceClassifier.load(version.parent / "classifier.pt")
    assert o.classes == t.classes and o.crop_margin == t.crop_margin
    for po, pt in zip(o.predict_proba_many(items), t.predict_proba_many(items)):
        assert np.abs(po - pt).max() <= 1e-3
    for eo, et in zip(o.embed_many(items), t.embed_many(items)):
        assert np.abs(eo - et).max() <= 1e-3
    with pytest.raises(ValueError, match="zero or negative width"):
        o.predict_proba(items[0][0], [[10, 10, 5, 20]])


def test_inference_backend_setting(monkeypatch, version):
    monkeypatch.setenv("INFERENCE_BACKEND", "torch")
    assert TwoStageModel(version).backend == "torch"
    monkeypatch.setenv("INFERENCE_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="INFERENCE_BACKEND must be one of"):
        TwoStageModel(version)
    monkeypatch.setenv("INFERENCE_BACKEND", "onnx")
    monkeypatch.setenv("INFERENCE_THREADS", "1")
    assert TwoStageModel(version).detector.threads == 1
    monkeypatch.setenv("INFERENCE_THREADS", "zero")
    with pytest.raises(ValueError, match="INFERENCE_THREADS"):
        ox.intra_op_threads()


def test_the_classifier_runs_on_one_thread_unless_told(monkeypatch, version):
    """One face is too small a pass to split (docs/benchmarks.md, run 10): one intra-op thread by
    default, whatever the detector uses; INFERENCE_CLASSIFIER_THREADS overrides it."""
    def threads(m):
        return int(m.classifier.session.get_session_options().intra_op_num_threads)

    assert threads(TwoStageModel(version)) == 1
    monkeypatch.setenv("INFERENCE_CLASSIFIER_THREADS", "2")
    assert threads(TwoStageModel(version)) == 2
    monkeypatch.setenv("INFERENCE_CLASSIFIER_THREADS", "-1")
    with pytest.raises(ValueError, match="INFERENCE_CLASSIFIER_THREADS"):
        ox.classifier_threads()


def test_letterbox_is_bitwise_ultralytics_letterbox():
    """The detector's input is ultralytics' LetterBox (rectangular for a batch of one shape, square
    for mixed shapes; padding 114) then / 255, to the bit, on real photos and odd shapes."""
    from PIL import Image
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.checks import check_imgsz

    def reference(images, imgsz, stride=32):
        lb = LetterBox(check_imgsz(imgsz, stride=stride, min_dim=2), auto=len({i.shape for i in images}) == 1,
                       stride=stride)
        x = np.stack([lb(image=im) for im in images])
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for h, w in [(1, 1), (1, 500), (500, 1), (3, 7), (255, 256), (640, 480), (480, 640), (1000, 37), (97, 389)]]
    if SHARED_DATA.is_dir():
        images += [np.asarray(Image.open(f).convert("RGB"))
                   for f in sorted((AWAKE_SLEEP / "images" / "val").glob("*.jpg"))[:8]]
    det = ox.OnnxDetector.__new__(ox.OnnxDetector)
    det.stride = 32
    for imgsz in (256, 320, 640):
        batches = [[im] for im in images] + [images[:4], [images[5]] * 3]
        for batch in batches:
            want, got = reference(batch, imgsz), det._letterbox(batch, imgsz)
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (imgsz, [b.shape for b in batch])


def test_spinning_setting_gives_the_same_outputs(monkeypatch, version):
    """INFERENCE_SPINNING=1 (spin during a run, stop when it returns) changes speed, not results."""
    monkeypatch.setenv("INFERENCE_SPINNING", "yes")
    assert ox.inference_spinning()
    b = json.loads(version.read_text())
    det = version.parent / b["detector_onnx"]
    x = np.random.default_rng(0).random((1, 3, 192, 256), dtype=np.float32)
    spun, still = ox.make_session(det, 2), ox.make_session(det, 2, spinning=False)
    assert still.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert spun.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    np.testing.assert_allclose(spun.run(["output0"], {"images": x})[0], still.run(["output0"], {"images": x})[0],
                               rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("INFERENCE_SPINNING", "fast")
    with pytest.raises(ValueError, match="INFERENCE_SPINNING"):
        ox.inference_spinning()
    monkeypatch.delenv("INFERENCE_SPINNING")
    assert not ox.inference_spinning()


def test_a_broken_onnx_file_falls_back_to_torch_with_a_warning(version, tmp_path, caplog):
    folder = tmp_path / "broken"
    shutil.copytree(version.parent, folder)
    (folder / "detector.onnx").write_bytes(b"not an onnx file")
    b = json.loads((folder / "bundle.json").read_text())
    b["detector_onnx_sha256"] = file_sha256(folder / "detector.onnx")  # recorded, yet unreadable
    (folder / "bundle.json").write_text(json.dumps(b))
    with caplog.at_level(logging.WARNING, logger="faceloop.models"):
        m = TwoStageModel(folder / "bundle.json")
    assert m.backend == "torch"
    assert "serving it with torch" in caplog.text


def test_a_stale_or_missing_export_is_made_again_in_the_cache(version, tmp_path):
    folder = tmp_path / "stale"
    shutil.copytree(version.parent, folder)
    (folder / "classifier.onnx").unlink()  # e.g. a version written before ONNX export
    m = TwoStageModel(folder / "bundle.json")
    assert m.backend == "onnx"
    assert ox.cache_dir() in __import__("pathlib").Path(m.classifier.path).parents
    assert ox._metadata(m.classifier.path)[ox.SOURCE_KEY] == file_sha256(folder / "classifier.pt")


def test_the_classifier_export_has_its_paddings_in_its_convolutions(version):
    """Export format 2: no Pad node left (each TF 'same' padding is in its Conv's pads), the same
    outputs as the plain TorchScript export within 1e-5, and 16 paddings merged."""
    import onnx
    import torch

    from facemodels.classifier import FaceClassifier

    b = json.loads(version.read_text())
    f = version.parent / b["classifier_onnx"]
    meta = ox._metadata(f)
    assert meta[ox.FORMAT_KEY] == "2"
    graph = onnx.load(str(f)).graph
    assert not [n for n in graph.node if n.op_type == "Pad"]
    assert sum(any(a.name == "pads" and list(a.ints) in ([0, 0, 1, 1],) for a in n.attribute)
               for n in graph.node if n.op_type == "Conv") >= 1  # the stride-2 'same' paddings: 0 before, 1 after
    clf = FaceClassifier.load(version.parent / "classifier.pt")
    x = np.random.default_rng(0).normal(0, 0.3, (5, 3, clf.input_size, clf.input_size)).astype(np.float32)
    with torch.no_grad():
        f_t = clf.net.eval().features(torch.from_numpy(x))
        p_t = torch.softmax(clf.net.fc(f_t), dim=1).numpy()
    probs, feats = ox.make_session(f, 1).run(["probs", "features"], {"input": x})
    assert np.abs(probs - p_t).max() <= 1e-5
    assert np.abs(feats - torch.nn.functional.normalize(f_t, dim=1).numpy()).max() <= 1e-5


def test_a_classifier_export_of_an_older_format_is_made_again(version, tmp_path, caplog):
    """A version written before export format 2 (its recorded classifier.onnx carries no format) is
    served from a fresh export in the cache; a candidate's old export is not copied either."""
    import onnx

    folder = tmp_path / "old-format"
    shutil.copytree(version.parent, folder)
    model = onnx.load(str(folder / "classifier.onnx"))
    props = {p.key: p.value for p in model.metadata_props if p.key != ox.FORMAT_KEY}
    del model.metadata_props[:]
    ox._set_metadata(model, props)
    (folder / "classifier.onnx").write_bytes(model.SerializeToString())
    b = json.loads((folder / "bundle.json").read_text())
    b["classifier_onnx_sha256"] = file_sha256(folder / "classifier.onnx")
    (folder / "bundle.json").write_text(json.dumps(b))
    assert ox.reusable_onnx(folder, "classifier", b["classifier_sha256"]) is None
    assert ox.reusable_onnx(folder, "detector", b["detector_sha256"]) == folder / "detector.onnx"
    with caplog.at_level(logging.INFO, logger="faceloop.onnx"):
        m = TwoStageModel(folder / "bundle.json")
    assert m.backend == "onnx" and "older export format" in caplog.text
    assert ox.cache_dir() in __import__("pathlib").Path(m.classifier.path).parents
    assert ox._metadata(m.classifier.path)[ox.FORMAT_KEY] == "2"
    assert m.detector.path == str((folder / "detector.onnx").resolve())  # the detector's format did not change


def test_classifying_only_the_faces_a_prediction_uses_changes_no_prediction(version, tmp_path):
    """predict_tasks classifies the shown faces and each image's best candidate only
    (``classify_min_conf``); boxes, labels, scores and uncertainty are those of classifying all."""
    from backend.labels import ProjectSchema
    from backend.predict import analyse
    from tests.conftest import REPO

    folder = require_data(AWAKE_SLEEP)  # scenes: several candidates an image
    images = _load(sorted((folder / "images" / "val").glob("*.jpg"))[:16])
    schema = ProjectSchema.parse((REPO / "label_config" / "face_expressions.xml").read_text())  # classes map
    m = TwoStageModel(version)
    for thr in (0.5, 0.99):  # 0.99: most images have no shown face, only their best candidate counts
        full = m.detect(images, conf=0.01, imgsz=256)
        part = m.detect(images, conf=0.01, imgsz=256, classify_min_conf=thr)
        unclassified = [x for d in part for x in d.detections[1:] if x.face_conf < thr]
        assert unclassified and all(np.ptp(x.class_scores) == 0 for x in unclassified)
        for a, b in zip(full, part):
            boxes_a, unc_a = analyse(a, schema, m.names, thr, "max")
            boxes_b, unc_b = analyse(b, schema, m.names, thr, "max")
            assert boxes_a == boxes_b
            assert unc_a == unc_b
