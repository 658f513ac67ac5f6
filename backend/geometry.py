"""Box conversions between pixels, YOLO's normalised centre boxes and Label Studio's percents.

Label Studio's RectangleLabels value: ``x``, ``y`` = top-left corner, ``width``, ``height``, all in
percent (0-100) of the image as displayed (after EXIF orientation), ``rotation`` in degrees
clockwise about the top-left corner (labelstud.io/tags/rectangle.html; LS ML-backend YOLO example
``control_models/rectangle_labels.py``). YOLO labels are ``cx cy w h`` normalised to 0-1.
"""

from __future__ import annotations

import math


def clamp(v: float, lo: float, hi: float) -> float:
    """Clamp ``v`` into ``[lo, hi]``."""
    return max(lo, min(hi, v))


def pixels_to_percent(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> dict[str, float]:
    """Pixel corners -> Label Studio value.

    Args:
        x1, y1, x2, y2: box corners in pixels (may spill outside the image; clipped).
        width, height: image size in pixels (EXIF-oriented).
    Returns: ``{"x","y","width","height","rotation"}``, percent 0-100 of the image, rotation 0.
    Raises: ValueError for a non-positive image size.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, x2 = clamp(min(x1, x2), 0, width), clamp(max(x1, x2), 0, width)
    y1, y2 = clamp(min(y1, y2), 0, height), clamp(max(y1, y2), 0, height)
    return {
        "x": x1 / width * 100.0,
        "y": y1 / height * 100.0,
        "width": (x2 - x1) / width * 100.0,
        "height": (y2 - y1) / height * 100.0,
        "rotation": 0.0,
    }


def percent_to_pixels(value: dict, width: int, height: int) -> tuple[float, float, float, float]:
    """Label Studio value -> axis-aligned pixel corners ``(x1, y1, x2, y2)``.

    A rotated rectangle (``rotation`` != 0, degrees clockwise about the top-left corner) becomes
    the axis-aligned box around its four corners, clipped to the image.

    Args:
        value: dict with ``x``, ``y``, ``width``, ``height`` in percent (0-100), optional ``rotation``.
        width, height: image size in pixels.
    Raises: KeyError/ValueError when a field is missing or not a number.
    """
    x = float(value["x"]) / 100.0 * width
    y = float(value["y"]) / 100.0 * height
    w = float(value["width"]) / 100.0 * width
    h = float(value["height"]) / 100.0 * height
    rot = float(value.get("rotation") or 0.0)
    if rot:
        a = math.radians(rot)
        ca, sa = math.cos(a), math.sin(a)
        pts = [(x + dx * ca - dy * sa, y + dx * sa + dy * ca) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    else:
        # a box drawn upward or leftward is stored with a negative width or height: same box
        x1, x2 = min(x, x + w), max(x, x + w)
        y1, y2 = min(y, y + h), max(y, y + h)
    return (clamp(x1, 0, width), clamp(y1, 0, height), clamp(x2, 0, width), clamp(y2, 0, height))


def percent_to_yolo(value: dict, width: float = 100, height: float = 100) -> tuple[float, float, float, float]:
    """Label Studio value (percent, top-left) -> YOLO ``(cx, cy, w, h)`` normalised 0-1.

    Args:
        value: as for :func:`percent_to_pixels`.
        width, height: image size in pixels (the region's ``original_width/height``). Only a
            rotated box needs it (a rotation turns the box in pixels, which is not the same as
            turning it in percents unless the image is square); the default 100x100 is exact for
            unrotated boxes.
    """
    width = float(width or 100)
    height = float(height or 100)
    x1, y1, x2, y2 = percent_to_pixels(value, width, height)
    return ((x1 + x2) / 2.0 / width, (y1 + y2) / 2.0 / height, (x2 - x1) / width, (y2 - y1) / height)


def yolo_to_percent(cx: float, cy: float, w: float, h: float) -> dict[str, float]:
    """YOLO normalised centre box -> Label Studio value (``x = (cx - w/2) * 100``, ...)."""
    return pixels_to_percent((cx - w / 2) * 100, (cy - h / 2) * 100, (cx + w / 2) * 100, (cy + h / 2) * 100, 100, 100)


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes in the same units (0-1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
