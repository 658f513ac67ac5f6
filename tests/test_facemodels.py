"""facemodels: the face-api.js expression net port, its preprocessing and the FaceClassifier API."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from facemodels.classifier import (FACEAPI_CLASSES, FaceClassifier, canonical_class,  # noqa: E402
                                   default_classifier_path, fine_tune)
from facemodels.preprocess import (crop_region, face_batch, resize_bilinear_tf_legacy,  # noqa: E402
                                   square_padding)
from tests.conftest import SHARED_DATA  # noqa: E402
from tests.helpers_unit import synthetic_face_crops

FIXTURE = Path(__file__).parent / "fixtures" / "faceapi_parity.json"


@pytest.fixture(scope="module")
def clf() -> FaceClassifier:
    return FaceClassifier.load(default_classifier_path())


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)


def test_converted_weights_load_with_provenance(clf):
    assert clf.classes == FACEAPI_CLASSES
    assert sum(p.numel() for p in clf.net.parameters()) == 323_687
    src = clf.meta["source"]
    assert (src["package"], src["version"], src["licence"]) == ("@vladmandic/face-api", "1.7.15", "MIT")
    info = json.loads(default_classifier_path().with_suffix(".json").read_text())
    assert info["sha256"] == hashlib.sha256(default_classifier_path().read_bytes()).hexdigest()


def test_probabilities_and_embeddings_shapes(clf, image):
    boxes = np.array([[10, 10, 60, 80], [50.5, 20.2, 150.7, 110.9], [0, 0, 160, 120]])
    p = clf.predict_proba(image, boxes)
    assert p.shape == (3, 7) and p.dtype == np.float32
    assert np.all(p >= 0) and np.allclose(p.sum(1), 1, atol=1e-5)
    e = clf.embed(image, boxes)
    assert e.shape == (3, 256) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert clf.predict_proba(image, np.zeros((0, 4))).shape == (0, 7)
    # batched over images == one image at a time
    many = clf.predict_proba_many([(image, boxes[:1]), (image[:, ::-1].copy(), boxes[1:])])
    assert np.allclose(many[0], p[:1], atol=1e-6) and many[1].shape == (2, 7)


def test_tf_legacy_bilinear_resize_hand_computed():
    # 2x2 -> 3x3, align_corners=False, half_pixel_centers=False: source coordinate = dst * 2/3,
    # neighbours floor and min(floor+1, 1): x at 0, 2/3, 4/3 -> [0, 6.667, 10] on row 0 ...
    img = np.array([[0, 10], [20, 30]], dtype=np.float32)[:, :, None]
    got = resize_bilinear_tf_legacy(img, 3)[:, :, 0]
    want = np.array([[0, 20 / 3, 10], [40 / 3, 20, 70 / 3], [20, 80 / 3, 30]], dtype=np.float32)
    assert np.allclose(got, want, atol=1e-5)
    # torch's default bilinear (half-pixel centres) differs: the port must not use it
    t = torch.nn.functional.interpolate(torch.from_numpy(img[:, :, 0])[None, None], size=3, mode="bilinear",
                                        align_corners=False)[0, 0].numpy()
    assert not np.allclose(t, want, atol=1e-3)


def test_pad_to_square_rounds_halves_up_like_javascript():
    # diff 5: JS Math.round(2.5) = 3 pixels after (bottom/right), 2 before; Python's round() would give 2
    assert square_padding(10, 5) == (0, 0, 2, 3)
    assert square_padding(5, 10) == (2, 3, 0, 0)
    assert square_padding(4, 7) == (1, 2, 0, 0)  # diff 3: Math.round(1.5) = 2 after
    assert square_padding(6, 6) == (0, 0, 0, 0)


def test_parity_with_tfjs_reference():
    """Probabilities of the JS package in Node (tfjs 4.22 wasm) on crops of shared images, < 1e-3."""
    ref = json.loads(FIXTURE.read_text())
    from PIL import Image

    if not (SHARED_DATA / ref["crops"][0]["image"]).exists():
        pytest.skip(f"shared images for the parity fixture not found under {SHARED_DATA}")
    clf = FaceClassifier.load(default_classifier_path())
    clf.crop_margin = 0.0  # face-api crops the box itself (the shipped model serves with a margin)
    diffs = []
    for c in ref["crops"]:
        im = np.asarray(Image.open(SHARED_DATA / c["image"]).convert("RGB"))
        p = clf.predict_proba(im, np.array([c["box"]], dtype=float))[0]
        diffs.append(np.abs(p - np.array(c["probs"])).max())
    assert max(diffs) < 1e-3, diffs


def test_fine_tune_grows_the_head_and_keeps_known_rows(clf):
    classes = ["sleep", "Happy"]
    # epochs=0: only the head rebuild; 'Happy' keeps face-api's 'happy' row, 'sleep' is new
    m0, met0 = fine_tune(clf, synthetic_face_crops(), classes, epochs=0)
    assert m0.classes == classes and m0.net.fc.out_features == 2 and met0["kept_classes"] == ["Happy"]
    assert torch.equal(m0.net.fc.weight[1], clf.net.fc.weight[1])
    assert clf.net.fc.out_features == 7  # init untouched
    seen = []
    m, met = fine_tune(clf, synthetic_face_crops(), classes, epochs=2, seed=1, val=synthetic_face_crops(4, 1),
                       on_epoch=lambda e, n, loss: seen.append((e, n)))
    assert seen == [(1, 2), (2, 2)] and len(met["loss"]) == 2 and 0 <= met["val_accuracy"] <= 1
    p = m.predict_proba(*synthetic_face_crops(1)[0][:2])
    assert p.shape == (1, 2) and np.isclose(p.sum(), 1, atol=1e-5)
    with pytest.raises(ValueError, match="class index"):
        fine_tune(clf, [(synthetic_face_crops(1)[0][0], np.array([1, 1, 9, 9]), 5)], classes, epochs=1)
    with pytest.raises(ValueError, match="unknown fine_tune settings"):
        fine_tune(clf, synthetic_face_crops(), classes, epochs=1, lr_typo=1)


def test_save_load_round_trip(clf, image, tmp_path):
    m, _ = fine_tune(clf, synthetic_face_crops(), ["awake", "sleep"], epochs=1)
    path = tmp_path / "v1" / "clf.pt"
    m.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["clf.pt"]  # no temporary file left behind
    back = FaceClassifier.load(path)
    assert back.classes == ["awake", "sleep"] and back.crop_margin == m.crop_margin
    assert back.meta["fine_tune"]["n_train"] == 6
    boxes = np.array([[10, 10, 90, 100]])
    assert np.allclose(back.predict_proba(image, boxes), m.predict_proba(image, boxes), atol=1e-6)
    with pytest.raises(FileNotFoundError):
        FaceClassifier.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError):
        FaceClassifier.load(tmp_path / "junk.pt")


def test_bad_boxes_raise_and_partly_outside_boxes_are_clipped(clf, image):
    for bad, msg in [([[10, 10, 10, 50]], "zero or negative"), ([[50, 10, 20, 60]], "zero or negative"),
                     ([[10, 60, 50, 20]], "zero or negative"), ([[200, 10, 260, 60]], "outside"),
                     ([[-50, -50, -10, -10]], "outside"), ([[np.nan, 0, 10, 10]], "NaN"), ([[1, 2, 3]], "shape")]:
        with pytest.raises(ValueError, match=msg):
            clf.predict_proba(image, np.array(bad, dtype=float))
    # a box partly outside the image is clipped at the borders: same crop as the clipped box
    assert crop_region([-20, -10, 50, 40], (120, 160)) == (0, 0, 50, 40)
    plain = FaceClassifier(clf.net, clf.classes, crop_margin=0.0)
    assert np.allclose(plain.predict_proba(image, [[-20, -10, 50, 40]]), plain.predict_proba(image, [[0, 0, 50, 40]]))
    with pytest.raises(ValueError, match="uint8"):
        clf.predict_proba(image.astype(np.float32), [[0, 0, 10, 10]])
    assert face_batch(image, [[0, 0, 10, 10]]).shape == (1, 3, 112, 112)


def test_classes_are_mapped_by_name(clf):
    assert canonical_class("Fearful") == canonical_class("fear") == "fear"
    assert clf.class_columns(["fear", "Happy", "surprise", "disgust", "sleep"]) == [4, 1, 6, 5, None]


def test_fine_tune_with_a_class_without_crops_and_one_crop_per_class(clf):
    one = synthetic_face_crops(2)  # one crop of class 0, one of class 1
    m, met = fine_tune(clf, one, ["awake", "sleep", "yawn"], epochs=1)
    assert np.isfinite(met["loss"]).all()
    p = m.predict_proba(*one[0][:2])
    assert p.shape == (1, 3) and p[0, 2] < 0.01  # 'yawn' has no crop: not predicted


def test_fine_tune_optional_recipe_settings(clf):
    """The options tried in docs/classifier.md (off in the recipe) run and change the result; with
    swa_epochs=1 the averaged weights are the last epoch's."""
    s = synthetic_face_crops(6)
    base, _ = fine_tune(clf, s, ["awake", "sleep"], epochs=2, seed=0)
    swa1, _ = fine_tune(clf, s, ["awake", "sleep"], epochs=2, seed=0, swa_epochs=1)
    for a, b in zip(base.net.parameters(), swa1.net.parameters()):
        assert torch.allclose(a, b)
    for over in ({"balanced": True}, {"grayscale": 1.0}, {"rotate": 20.0}, {"swa_epochs": 2}, {"head_epochs": 1}):
        m, met = fine_tune(clf, s, ["awake", "sleep"], epochs=2, seed=0, **over)
        assert np.isfinite(met["loss"]).all() and met["recipe"][next(iter(over))] == next(iter(over.values()))
        assert any(not torch.allclose(a, b) for a, b in zip(base.net.parameters(), m.net.parameters())), over
