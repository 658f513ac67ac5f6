"""Opaque plain bands (letterbox bars, a flat wall beside a face: white, ultralytics' grey 114, black)
get no face box, and no face is lost for it (backend.predict.drop_uniform; docs/detector.md)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from backend.geometry import iou
from backend.predict import MAX_FLAT_SHARE, drop_uniform, flat_share
from facemodels.detector import Detection, ImageDetections
from tests.conftest import AWAKE_SLEEP, require_data
from tests.helpers_unit import local_url, shipped_model_on_a_folder


def _det(box, conf=0.9):
    return Detection(tuple(float(v) for v in box), conf, 0, np.array([conf]), conf)


def test_drop_uniform_drops_flat_boxes_only():
    rng = np.random.default_rng(0)
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, :100] = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)  # texture (a face's place)
    img[:, 100:200] = 114                                                # a flat grey band
    img[:, 200:] = (114 + rng.integers(-3, 4, (100, 100, 1))).astype(np.uint8)  # JPEG-like noise on it
    d = ImageDetections(300, 100, [_det((10, 10, 90, 90)), _det((110, 10, 190, 90)), _det((210, 10, 290, 90)),
                                   _det((150, 10, 250, 90)), _det((95, 10, 190, 90)), _det((60, 10, 140, 90))],
                        np.ones(4))
    kept = drop_uniform(d, img)
    # kept: the textured box and the one half on texture; dropped: the flat, the noisy flat, the box
    # across both flat parts, and the band's box with a 5 px sliver of texture (5% of it)
    assert [x.box[0] for x in kept.detections] == [10, 60]
    assert len(d.detections) == 6 and kept.embedding is d.embedding  # the input is not changed
    assert drop_uniform(ImageDetections(300, 100, [], None), img).detections == []
    # a grey (H, W) image, boxes outside or on the image's edge, a large box read sparsely
    grey = np.full((2000, 3000), 255, np.uint8)
    grey[:, :1500] = rng.integers(0, 256, (2000, 1500), dtype=np.uint8)
    d = ImageDetections(3000, 2000, [_det((-50, -50, 1400, 1900)), _det((1600, 0, 3100, 2100)),
                                     _det((2999.5, 1999.5, 3000, 2000))], None)
    assert [x.box[0] for x in drop_uniform(d, grey).detections] == [-50]
    untouched = ImageDetections(3000, 2000, [_det((0, 0, 1400, 1900))], None)
    assert drop_uniform(untouched, grey) is untouched
    assert flat_share(grey, (1600, 0, 3000, 2000)) == 1.0 and flat_share(grey, (0, 0, 100, 100)) < 0.1


def test_no_labelled_face_is_flat():
    """Every labelled face of ../shared/data's awake_sleep val split is far from flat (measured
    maximum over all three data sets, train + val: 0.51 against MAX_FLAT_SHARE 0.9)."""
    data = require_data(AWAKE_SLEEP)
    flattest = 0.0
    for lp in sorted((data / "labels" / "val").glob("*.txt")):
        im = np.asarray(Image.open(data / "images" / "val" / f"{lp.stem}.jpg").convert("RGB"))
        h, w = im.shape[:2]
        for line in lp.read_text().splitlines():
            if line.strip():
                _, cx, cy, bw, bh = map(float, line.split()[:5])
                box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
                d = ImageDetections(w, h, [_det(box)], None)
                assert drop_uniform(d, im) is d, f"{lp.stem}: a labelled face would be dropped"
                flattest = max(flattest, flat_share(im, box))
    assert flattest <= MAX_FLAT_SHARE / 2, f"the flattest face has flat share {flattest:.2f}"


@pytest.mark.parametrize("colour", [0, 114, 255])
def test_no_face_box_on_a_plain_band_and_the_faces_still_found(tmp_path, monkeypatch, colour):
    """Real faces from ../shared/data beside an opaque band of their own size (JPEG, as a letterboxed
    photo arrives), predicted through predict_tasks as /predict and pool scoring do: no box in the
    band, and the same faces found as with the filter switched off (which boxes the black and grey
    bands: the test sees the filter at work)."""
    data = require_data(AWAKE_SLEEP)
    import backend.predict as bp

    root, settings, schema, model = shipped_model_on_a_folder(tmp_path)
    names = sorted(p.stem for p in (data / "images" / "val").glob("*.jpg"))[:12]
    assert len(names) == 12, "awake_sleep val has at least 12 images"
    tasks, truths, widths = [], [], []
    for k, name in enumerate(names):
        face = np.asarray(Image.open(data / "images" / "val" / f"{name}.jpg").convert("RGB"))
        h, w = face.shape[:2]
        canvas = np.full((h, 2 * w, 3), colour, np.uint8)
        canvas[:, :w] = face
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, "JPEG", quality=90)
        (root / f"{name}.jpg").write_bytes(buf.getvalue())
        _, cx, cy, bw, bh = map(float, (data / "labels" / "val" / f"{name}.txt").read_text().split()[:5])
        truths.append(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
        widths.append(w)
        tasks.append({"id": k + 1, "data": {"image": local_url(f"{name}.jpg")}})

    def run():
        found, in_band = 0, []
        for name, p, truth, w in zip(names, bp.predict_tasks(tasks, schema, model, settings), truths, widths):
            assert p.error is None
            boxes = [(b.x1, b.y1, b.x2, b.y2) for b in p.boxes]
            in_band += [(name, b) for b in boxes if (b[0] + b[2]) / 2 >= w]
            found += any(iou(b, truth) >= 0.5 for b in boxes)
        return found, in_band

    found, in_band = run()
    assert not in_band, f"face boxes on the band: {in_band}"
    monkeypatch.setattr(bp, "drop_uniform", lambda det, image: det)  # the filter off
    found_off, in_band_off = run()
    assert found == found_off and found >= 9, f"faces found {found} with the filter, {found_off} without"
    if colour in (0, 114):
        assert in_band_off, "without the filter the shipped model boxes a black or grey band"
