"""Large photos are decoded smaller, and their predictions stay right (issue 9 §4).

A 6000x4000 JPEG is decoded at 1/2 scale by the JPEG decoder (``draft``), then reduced by 2
(box filter) to 1500x1000 before inference (``MAX_IMAGE_SIDE`` 2048). Its predicted boxes must
have the percent coordinates of the same picture stored at 1500x1000, and the regions must give
Label Studio the true size (``original_width/height`` 6000x4000). Peak RSS and time of a real
backend process (real model, ``tests/security/bomb_probe.py``, one process per case) are
measured with the reduction (default) and without it (``MAX_IMAGE_SIDE=0``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import require_data
from tests.helpers_unit import write_jpeg

GB = 1024**3
FACE = "images/val/agufsamudra_05feec546aad.jpg"  # 640x480, one face (awake_sleep val)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    data = require_data()
    root = tmp_path_factory.mktemp("large")
    write_jpeg(root / "small.jpg", width=96, height=64)
    face = Image.open(data / FACE).convert("RGB").resize((1333, 1000), Image.Resampling.LANCZOS)
    small = Image.new("RGB", (1500, 1000), (128, 128, 128))
    small.paste(face, (120, 0))  # off-centre, so a scale error would show in x
    small.save(root / "p1500.jpg", quality=92)
    small.resize((6000, 4000), Image.Resampling.LANCZOS).save(root / "p6000.jpg", quality=92)
    return root


def _probe(root, var, cases: dict, settings: dict | None = None) -> dict:
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("bomb_probe.py")), str(root), str(var),
                        json.dumps(cases), json.dumps(settings or {})], capture_output=True, text=True, timeout=600,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    line = next((x for x in p.stdout.splitlines() if x.startswith("BOMB-RESULT ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(line[len("BOMB-RESULT "):])


def test_large_jpeg_predicts_like_its_small_copy_within_bounded_memory(photos, tmp_path):
    small = _probe(photos, tmp_path / "v1", {"p1500": ["p1500.jpg"]})["cases"]["p1500"]
    big = _probe(photos, tmp_path / "v2", {"p6000": ["p6000.jpg"]})["cases"]["p6000"]
    full = _probe(photos, tmp_path / "v3", {"p6000": ["p6000.jpg"]}, {"max_image_side": 0})["cases"]["p6000"]
    for name, c in (("1500x1000", small), ("6000x4000 reduced", big), ("6000x4000 full (MAX_IMAGE_SIDE=0)", full)):
        print(f"\n{name:36s} HTTP {c['status']} {c['seconds']:6.2f} s  peak RSS {c['peak_rss'] / 2**20:6.0f} MiB  "
              f"{len(c['regions'][0])} boxes", end="")
    print()
    assert small["outcomes"] == big["outcomes"] == ["ok"], (small, big)
    [rs], [rb] = small["regions"], big["regions"]
    assert rs, "the model finds the face at 1500x1000"
    assert {tuple(r[4:]) for r in rs} == {(1500, 1000)}
    assert {tuple(r[4:]) for r in rb} == {(6000, 4000)}  # Label Studio gets the true size
    assert len(rb) == len(rs)
    print(f"regions (x, y, width, height in percent; original size): 1500x1000 {rs}, 6000x4000 {rb}, "
          f"6000x4000 full {full['regions'][0]}")
    for a, b in zip(sorted(rs), sorted(rb)):
        assert all(abs(x - y) < 1.0 for x, y in zip(a[:4], b[:4])), (a, b)  # percent points
    assert big["peak_rss"] < 1.5 * GB
    assert big["peak_rss"] <= full["peak_rss"] + 32 * 2**20


@pytest.mark.parametrize("orientation,shown", [(None, (3000, 2000)), (6, (2000, 3000)), (3, (3000, 2000))])
def test_decoded_smaller_keeps_the_displayed_size(orientation, shown):
    from backend.images import decode_image
    from tests.helpers_unit import jpeg_bytes

    img = decode_image(jpeg_bytes(3000, 2000, orientation=orientation), 40_000_000, 16, 1024)
    assert (img.original_width, img.original_height) == shown  # EXIF orientation applied, full size
    assert max(img.width, img.height) <= 1024 and img.array.shape[:2] == (img.height, img.width)
    assert abs(img.width / img.height - shown[0] / shown[1]) < 0.01
    full = decode_image(jpeg_bytes(300, 200, orientation=orientation), 40_000_000, 16, 1024)
    assert (full.width, full.height) == (full.original_width, full.original_height)
