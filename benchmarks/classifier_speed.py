"""Inference cost of the stage-2 classifier per image (for the /predict budget).

Times ``FaceClassifier.predict_proba`` (crop + pad + TF legacy resize + forward + softmax) on
awake_sleep val images with their ground-truth box repeated 1, 3 and 8 times (an image with that
many faces), decoded images in memory, after a warm-up; also ``fine_tune`` on 40 faces (recipe).

Run: .venv/bin/python benchmarks/classifier_speed.py [--threads 1] [--images 50]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from classifier_data import faces, load_rgb, samples  # noqa: E402
from facemodels.classifier import FaceClassifier, default_classifier_path, fine_tune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--no-train", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clf = FaceClassifier.load(default_classifier_path())
    val = faces("awake_sleep", "val")[: args.images]
    imgs = [(load_rgb(f.image), np.array([f.box])) for f in val]
    print(f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}, {len(imgs)} images "
          f"({imgs[0][0].shape[1]}x{imgs[0][0].shape[0]} ...)")
    for k in (1, 3, 8):
        clf.predict_proba(imgs[0][0], np.repeat(imgs[0][1], k, 0))
        t = time.perf_counter()
        for im, b in imgs:
            clf.predict_proba(im, np.repeat(b, k, 0))
        dt = (time.perf_counter() - t) / len(imgs)
        print(f"predict_proba, {k} face(s) per image: {1000 * dt:.1f} ms/image ({1000 * dt / k:.1f} ms/face)")
    if args.no_train:
        return
    tr = faces("awake_sleep", "train")
    pick = set(random.Random(0).sample(sorted({f.image for f in tr}), 40))
    s = samples([f for f in tr if f.image in pick], ["awake", "sleep"])
    t = time.perf_counter()
    _, met = fine_tune(clf, s, ["awake", "sleep"], seed=0)
    print(f"fine_tune on {len(s)} faces, {met['recipe']['epochs']} epochs: {time.perf_counter() - t:.1f} s "
          f"(load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
