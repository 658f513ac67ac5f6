"""A PNG with a transparent band: what the detector gets under the transparent pixels, and no face
box there. A new user's trial: one false face box on such an image (the shipped detector boxes a
uniform band beside a face, whatever its colour, when the image is letterboxed tight)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from backend.geometry import iou
from backend.images import decode_image, drop_transparent
from facemodels.detector import Detection, ImageDetections
from tests.conftest import AWAKE_SLEEP, require_data
from tests.helpers_unit import jpeg_bytes, local_url, shipped_model_on_a_folder

MAX_PIXELS = 50_000_000


def _png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def _banded(face: np.ndarray, seed: int) -> np.ndarray:
    """``face`` (H, W, 3) on the left of an RGBA canvas twice as wide whose right half is random
    RGB noise under alpha 0 (what an editor leaves under erased pixels)."""
    h, w = face.shape[:2]
    canvas = np.random.default_rng(seed).integers(0, 256, (h, 2 * w, 4), dtype=np.uint8)
    canvas[:, :w, :3] = face
    canvas[:, :w, 3] = 255
    canvas[:, w:, 3] = 0
    return canvas


def test_transparent_pixels_are_white_and_the_alpha_is_kept_only_where_there_is_one():
    face = np.full((40, 30, 3), (200, 120, 40), np.uint8)
    img = decode_image(_png(_banded(face, 0), "RGBA"), MAX_PIXELS)
    assert (img.array[:, 30:] == 255).all()  # the noise under alpha 0 never reaches the detector
    assert (img.array[:, :30] == (200, 120, 40)).all()
    assert img.alpha is not None and (img.alpha[:, :30] == 255).all() and (img.alpha[:, 30:] == 0).all()
    # no alpha kept (and no work) for a JPEG, an RGB PNG, or an RGBA PNG opaque everywhere
    assert decode_image(jpeg_bytes(), MAX_PIXELS).alpha is None
    assert decode_image(_png(face, "RGB"), MAX_PIXELS).alpha is None
    opaque = np.dstack([face, np.full((40, 30), 255, np.uint8)])
    assert decode_image(_png(opaque, "RGBA"), MAX_PIXELS).alpha is None
    # a palette image with a transparent colour: its transparent pixels are found too
    pal = Image.new("P", (20, 10), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (10, 0, 20, 10))
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=1)
    img = decode_image(buf.getvalue(), MAX_PIXELS)
    assert (img.alpha[:, 10:] == 0).all() and (img.alpha[:, :10] == 255).all()
    assert (img.array[:, 10:] == 255).all() and (img.array[:, :10] == (255, 0, 0)).all()


def test_drop_transparent_keeps_boxes_at_least_half_visible():
    alpha = np.zeros((100, 200), np.uint8)
    alpha[:, :100] = 255

    def det(x1, x2):
        return Detection((x1, 10.0, x2, 90.0), 0.9, 0, np.array([0.9]), 0.9)

    d = ImageDetections(200, 100, [det(10, 90), det(110, 190), det(60, 130), det(40, 160)], np.ones(4))
    kept = drop_transparent(d, alpha)
    assert [x.box[0] for x in kept.detections] == [10, 60, 40]  # 100%, 57%, 50% visible; the 0% one dropped
    assert kept.embedding is d.embedding and len(d.detections) == 4  # the input is not changed
    assert drop_transparent(d, None) is d  # an image without transparency: untouched


def test_no_face_box_on_a_transparent_band_and_the_face_still_found(tmp_path):
    """A real face from ../shared/data pasted left on an RGBA canvas whose right half is random RGB
    noise under alpha 0, predicted one task at a time as Label Studio asks when a task opens: no
    box in the band, and the face box still there (IoU >= 0.5 with its ground truth)."""
    data = require_data(AWAKE_SLEEP)
    from backend.predict import predict_tasks

    root, settings, schema, model = shipped_model_on_a_folder(tmp_path)
    # two val images whose face the shipped model finds in the canvas (the 1st and 3rd; the 2nd it misses
    # with or without the band)
    names = ["agufsamudra_05feec546aad", "agufsamudra_2024f47e864f"]
    checked = 0
    for k, name in enumerate(names):
        path = data / "images" / "val" / f"{name}.jpg"
        if not path.exists():
            pytest.skip(f"{path} not found in ../shared/data")
        face = np.asarray(Image.open(path).convert("RGB"))
        h, w = face.shape[:2]
        (root / f"{name}.png").write_bytes(_png(_banded(face, k), "RGBA"))
        _, cx, cy, bw, bh = map(float, (data / "labels" / "val" / f"{name}.txt").read_text().split()[:5])
        truth = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
        (p,) = predict_tasks([{"id": k + 1, "data": {"image": local_url(f"{name}.png")}}], schema, model, settings)
        assert p.error is None and (p.width, p.height) == (2 * w, h)
        boxes = [(b.x1, b.y1, b.x2, b.y2) for b in p.boxes]
        in_band = [b for b in boxes if (b[0] + b[2]) / 2 >= w]
        assert not in_band, f"{name}: face boxes on the transparent band: {in_band}"
        assert any(iou(b, truth) >= 0.5 for b in boxes), f"{name}: face not found: {boxes} vs {truth}"
        checked += 1
    assert checked == len(names)
