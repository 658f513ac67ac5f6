"""Expression accuracy of the face-api.js port on ``../shared/data/expressions`` val (ground-truth boxes).

1. Day 0: the converted net (``models/face_expression.pt``), face-api's 7 names mapped to the
   dataset's (fearful->fear, disgusted->disgust, surprised->surprise); 7-class accuracy for each
   crop margin in ``--margins`` (contempt has no examples; it is not predicted).
2. Fine-tuned on expressions train (``fine_tune``, ``--epochs``, the recipe's other defaults unless
   ``--train-blocks`` / ``--lr`` are given), then val accuracy. Skipped with ``--epochs 0``.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifier_expressions.py [--epochs 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from classifier_data import class_names, faces, load_rgb, samples  # noqa: E402
from facemodels.classifier import (FACEAPI_TO_DATASET, FaceClassifier, default_classifier_path, evaluate,  # noqa: E402
                                   fine_tune)


def _proba(clf: FaceClassifier, image, boxes, flip: bool) -> np.ndarray:
    """Softmax of the crops, averaged with their horizontal mirror images when ``flip``."""
    if not flip:
        return clf.predict_proba(image, boxes)
    x = torch.from_numpy(clf.inputs(image, boxes))
    with torch.no_grad():
        return ((clf.net(x).softmax(1) + clf.net(x.flip(3)).softmax(1)) / 2).numpy()


def day0(clf: FaceClassifier, val, margins, flip: bool = False) -> None:
    ds_names = [FACEAPI_TO_DATASET[c] for c in clf.classes]
    y = np.array([ds_names.index(f.label) for f in val])
    by_img: dict = {}
    for i, f in enumerate(val):
        by_img.setdefault(f.image, []).append(i)
    for m in margins:
        clf.crop_margin = m
        t = time.perf_counter()
        pred = np.empty(len(val), dtype=int)
        for img, idx in by_img.items():
            p = _proba(clf, load_rgb(img), np.array([val[i].box for i in idx]), flip)
            pred[idx] = p.argmax(1)
        dt = time.perf_counter() - t
        acc = (pred == y).mean()
        per = {ds_names[c]: round(float((pred[y == c] == c).mean()), 3) for c in np.unique(y)}
        print(f"day0 margin={m:.2f}{' flip TTA' if flip else ''} acc={acc:.3f} n={len(y)} ({dt:.1f} s, {1000 * dt / len(y):.1f} ms/face incl. decode)")
        print(f"   per class: {per}")
        src = np.array([f.source for f in val])
        print("   per source (file-name prefix):", {s_: f"{(pred[src == s_] == y[src == s_]).mean():.3f} (n={int((src == s_).sum())})"
                                                  for s_ in sorted(set(src))})
        cm = np.zeros((7, 7), int)
        np.add.at(cm, (y, pred), 1)
        print("   confusion (rows true, cols pred):", ds_names)
        for r, n in zip(cm, ds_names):
            print(f"   {n:>9}", " ".join(f"{v:4d}" for v in r))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-blocks", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--margin", type=float, default=None, help="crop margin for fine-tuning")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flip", action="store_true", help="day 0 with horizontal-flip test-time averaging")
    ap.add_argument("--max-train", type=int, default=0, help="use at most this many train faces (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clf = FaceClassifier.load(default_classifier_path())
    val = faces("expressions", "val")
    print(f"expressions val: {len(val)} faces, {len({f.image for f in val})} images")
    day0(clf, val, args.margins, args.flip)
    if args.epochs <= 0:
        return
    classes = [c for c in class_names("expressions") if c != "contempt"]
    train = faces("expressions", "train")
    if args.max_train:
        rng = np.random.default_rng(0)
        train = [train[i] for i in sorted(rng.choice(len(train), args.max_train, replace=False))]
    over = {k: v for k, v in (("train_blocks", args.train_blocks), ("lr", args.lr), ("crop_margin", args.margin)) if v is not None}
    clf = FaceClassifier.load(default_classifier_path())
    t = time.perf_counter()
    tr = samples(train, classes)
    print(f"fine-tune on {len(tr)} train faces, classes {classes}, epochs {args.epochs}, overrides {over}")
    model, met = fine_tune(clf, tr, classes, epochs=args.epochs, seed=0,
                           on_epoch=lambda e, n, l: print(f"   epoch {e}/{n} loss {l:.4f} ({time.perf_counter() - t:.0f} s)", flush=True),
                           **over)
    ev = evaluate(model, samples(val, classes))
    print(f"fine-tuned: val acc={ev['accuracy']:.3f} n={ev['n']} train {met['train_seconds']:.0f} s; kept rows {met['kept_classes']}")
    print(f"   per class: { {k: round(v, 3) for k, v in ev['per_class'].items()} }")


if __name__ == "__main__":
    main()
