"""backend.geometry both ways (pixels <-> percent, YOLO <-> percent, rotation, clipping, IoU),
with values worked out by hand, and the EXIF-oriented frame the percents refer to."""

from __future__ import annotations

import numpy as np
import pytest

from backend.geometry import clamp, iou, percent_to_pixels, percent_to_yolo, pixels_to_percent, yolo_to_percent
from backend.images import decode_image
from tests.helpers_unit import jpeg_bytes

approx = pytest.approx


def test_clamp():
    assert clamp(-1, 0, 10) == 0
    assert clamp(11, 0, 10) == 10
    assert clamp(5, 0, 10) == 5


def test_pixels_to_percent_by_hand():
    # 640x480 image, box (64, 48)-(256, 240):
    # x = 64/640 = 10 %, y = 48/480 = 10 %, w = 192/640 = 30 %, h = 192/480 = 40 %
    v = pixels_to_percent(64, 48, 256, 240, 640, 480)
    assert v == approx({"x": 10.0, "y": 10.0, "width": 30.0, "height": 40.0, "rotation": 0.0})


def test_pixels_to_percent_swapped_corners_are_sorted():
    assert pixels_to_percent(256, 240, 64, 48, 640, 480) == approx(pixels_to_percent(64, 48, 256, 240, 640, 480))


def test_pixels_to_percent_clips_to_image():
    # box (-20, -10)-(120, 60) on a 100x50 image -> clipped to (0, 0)-(100, 50) = the whole image
    assert pixels_to_percent(-20, -10, 120, 60, 100, 50) == approx(
        {"x": 0.0, "y": 0.0, "width": 100.0, "height": 100.0, "rotation": 0.0})
    # only the right edge spills: (80, 10)-(130, 30) -> (80, 10)-(100, 30): x 80 %, w 20 %, y 20 %, h 40 %
    assert pixels_to_percent(80, 10, 130, 30, 100, 50) == approx(
        {"x": 80.0, "y": 20.0, "width": 20.0, "height": 40.0, "rotation": 0.0})
    # entirely outside -> zero size at the border
    v = pixels_to_percent(150, 10, 200, 20, 100, 50)
    assert v["x"] == 100.0 and v["width"] == 0.0


@pytest.mark.parametrize("w,h", [(0, 10), (10, 0), (-5, 10)])
def test_pixels_to_percent_rejects_bad_size(w, h):
    with pytest.raises(ValueError, match="positive"):
        pixels_to_percent(0, 0, 1, 1, w, h)


def test_percent_to_pixels_by_hand():
    # 10 %, 10 %, 30 %, 40 % of 640x480 -> (64, 48)-(64+192, 48+192)
    assert percent_to_pixels({"x": 10, "y": 10, "width": 30, "height": 40}, 640, 480) == approx((64, 48, 256, 240))


def test_pixels_percent_round_trip():
    box = (12.5, 7.0, 300.25, 199.0)
    v = pixels_to_percent(*box, 333, 222)
    assert percent_to_pixels(v, 333, 222) == approx(box)


def test_percent_to_pixels_rotation_90_clockwise():
    # 200x100 image; x=50 %, y=10 %, w=10 %, h=10 % -> top-left (100, 10), w 20 px, h 10 px.
    # Rotated 90° clockwise about the top-left corner (screen y points down):
    #   (0,0)->(100,10)  (20,0)->(100,30)  (20,10)->(90,30)  (0,10)->(90,10)
    # -> axis-aligned (90, 10)-(100, 30)
    v = {"x": 50, "y": 10, "width": 10, "height": 10, "rotation": 90}
    assert percent_to_pixels(v, 200, 100) == approx((90, 10, 100, 30))


def test_percent_to_pixels_rotation_45():
    # 100x100 image, 10x10 box at (50, 50) rotated 45°: corners (50,50), (50+7.071, 50+7.071),
    # (50+7.071-7.071, 50+7.071+7.071) = (50, 64.142), (50-7.071, 57.071)
    # -> (42.929, 50)-(57.071, 64.142)
    s = 10 * np.sqrt(0.5)
    v = {"x": 50, "y": 50, "width": 10, "height": 10, "rotation": 45}
    assert percent_to_pixels(v, 100, 100) == approx((50 - s, 50, 50 + s, 50 + 2 * s))


def test_percent_to_pixels_rotation_clipped():
    # 180° about (90, 90) of a 20x20 box: corners go to (70..90, 70..90); a 270° turn of a box
    # at the left edge goes out of the image and is clipped at x = 0.
    v = {"x": 90, "y": 90, "width": 20, "height": 20, "rotation": 180}
    assert percent_to_pixels(v, 100, 100) == approx((70, 70, 90, 90))
    # 270° clockwise about (5, 50): (20,0) -> (5, 30); (20,10) -> (15, 30); (0,10) -> (15, 50)
    v = {"x": 5, "y": 50, "width": 20, "height": 10, "rotation": 270}
    assert percent_to_pixels(v, 100, 100) == approx((5, 30, 15, 50))
    v = {"x": 5, "y": 50, "width": 20, "height": 10, "rotation": 90}
    # 90°: (20,0) -> (5, 70); (20,10) -> (-5, 70); (0,10) -> (-5, 50) -> x clipped to 0
    assert percent_to_pixels(v, 100, 100) == approx((0, 50, 5, 70))


def test_percent_to_pixels_missing_field():
    with pytest.raises(KeyError):
        percent_to_pixels({"x": 1, "y": 1, "width": 1}, 10, 10)
    with pytest.raises(ValueError):
        percent_to_pixels({"x": "a", "y": 1, "width": 1, "height": 1}, 10, 10)


