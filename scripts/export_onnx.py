"""Export a model version's two stages to ONNX ahead of time (issue 12).

The worker exports every version it writes (``facemodels.two_stage.write_bundle``); this script is
for the others:

* the shipped default (``models/faceloop-default.json``, the default ``BUNDLE``): its ONNX files are
  not committed (10.1 MB detector + 1.5 MB classifier, twice the ``.pt`` files: the detector's
  ``.pt`` holds fp16 weights, its ONNX export fp32). Without ``--in-place`` they are written to
  the lazy-export cache (``$VAR_DIR/onnx_cache/<sha256 of the .pt>/``), where the first load would
  otherwise put them (about 3 s, on the first ``/predict``); the Dockerfile or a deployment can run
  this once after install;
* versions written before ONNX export (``--in-place``): the ``.onnx`` files go beside the ``.pt``
  files and the bundle JSON records them with their SHA-256, as a newly written version has them.

Run: PYTHONPATH=. .venv/bin/python scripts/export_onnx.py [BUNDLE ...] [--in-place] [--imgsz 256]
Prints each file written with its size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", type=Path, default=[REPO / "models" / "faceloop-default.json"])
    ap.add_argument("--in-place", action="store_true", help="write beside the .pt files and record them in the bundle")
    ap.add_argument("--imgsz", type=int, default=256, help="tracing size in pixels (the export is dynamic)")
    args = ap.parse_args(argv)
    from backend.config import configure_ultralytics

    configure_ultralytics()
    from facemodels import onnx_runtime as ox
    from facemodels.two_stage import read_bundle

    for path in args.bundles:
        b = read_bundle(path)
        if args.in_place:
            folder = Path(path).resolve().parent
            entries = {}
            for key in ("detector", "classifier"):
                pt = Path(b[f"{key}_path"])
                out = pt.with_suffix(".onnx")
                (ox.export_detector(pt, out, args.imgsz) if key == "detector" else ox.export_classifier(pt, out))
                entries[f"{key}_onnx"] = os.path.relpath(out, folder)
                entries[f"{key}_onnx_sha256"] = ox.file_sha256(out)
                print(f"{out}  {out.stat().st_size / 1e6:.1f} MB")
            raw = json.loads(Path(path).read_text())
            raw.update(entries)
            fd, tmp = tempfile.mkstemp(prefix=".bundle.", dir=folder)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(raw, indent=2) + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            print(f"{path}: recorded {sorted(entries)}")
        else:
            for f in ox.onnx_files(b):
                print(f"{f}  {f.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
