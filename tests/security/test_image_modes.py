"""Issue 9 §5: every image mode Pillow can open becomes 8-bit RGB with the right scaling.

Images are made with Pillow, saved in a format that keeps their mode where one exists (PNG,
TIFF, JPEG), and decoded by backend.images.decode_image (the decoder /predict and training use:
ml_worker/dataset.py goes through backend.predict.load_images)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from backend.images import ImageError, decode_image, to_rgb8

BIG = 10**8
W, H = 32, 24


def _ramp(lo, hi, dtype):
    """A horizontal ramp lo..hi, (H, W)."""
    return np.tile(np.linspace(lo, hi, W), (H, 1)).astype(dtype)


def _i16(a: np.ndarray, mode: str = "I;16") -> Image.Image:
    """A 16-bit grey image of ``a`` (uint16) in ``mode`` (I;16, I;16L, I;16B, I;16N)."""
    order = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")
    return Image.frombytes(mode, (a.shape[1], a.shape[0]), a.astype(order).tobytes())


def _roundtrip(im: Image.Image, fmt: str) -> np.ndarray:
    buf = io.BytesIO()
    im.save(buf, fmt)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as back:
        assert back.mode == im.mode or (im.mode, back.mode) in {("I;16B", "I;16"), ("I;16L", "I;16")}, (im.mode, back.mode)
    img = decode_image(data, BIG)
    assert img.array.dtype == np.uint8 and img.array.shape == (H, W, 3)
    return img.array


def _grey(a):
    assert (a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 1] == a[:, :, 2]).all()
    return a[:, :, 0].astype(int)


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "PNG"), ("I;16B", "TIFF")])
def test_16_bit_grey_scales_by_the_mode_range(mode, fmt):
    # issue 9 §5: an I;16 PNG decoded to all-white (255 everywhere)
    a16 = _ramp(0, 65535, np.uint16)
    im = _i16(a16, mode)
    g = _grey(_roundtrip(im, fmt))
    expect = np.rint(a16 / 257.0).astype(int)
    assert np.abs(g - expect).max() <= 1
    assert g.min() == 0 and g.max() == 255 and len(np.unique(g)) > 20


def test_three_different_16_bit_photos_decode_differently():
    arrays = []
    for seed in range(3):
        a = np.random.default_rng(seed).integers(0, 65535, (H, W), dtype=np.uint16)
        arrays.append(_grey(_roundtrip(_i16(a), "PNG")))
    assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[1], arrays[2])
    assert all(a.mean() < 200 for a in arrays)  # not all white


@pytest.mark.parametrize("lo,hi,expect_lo,expect_hi", [(0, 255, 0, 255), (0, 65535, 0, 255), (-1000, 3000, 0, 255),
                                                       (0, 40, 0, 40)])
def test_32_bit_int(lo, hi, expect_lo, expect_hi):
    g = _grey(_roundtrip(Image.fromarray(_ramp(lo, hi, np.int32), "I"), "TIFF"))
    assert (g.min(), g.max()) == (expect_lo, expect_hi)


@pytest.mark.parametrize("lo,hi,expect_hi", [(0.0, 1.0, 255), (0.0, 200.0, 200), (-5.0, 5000.0, 255)])
def test_float(lo, hi, expect_hi):
    g = _grey(_roundtrip(Image.fromarray(_ramp(lo, hi, np.float32), "F"), "TIFF"))
    assert (g.min(), g.max()) == (0, expect_hi)
    assert (np.diff(g[0]) >= 0).all()  # order kept


def test_float_with_nan_and_inf():
    a = _ramp(0.0, 1.0, np.float32)
    a[0, 0], a[0, 1], a[0, 2] = np.nan, np.inf, -np.inf
    g = _grey(to_rgb8(Image.fromarray(a, "F")))
    assert g[1].max() == 255 and g[0, 0] == 0


def test_constant_float_image():
    g = _grey(to_rgb8(Image.fromarray(np.full((H, W), 7e6, np.float32), "F")))
    assert (g == 0).all()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "JPEG"])
def test_L(fmt):
    g = _grey(_roundtrip(Image.fromarray(_ramp(0, 255, np.uint8), "L"), fmt))
    assert abs(g.min()) <= 3 and g.max() >= 250


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_1(fmt):
    a = np.zeros((H, W), bool)
    a[:, W // 2:] = True
    g = _grey(_roundtrip(Image.fromarray(a).convert("1"), fmt))
    assert (g[:, : W // 2] == 0).all() and (g[:, W // 2:] == 255).all()


def _alpha_case(mode):
    """Red-ish left half opaque, right half fully transparent."""
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[:, :, :3] = (200, 40, 30)
    rgba[:, : W // 2, 3] = 255
    return Image.fromarray(rgba, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(rgba, "RGBA")


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("RGBA", "TIFF"), ("LA", "PNG"), ("LA", "TIFF"), ("PA", "TIFF")])
def test_alpha_is_composited_on_white(mode, fmt):
    a = _roundtrip(_alpha_case(mode), fmt)
    assert (a[:, W // 2:] == 255).all()  # transparent: white, not the hidden colour
    left = a[:, : W // 2].reshape(-1, 3).mean(axis=0)
    if mode == "LA":
        assert abs(left[0] - left[1]) < 1 and 60 < left[0] < 120  # grey of (200, 40, 30)
    else:
        assert np.abs(left - [200, 40, 30]).max() < 12


def test_half_transparent_pixel():
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = 128  # black at 50 %: mid grey on white
    a = _roundtrip(Image.fromarray(rgba, "RGBA"), "PNG")
    assert np.abs(a.astype(int) - 127).max() <= 1


def test_P_with_transparency():
    im = Image.new("P", (W, H), 0)
    im.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, W // 2, H))
    im.info["transparency"] = 0
    a = _roundtrip(im, "PNG")
    assert (a[:, W // 2:] == 255).all() and (a[:, : W // 2] == [250, 0, 0]).all()


def test_P_without_transparency():
    im = Image.new("P", (W, H), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert (_roundtrip(im, "PNG") == [10, 200, 30]).all()


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("LAB", "TIFF")])
def test_colour_spaces(mode, fmt):
    rgb = Image.new("RGB", (W, H), (220, 30, 40))
    if mode == "LAB":
        t = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
        im = ImageCms.applyTransform(rgb, t)
    else:
        im = rgb.convert(mode)
    a = _roundtrip(im, fmt)
    assert np.abs(a.reshape(-1, 3).mean(axis=0) - [220, 30, 40]).max() < 12, a[0, 0]


@pytest.mark.parametrize("mode", ["HSV", "RGBX", "RGBa", "La", "I;16L", "I;16N", "RGB"])
def test_in_memory_modes(mode):
    # modes no common file format keeps (decode_image never sees them from a file, to_rgb8 may)
    if mode.startswith("I;16"):
        im = _i16(_ramp(0, 65535, np.uint16), mode)
        g = _grey(to_rgb8(im))
        assert (g.min(), g.max()) == (0, 255)
        return
    base = Image.new("RGB", (W, H), (220, 30, 40))
    im = {"HSV": base.convert("HSV"), "RGBX": base.convert("RGBX"), "RGB": base,
          "RGBa": base.convert("RGBA").convert("RGBa"), "La": base.convert("LA").convert("La")}[mode]
    a = to_rgb8(im)
    assert a.dtype == np.uint8 and a.shape == (H, W, 3)
    if mode == "La":
        assert (a[..., 0] == a[..., 1]).all()
    else:
        assert np.abs(a.reshape(-1, 3).mean(axis=0) - [220, 30, 40]).max() < 8


def test_every_mode_pillow_lists_is_handled_or_refused_clearly():
    from PIL import ImageMode

    for mode in ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                 "I", "F", "I;16", "I;16L", "I;16B", "I;16N"]:
        ImageMode.getmode(mode)
        try:
            a = to_rgb8(Image.new(mode, (W, H)))
        except ImageError as e:
            assert "unsupported image mode" in str(e)
            continue
        assert a.dtype == np.uint8 and a.shape == (H, W, 3), mode


def test_large_I16_converts_in_bounded_memory():
    import tracemalloc

    im = _i16(np.full((2000, 3000), 40000, np.uint16))
    tracemalloc.start()
    a = to_rgb8(im)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert a[0, 0, 0] == 156  # 40000 / 257 = 155.6
    # the output, numpy's copy of the pixels (Pillow's tobytes + array: 2 x 12 MB) and row-block
    # temporaries (a float64 copy of the whole image alone would be 48 MB)
    assert peak < a.nbytes + 2 * 2000 * 3000 * 2 + 8 * 1024 * 1024, peak
