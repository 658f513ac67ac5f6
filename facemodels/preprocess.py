"""Face-crop preprocessing of face-api.js, reproduced exactly.

face-api.js (``src/dom/NetInput.ts::toBatchTensor(112, true)``, ``src/ops/padToSquare.ts``,
``src/faceFeatureExtractor/FaceFeatureExtractor.ts``) turns a face crop into the net's input by

1. padding the crop with zeros to a square, centred: the *after* side (bottom/right) gets
   ``Math.round(diff / 2)`` pixels (JavaScript rounds halves up), the *before* side the rest;
2. resizing to 112x112 with ``tf.image.resizeBilinear(..., alignCorners=false,
   halfPixelCenters=false)``: TF's legacy bilinear resize, source coordinate ``dst * in / out``
   (no half-pixel centres, unlike ``torch.nn.functional.interpolate``);
3. subtracting the RGB means 122.782 / 117.001 / 104.298 and dividing by 255.

Boxes are ``x1, y1, x2, y2`` in pixels of the (H, W, 3) uint8 RGB image. Before cropping, a box
is grown by ``margin`` (a fraction of its width/height, on each side), rounded to whole pixels
and clipped at the image borders (as face-api's ``extractFaceTensors`` clips). A box that is not
finite, has zero or negative width/height, or lies entirely outside the image raises ValueError.
"""

from __future__ import annotations

import numpy as np

#: RGB means subtracted by face-api.js (``FaceFeatureExtractor.forwardInput``).
MEAN_RGB = np.array([122.782, 117.001, 104.298], dtype=np.float32)
#: Side of the network input in pixels.
INPUT_SIZE = 112


def check_image(image: np.ndarray) -> np.ndarray:
    """Return ``image`` if it is an (H, W, 3) uint8 array, else raise ValueError."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an (H, W, 3) RGB array, got {getattr(image, 'shape', type(image))}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0-255), got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: {image.shape}")
    return image


def check_boxes(boxes) -> np.ndarray:
    """(n, 4) float64 array of x1, y1, x2, y2 pixels; ValueError for bad shape/values."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if b.ndim == 1 and b.size == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4) as x1, y1, x2, y2 pixels, got {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    bad = np.flatnonzero((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
    if bad.size:
        raise ValueError(f"box {int(bad[0])} has zero or negative width/height: {b[bad[0]].tolist()} "
                         "(expected x1 < x2 and y1 < y2 in pixels)")
    return b


def crop_region(box, image_hw: tuple[int, int], margin: float = 0.0) -> tuple[int, int, int, int]:
    """Integer crop ``(x1, y1, x2, y2)`` (end exclusive) of one box grown by ``margin`` and clipped.

    ``margin``: fraction of the box's width (height) added on the left and right (top and bottom).
    Coordinates are rounded half up to whole pixels. ValueError if nothing of the box is inside.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    x1, x2 = x1 - margin * w, x2 + margin * w
    y1, y2 = y1 - margin * h, y2 + margin * h
    H, W = image_hw
    ix1, iy1 = max(int(np.floor(x1 + 0.5)), 0), max(int(np.floor(y1 + 0.5)), 0)
    ix2, iy2 = min(int(np.floor(x2 + 0.5)), W), min(int(np.floor(y2 + 0.5)), H)
    if ix2 <= ix1 or iy2 <= iy1:
        raise ValueError(f"box {list(map(float, box))} lies outside the {W}x{H} image (or rounds to no pixel)")
    return ix1, iy1, ix2, iy2


def square_padding(h: int, w: int) -> tuple[int, int, int, int]:
    """face-api's centred ``padToSquare``: (top, bottom, left, right) zero padding in pixels."""
    diff = abs(h - w)
    after = int(np.floor(diff * 0.5 + 0.5))  # JS Math.round: halves round up
    before = diff - after
    if h > w:
        return 0, 0, before, after
    return before, after, 0, 0


def _legacy_axis(size_in: int, size_out: int):
    """TF legacy (align_corners=False, half_pixel_centers=False) source indices and weights."""
    scale = size_in / size_out
    src = np.arange(size_out, dtype=np.float64) * scale
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear_tf_legacy(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``tf.image.resizeBilinear(img, size, alignCorners=false, halfPixelCenters=false)``.

    ``img``: (H, W, C) array; returns (h, w, C) float32. Source coordinate of output pixel ``i`` is
    ``i * H / h`` (top-left aligned, no half-pixel offset); neighbours ``floor`` and
    ``min(floor + 1, H - 1)``; interpolated along x first, then y, as TF's kernel does.
    """
    oh, ow = (size, size) if isinstance(size, int) else size
    x = np.asarray(img, dtype=np.float32)
    h, w, c = x.shape
    r0, r1, fy = _legacy_axis(h, oh)
    c0, c1, fx = _legacy_axis(w, ow)
    # gather on the (H, W*C) view: each source row once, columns as flat indices (the same
    # arithmetic as indexing (H, W, C), about twice as fast)
    ch = np.arange(c)
    i0, i1 = (c0[:, None] * c + ch).ravel(), (c1[:, None] * c + ch).ravel()
    fx = np.repeat(fx, c)[None, :]
    flat = x.reshape(h, w * c)
    rows0, rows1 = flat[r0], flat[r1]
    a, b = rows0[:, i0], rows1[:, i0]
    top = a + (rows0[:, i1] - a) * fx
    bottom = b + (rows1[:, i1] - b) * fx
    return (top + (bottom - top) * fy[:, None]).reshape(oh, ow, c)


def face_input(image: np.ndarray, box, margin: float = 0.0, size: int = INPUT_SIZE) -> np.ndarray:
    """One box -> (size, size, 3) float32 network input (crop, pad to square, resize, normalise)."""
    x1, y1, x2, y2 = crop_region(box, image.shape[:2], margin)
    crop = image[y1:y2, x1:x2]
    t, b, l, r = square_padding(*crop.shape[:2])
    if t or b or l or r:  # zeros; padded as uint8 (exact) and made float32 by the resize or below
        crop = np.pad(crop, ((t, b), (l, r), (0, 0)))
    if crop.shape[0] != size:
        crop = resize_bilinear_tf_legacy(crop, size)
    return (crop.astype(np.float32) - MEAN_RGB) / np.float32(255.0)


def face_batch(image: np.ndarray, boxes, margin: float = 0.0, size: int = INPUT_SIZE) -> np.ndarray:
    """All boxes of one image -> (n, 3, size, size) float32 (NCHW) network input."""
    check_image(image)
    b = check_boxes(boxes)
    out = np.empty((len(b), 3, size, size), dtype=np.float32)
    for i, box in enumerate(b):
        out[i] = face_input(image, box, margin, size).transpose(2, 0, 1)
    return out
