"""Issue 9 §4: image bombs. Peak RSS of a real backend process (real model) per /predict,
measured from /proc/self/status VmHWM in a subprocess (reset between cases). Target < 1.5 GB."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers_unit import write_jpeg

GB = 1024**3
TARGET = 1.5 * GB


def _png_with_claimed_size(w: int, h: int) -> bytes:
    """A 16x16 PNG whose IHDR claims ``w`` x ``h`` (valid CRC): a header-only bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bombs")
    write_jpeg(root / "small.jpg", width=96, height=64)
    Image.new("RGB", (8900, 8900)).save(root / "zero8900.png")  # the 231 KB PNG
    (root / "claims60000.png").write_bytes(_png_with_claimed_size(60000, 60000))
    Image.new("RGBA", (6300, 6300), (90, 60, 40, 200)).save(root / "rgba6300.png")  # 39.7 MP, accepted
    Image.frombytes("I;16", (6300, 6300), np.full((6300, 6300), 30000, "<u2").tobytes()).save(root / "g16_6300.png")
    Image.new("RGB", (12000, 12000), (120, 90, 70)).save(root / "big12000.jpg", quality=50)  # 144 MP JPEG
    return root


CASES = {
    "zero_png_8900": ["zero8900.png"],
    "four_zero_png_8900": ["zero8900.png"] * 4,
    "png_header_claims_60000": ["claims60000.png"],
    "rgba_png_6300": ["rgba6300.png"],
    "four_rgba_png_6300": ["rgba6300.png"] * 4,
    "i16_png_6300": ["g16_6300.png"],
    "jpeg_12000_drafted": ["big12000.jpg"],
    "mixed_eight": ["rgba6300.png", "big12000.jpg", "g16_6300.png", "zero8900.png"] * 2,
}


def _probe(bombs, var, cases: dict) -> dict:
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("bomb_probe.py")), str(bombs), str(var),
                        json.dumps(cases)], capture_output=True, text=True, timeout=600,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    line = next((x for x in p.stdout.splitlines() if x.startswith("BOMB-RESULT ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(line[len("BOMB-RESULT "):])


def test_image_bombs_peak_rss(bombs, tmp_path):
    # one fresh backend process per case: its VmHWM is that case's peak (model loaded first)
    results, baseline = {}, []
    for i, (name, files) in enumerate(CASES.items()):
        out = _probe(bombs, tmp_path / f"var{i}", {name: files})
        results[name] = out["cases"][name]
        baseline.append(out["baseline_hwm"])
    print(f"\nbackend process peak before the case (model loaded, one small /predict): "
          f"{min(baseline) / 2**20:.0f}-{max(baseline) / 2**20:.0f} MiB")
    for name, c in results.items():
        print(f"{name:28s} HTTP {c['status']} {c['seconds']:6.2f} s  peak RSS {c['peak_rss'] / 2**20:6.0f} MiB  "
              f"{c['outcomes'][:1]}")
    for name, c in results.items():
        assert c["status"] == 200, (name, c)
        assert c["peak_rss"] < TARGET, (name, c)
    assert all("too large" in o for o in results["zero_png_8900"]["outcomes"])
    assert all("not a readable image" in o for o in results["png_header_claims_60000"]["outcomes"])
    for name in ("rgba_png_6300", "four_rgba_png_6300", "i16_png_6300", "jpeg_12000_drafted"):
        assert set(results[name]["outcomes"]) == {"ok"}, (name, results[name])
