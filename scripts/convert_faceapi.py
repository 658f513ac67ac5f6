#!/usr/bin/env python3
"""Convert face-api.js's expression net (npm ``@vladmandic/face-api``, MIT) to faceloop's .pt format.

    python scripts/convert_faceapi.py --npm                       # runs `npm pack @vladmandic/face-api@1.7.15`
    python scripts/convert_faceapi.py --tarball vladmandic-face-api-1.7.15.tgz

Reads ``package/model/face_expression_model-weights_manifest.json`` and its ``.bin`` shard(s)
from the tarball, dequantises each tensor (TF.js ``uint8`` quantisation: ``value = q * scale + min``,
float32 tensors as stored), maps TF layouts to PyTorch (conv HWIO -> OIHW, depthwise
``[3,3,C,1]`` -> ``[C,1,3,3]``, fc ``[256,7]`` -> ``[7,256]``) and writes ``--out``
(default ``models/face_expression.pt``) plus a ``.json`` with the provenance (package, version,
tarball sha256, licence, output sha256).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.hashing import file_sha256  # noqa: E402

PACKAGE = "@vladmandic/face-api"
VERSION = "1.7.15"
MANIFEST = "package/model/face_expression_model-weights_manifest.json"

_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}


def read_tfjs_weights(tar: tarfile.TarFile, manifest_name: str = MANIFEST) -> dict[str, np.ndarray]:
    """Decode a TF.js weights manifest (+ shards) inside the npm tarball to float32 arrays."""
    base = manifest_name.rsplit("/", 1)[0]
    manifest = json.load(tar.extractfile(manifest_name))
    out: dict[str, np.ndarray] = {}
    for group in manifest:
        buf = b"".join(tar.extractfile(f"{base}/{p}").read() for p in group["paths"])
        off = 0
        for w in group["weights"]:
            n = int(np.prod(w["shape"])) if w["shape"] else 1
            q = w.get("quantization")
            if q:
                dt = np.dtype(_DTYPES[q["dtype"]])
                raw = np.frombuffer(buf, dtype=dt, count=n, offset=off)
                off += n * dt.itemsize
                if q["dtype"] == "float16":
                    vals = raw.astype(np.float32)
                else:  # TF.js io.decodeWeights: v * scale + min (computed in double, stored float32)
                    vals = (raw.astype(np.float64) * q["scale"] + q["min"]).astype(np.float32)
            else:
                if w["dtype"] != "float32":
                    raise ValueError(f"{w['name']}: unsupported dtype {w['dtype']}")
                vals = np.frombuffer(buf, dtype="<f4", count=n, offset=off).astype(np.float32)
                off += n * 4
            out[w["name"]] = vals.reshape(w["shape"])
        if off != len(buf):
            raise ValueError(f"manifest group {group['paths']}: read {off} of {len(buf)} bytes")
    return out


def npm_pack(dest: Path) -> Path:
    spec = f"{PACKAGE}@{VERSION}"
    res = subprocess.run(["npm", "pack", spec, "--silent"], cwd=dest, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise SystemExit(f"npm pack {spec} failed: {res.stderr.strip()}")
    return dest / res.stdout.strip().splitlines()[-1]


#: Crop margin stored in the converted model (fraction of the box side added on each side): on
#: ../shared expressions val with ground-truth boxes, 7-class accuracy 0.417 at 0.0 (face-api's own
#: crop), 0.477 at 0.2, 0.481 at 0.3 (benchmarks/classifier_expressions.py; docs/classifier.md).
DEFAULT_SERVE_MARGIN = 0.2


def convert(tarball: Path, out: Path, margin: float = DEFAULT_SERVE_MARGIN) -> dict:
    from facemodels.classifier import FACEAPI_CLASSES, FaceClassifier
    from facemodels.faceapi_net import FaceExpressionNet, state_dict_from_tfjs

    with tarfile.open(tarball, "r:gz") as tar:
        pkg = json.load(tar.extractfile("package/package.json"))
        weights = read_tfjs_weights(tar)
        licence_text = tar.extractfile("package/LICENSE").read().decode("utf-8", "replace")
    if pkg.get("name") != PACKAGE:
        raise SystemExit(f"{tarball} holds {pkg.get('name')}, expected {PACKAGE}")
    net = FaceExpressionNet(len(FACEAPI_CLASSES))
    net.load_state_dict(state_dict_from_tfjs(weights))
    source = {"package": pkg["name"], "version": pkg["version"], "licence": pkg.get("license"),
              "licence_first_line": licence_text.strip().splitlines()[0] if licence_text.strip() else "",
              "tarball": tarball.name, "tarball_sha256": file_sha256(tarball), "manifest": MANIFEST,
              "homepage": pkg.get("homepage"), "upstream": "face-api.js by Vincent Muehler (MIT), FaceExpressionNet"}
    meta = {"source": source, "converted_by": "scripts/convert_faceapi.py",
            "preprocessing": "pad to square (centred, JS Math.round), TF legacy bilinear resize to 112, "
                             "(RGB - [122.782, 117.001, 104.298]) / 255",
            "n_parameters": int(sum(p.numel() for p in net.parameters()))}
    clf = FaceClassifier(net, FACEAPI_CLASSES, crop_margin=margin, meta=meta)
    clf.save(out)
    info = dict(meta, file=out.name, sha256=file_sha256(out), classes=FACEAPI_CLASSES, crop_margin=margin)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out.with_suffix(".json"))
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tarball", type=Path, help="the npm tarball vladmandic-face-api-1.7.15.tgz")
    src.add_argument("--npm", action="store_true", help=f"download it with `npm pack {PACKAGE}@{VERSION}`")
    ap.add_argument("--out", type=Path, default=REPO / "models" / "face_expression.pt")
    ap.add_argument("--margin", type=float, default=DEFAULT_SERVE_MARGIN,
                    help="crop margin stored in the model (0 = face-api's own crop of the box)")
    args = ap.parse_args(argv)
    if args.npm:
        with tempfile.TemporaryDirectory() as d:
            info = convert(npm_pack(Path(d)), args.out, args.margin)
    else:
        if not args.tarball.is_file():
            raise SystemExit(f"no tarball at {args.tarball}")
        info = convert(args.tarball, args.out, args.margin)
    print(json.dumps({k: info[k] for k in ("file", "sha256", "n_parameters")} | {"source": info["source"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