def test_percent_to_yolo_by_hand():
    # x=10, y=20, w=30, h=40 (percent) -> cx = (10+15)/100 = 0.25, cy = (20+20)/100 = 0.4, w .3, h .4
    assert percent_to_yolo({"x": 10, "y": 20, "width": 30, "height": 40}) == approx((0.25, 0.4, 0.3, 0.4))


def test_yolo_to_percent_by_hand():
    # cx .5, cy .5, w .2, h .4 -> x = (.5-.1)*100 = 40, y = (.5-.2)*100 = 30, w 20, h 40
    assert yolo_to_percent(0.5, 0.5, 0.2, 0.4) == approx(
        {"x": 40.0, "y": 30.0, "width": 20.0, "height": 40.0, "rotation": 0.0})


def test_yolo_percent_round_trip():
    for box in [(0.25, 0.4, 0.3, 0.4), (0.5, 0.5, 1.0, 1.0), (0.1, 0.9, 0.05, 0.1)]:
        assert percent_to_yolo(yolo_to_percent(*box)) == approx(box)


def test_yolo_to_percent_clips():
    # cx .95, w .2 spills past the right edge: x1 = 85 %, x2 = 105 % -> 100 %, so w = 15 %
    v = yolo_to_percent(0.95, 0.5, 0.2, 0.2)
    assert v["x"] == approx(85.0) and v["width"] == approx(15.0)


def test_percent_to_yolo_rotation_uses_the_pixel_frame():
    # A rotation turns a box in pixels, so a non-square image needs its size. Same box as in
    # test_percent_to_pixels_rotation_90_clockwise: (90, 10)-(100, 30) of 200x100 px
    # -> cx = 95/200 = .475, cy = 20/100 = .2, w = 10/200 = .05, h = 20/100 = .2
    v = {"x": 50, "y": 10, "width": 10, "height": 10, "rotation": 90}
    assert percent_to_yolo(v, 200, 100) == approx((0.475, 0.2, 0.05, 0.2))
    # without rotation the size does not matter
    v0 = {"x": 10, "y": 20, "width": 30, "height": 40}
    assert percent_to_yolo(v0, 200, 100) == approx(percent_to_yolo(v0))


def test_iou_by_hand():
    a = (0, 0, 2, 2)
    assert iou(a, a) == approx(1.0)
    # (0,0)-(2,2) vs (1,1)-(3,3): inter 1, union 4 + 4 - 1 = 7
    assert iou(a, (1, 1, 3, 3)) == approx(1 / 7)
    # (0,0)-(2,2) vs (1,0)-(3,2): inter 2, union 6
    assert iou(a, (1, 0, 3, 2)) == approx(2 / 6)
    assert iou(a, (5, 5, 6, 6)) == 0.0
    assert iou(a, (2, 0, 4, 2)) == 0.0  # touching edges
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # degenerate: no division by zero
    # containment: (0,0)-(4,4) contains (1,1)-(3,3): inter 4, union 16
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == approx(0.25)
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == iou((1, 1, 3, 3), (0, 0, 4, 4))


# --- EXIF orientation ---------------------------------------------------------------------------
# The stored JPEG is 160x80 px (landscape) with a red block on stored pixels (0,0)-(40,20).
# Orientation 6 = "rotate 90° clockwise to display": displayed 80x160 (portrait), and the stored
# top-left corner goes to the displayed top-right: block at x 60..80, y 0..40.
# Orientation 8 = "rotate 90° counter-clockwise": stored top-left goes to bottom-left: x 0..20, y 120..160.


def _red_bbox(arr: np.ndarray) -> tuple[int, int, int, int]:
    red = (arr[..., 0] > 150) & (arr[..., 1] < 100) & (arr[..., 2] < 100)
    ys, xs = np.nonzero(red)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("orientation,expected_px,expected_pct", [
    (6, (60, 0, 80, 40), {"x": 75.0, "y": 0.0, "width": 25.0, "height": 25.0}),
    (8, (0, 120, 20, 160), {"x": 0.0, "y": 75.0, "width": 25.0, "height": 25.0}),
    (1, (0, 0, 40, 20), {"x": 0.0, "y": 0.0, "width": 25.0, "height": 25.0}),
])
def test_exif_rotated_image_uses_displayed_frame(orientation, expected_px, expected_pct):
    data = jpeg_bytes(160, 80, color=(0, 0, 200), orientation=orientation, marker=(0, 0, 40, 20))
    img = decode_image(data, max_pixels=10**8)
    if orientation == 1:
        assert (img.width, img.height) == (160, 80)
    else:
        assert (img.width, img.height) == (80, 160)  # displayed = transposed
    assert img.array.shape == (img.height, img.width, 3)
    bbox = _red_bbox(img.array)
    assert bbox == expected_px
    # a box drawn around the block in the displayed frame, in Label Studio's percents
    v = pixels_to_percent(*bbox, img.width, img.height)
    assert {k: v[k] for k in expected_pct} == approx(expected_pct)
    # and back to YOLO: the same block, normalised to the displayed frame
    cx, cy, w, h = percent_to_yolo(v)
    assert (w, h) == approx((20 / img.width, 40 / img.height) if orientation != 1 else (40 / 160, 20 / 80))
    assert (cx, cy) == approx(((bbox[0] + bbox[2]) / 2 / img.width, (bbox[1] + bbox[3]) / 2 / img.height))
