"""Day-0 face-detector benchmark (issue 10, stage 1): does the default detector find the faces?

Evaluates any YOLO weights on a YOLO-layout folder split, **class-agnostic** (every box is a
face, whatever its class), through the product's prediction path
``facemodels.detector.FaceModel(path).detect([rgb arrays], conf=..., imgsz=...)`` (class-agnostic NMS at
ultralytics' default IoU 0.7 inside), on images decoded like the backend does
(``backend.images.decode_image``: EXIF orientation applied, RGB).

Figures per (split, confidence threshold, NMS IoU):

- ``recall@0.3`` / ``recall@0.5``: share of ground-truth faces matched by a predicted box with
  IoU >= 0.3 / 0.5 (one-to-one greedy matching, highest confidence first, as in COCO);
- ``false_per_image``: predicted boxes not matched to any face at IoU >= 0.3 (boxes off faces
  and duplicates of a matched face), per image;
- ``boxes_per_face``: predicted boxes / ground-truth faces;
- scores: the face-ness ``1 - prod(1 - s_k)`` of a box's class scores, as the product scores a
  face whose class no project label maps to (a one-class detector: its confidence);
- ``mAP50``: class-agnostic average precision at IoU 0.5 over all boxes with confidence >= 0.001
  (ultralytics' ``compute_ap``, 101-point COCO interpolation), independent of the threshold.

The confidence threshold and an extra greedy NMS pass (IoU in ``--nms-grid``, on top of the
0.7 inside ``detect``) are **tuned on the tune split** (default awake_sleep *train*, never val):
among the settings with at most ``--max-false`` false boxes per image the one with the highest
recall@0.3 (ties: higher recall@0.5, then higher threshold); if none qualifies, the one with the
highest F1 of face finding at IoU 0.3 (precision = matched boxes / boxes). Figures at the
product's ``score_threshold`` 0.25 (``--report-conf``, ``--report-nms`` 0.7) are reported beside them. The chosen setting is then applied to every eval split.

Run (from the repository root)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/detector_day0.py \\
        --weights models/faceloop-face.pt models/faceloop-base.pt --imgsz 256 320

Writes ``--out`` (default ``benchmarks/out/detector_day0.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED = (REPO.parent / "shared" / "data").resolve()
CONF_GRID = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]
NMS_GRID = [0.7, 0.5, 0.4, 0.3]


def load_split(folder: Path, split: str, limit: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Images (RGB, EXIF-oriented) and ground-truth boxes ``(n, 4)`` xyxy in pixels of a YOLO split.

    Raises: FileNotFoundError when ``folder/images/split`` is missing.
    """
    from backend.images import decode_image

    img_dir = folder / "images" / split
    if not img_dir.is_dir():
        raise FileNotFoundError(f"no images at {img_dir}")
    paths = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"})
    if limit:
        paths = paths[:limit]
    images, gts = [], []
    for p in paths:
        im = decode_image(p.read_bytes(), max_pixels=10**9).array
        h, w = im.shape[:2]
        lab = folder / "labels" / split / (p.stem + ".txt")
        rows = [list(map(float, ln.split()[1:5])) for ln in (lab.read_text().splitlines() if lab.exists() else []) if ln.strip()]
        b = np.array([[(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
                      for cx, cy, bw, bh in rows], dtype=float).reshape(-1, 4)
        images.append(im)
        gts.append(b)
    return images, gts, [p.name for p in paths]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a (n,4)`` with every box in ``b (m,4)``, xyxy pixels -> ``(n, m)``."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS at ``iou`` (boxes sorted by score, highest first)."""
    order = np.argsort(-scores)
    keep: list[int] = []
    for i in order:
        if not keep or iou_matrix(boxes[i : i + 1], boxes[keep]).max() <= iou:
            keep.append(int(i))
    return np.array(keep, dtype=int)


def match(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, thr: float) -> np.ndarray:
    """Greedy one-to-one matching, highest score first: bool ``(n_pred,)`` true positives at IoU >= thr."""
    tp = np.zeros(len(pred), bool)
    if len(pred) == 0 or len(gt) == 0:
        return tp
    ious = iou_matrix(pred, gt)
    used = np.zeros(len(gt), bool)
    for i in np.argsort(-scores):
        cand = np.where(~used & (ious[i] >= thr))[0]
        if len(cand):
            j = cand[np.argmax(ious[i, cand])]
            used[j] = True
            tp[i] = True
    return tp


def detect_all(weights: Path, images: list[np.ndarray], imgsz: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """Run ``FaceModel.detect`` at confidence 0.001; returns per image ``(boxes (n,4), face-ness (n,))`` and ms/image.

    The score is the noisy-OR ``1 - prod(1 - s_k)`` of the box's class scores, as ``backend/predict.py``
    scores an unlabelled face (for a one-class detector it is the box confidence).
    """
    from facemodels.detector import FaceModel

    model = FaceModel(weights)
    model.detect(images[:1], conf=0.001, imgsz=imgsz)  # warm-up
    t0 = time.perf_counter()
    res = model.detect(images, conf=0.001, imgsz=imgsz)
    ms = (time.perf_counter() - t0) * 1000 / max(len(images), 1)
    out = []
    for r in res:
        b = np.array([d.box for d in r.detections], dtype=float).reshape(-1, 4)
        # face-ness as backend/predict.py scores a box no project class maps to: the noisy-OR of
        # the independent class sigmoids (equal to the box confidence for a one-class detector)
        s = np.array([1.0 - np.prod(1.0 - np.clip(d.class_scores, 0.0, 1.0)) for d in r.detections], dtype=float)
        out.append((b, s))
    return out, ms


def map50(dets: list[tuple[np.ndarray, np.ndarray]], gts: list[np.ndarray]) -> float:
    """Class-agnostic AP at IoU 0.5 (ultralytics ``compute_ap``) over all given boxes."""
    from ultralytics.utils.metrics import compute_ap

    scores, tps = [], []
    for (b, s), g in zip(dets, gts):
        scores.append(s)
        tps.append(match(b, s, g, 0.5))
    n_gt = sum(len(g) for g in gts)
    if n_gt == 0:
        return float("nan")
    s = np.concatenate(scores) if scores else np.zeros(0)
    tp = np.concatenate(tps) if tps else np.zeros(0, bool)
    if len(s) == 0:
        return 0.0
    order = np.argsort(-s)
    tpc = np.cumsum(tp[order])
    fpc = np.cumsum(~tp[order])
    recall = tpc / n_gt
    precision = tpc / (tpc + fpc)
    ap, _, _ = compute_ap(recall, precision)
    return float(ap)


def figures(dets, gts, conf: float, nms_iou: float) -> dict:
    """Recall@0.3/0.5, false boxes per image and boxes per face at one threshold and NMS IoU."""
    n_gt = sum(len(g) for g in gts)
    tp3 = tp5 = n_pred = n_false = no_box = 0
    for (b, s), g in zip(dets, gts):
        k = s >= conf
        b, s = b[k], s[k]
        if nms_iou < 0.7 and len(b):
            keep = greedy_nms(b, s, nms_iou)
            b, s = b[keep], s[keep]
        m3 = match(b, s, g, 0.3)
        tp3 += int(m3.sum())
        tp5 += int(match(b, s, g, 0.5).sum())
        n_pred += len(b)
        n_false += int((~m3).sum())
        no_box += int(len(b) == 0)
    n_img = max(len(gts), 1)
    return {
        "conf": conf, "nms_iou": nms_iou, "images": len(gts), "faces": n_gt,
        "recall@0.3": tp3 / max(n_gt, 1), "recall@0.5": tp5 / max(n_gt, 1),
        "false_per_image": n_false / n_img, "boxes_per_face": n_pred / max(n_gt, 1),
        "images_without_box": no_box,
    }


def tune(dets, gts, max_false: float, conf_grid=CONF_GRID, nms_grid=NMS_GRID) -> dict:
    """Pick (conf, NMS IoU) on a tuning split by the rule in the module docstring."""
    rows = [figures(dets, gts, c, n) for c in conf_grid for n in nms_grid]
    ok = [r for r in rows if r["false_per_image"] <= max_false]
    if ok:
        return max(ok, key=lambda r: (round(r["recall@0.3"], 6), round(r["recall@0.5"], 6), r["conf"], -r["nms_iou"]))
    def f1(r):  # F1 of face finding at IoU 0.3: precision = matched boxes / boxes
        p = r["recall@0.3"] / r["boxes_per_face"] if r["boxes_per_face"] else 0.0
        return 2 * p * r["recall@0.3"] / (p + r["recall@0.3"]) if p + r["recall@0.3"] else 0.0

    return max(rows, key=lambda r: (round(f1(r), 6), r["conf"]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, nargs="+", default=[REPO / "models" / "faceloop-face.pt"])
    ap.add_argument("--imgsz", type=int, nargs="+", default=[256])
    ap.add_argument("--tune", default=f"{SHARED / 'awake_sleep'}:train",
                    help="FOLDER:SPLIT used to choose the threshold and NMS IoU")
    ap.add_argument("--eval", nargs="+", default=[f"{SHARED / 'awake_sleep'}:val", f"{SHARED / 'expressions'}:val"],
                    help="FOLDER:SPLIT pairs to report")
    ap.add_argument("--max-false", type=float, default=0.2, help="false boxes per image allowed when tuning")
    ap.add_argument("--fixed-conf", type=float, default=None, help="skip tuning: use this threshold (NMS IoU 0.7)")
    ap.add_argument("--report-conf", type=float, nargs="*", default=[0.25],
                    help="also report at these thresholds (NMS IoU --report-nms), untuned")
    ap.add_argument("--report-nms", type=float, default=0.7, help="NMS IoU of the --report-conf rows")
    ap.add_argument("--limit", type=int, default=None, help="first N images per split (smoke runs)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "detector_day0.json")
    args = ap.parse_args(argv)

    from backend.config import configure_ultralytics

    configure_ultralytics()
    splits: dict[str, tuple] = {}
    for spec in [args.tune, *args.eval]:
        folder, split = spec.rsplit(":", 1)
        if spec not in splits:
            splits[spec] = load_split(Path(folder), split, args.limit)
    results = []
    for w in args.weights:
        for sz in args.imgsz:
            dets = {}
            ms = {}
            for spec, (ims, _g, _n) in splits.items():
                dets[spec], ms[spec] = detect_all(w, ims, sz)
            if args.fixed_conf is not None:
                settings = [({"conf": args.fixed_conf, "nms_iou": 0.7}, None)]
            else:
                settings = [(tune(dets[args.tune], splits[args.tune][1], args.max_false), args.tune)]
            settings += [({"conf": c, "nms_iou": args.report_nms}, "fixed") for c in args.report_conf]
            for chosen, how in settings:
                rec = {"weights": str(w), "imgsz": sz, "conf": chosen["conf"], "nms_iou": chosen["nms_iou"],
                       "tuned_on": how, "splits": {}}
                for spec in splits:
                    f = figures(dets[spec], splits[spec][1], chosen["conf"], chosen["nms_iou"])
                    f["mAP50"] = map50(dets[spec], splits[spec][1])
                    f["ms_per_image"] = ms[spec]
                    names = splits[spec][2]
                    groups = sorted({n.split("_")[0] for n in names})
                    if 1 < len(groups) <= 8:  # per source (file-name prefix), e.g. seen vs unseen people
                        f["by_source"] = {}
                        for g in groups:
                            idx = [i for i, n in enumerate(names) if n.split("_")[0] == g]
                            f["by_source"][g] = figures([dets[spec][i] for i in idx], [splits[spec][1][i] for i in idx],
                                                        chosen["conf"], chosen["nms_iou"])
                    rec["splits"][spec] = f
                results.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "splits"}), flush=True)
    print("\n| weights | imgsz | conf | NMS IoU | chosen | split | recall@0.3 | recall@0.5 | false boxes/img | boxes/face | mAP50 | images w/o box | ms/img |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for spec, f in r["splits"].items():
            name = Path(spec.rsplit(":", 1)[0]).name + " " + spec.rsplit(":", 1)[1]
            print(f"| {Path(r['weights']).name} | {r['imgsz']} | {r['conf']:.2f} | {r['nms_iou']:.1f} | {'tuned' if r['tuned_on'] not in (None, 'fixed') else 'fixed'} | {name} | "
                  f"{f['recall@0.3']:.3f} | {f['recall@0.5']:.3f} | {f['false_per_image']:.3f} | {f['boxes_per_face']:.3f} | "
                  f"{f['mAP50']:.3f} | {f['images_without_box']} | {f['ms_per_image']:.1f} |")
    print("\nper source (file-name prefix):")
    for r in results:
        for spec, f in r["splits"].items():
            for g, h in f.get("by_source", {}).items():
                print(f"  {Path(r['weights']).name} {r['imgsz']} conf {r['conf']:.2f} {Path(spec.rsplit(':', 1)[0]).name} "
                      f"{g}: {h['faces']} faces, recall@0.3 {h['recall@0.3']:.3f}, recall@0.5 {h['recall@0.5']:.3f}, "
                      f"false/img {h['false_per_image']:.3f}, boxes/face {h['boxes_per_face']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return {"results": results}


if __name__ == "__main__":
    main()
