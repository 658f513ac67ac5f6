"""Stage 2 of an expression project's retrain: fine-tuning a classifier that already knows the
project's classes on a few labelled faces.

Why: a new user's trial (2026-12-01) and ``faceloop bench-accept --data ../shared/data/expressions``
found every retrain of an expression project worse than the shipped default (accepted as is 0.653
at day 0, 0.41-0.48 after 10-40 labels). The retrain fine-tunes the served classifier with the
new-class recipe (``facemodels.classifier.RECIPE``: crop margin -0.1, lr 1e-3, 40 epochs), while
the expression classifier was trained on crops with margin 0.2.

What it measures: per seed and size, ``size`` random images of ``--data``'s train split (their
ground-truth faces, classes mapped by name onto ``--init``'s classes) fine-tune ``--init`` with
each ``--config``; the result is scored on every ground-truth face of the val split (7-class
accuracy; the same draw for every config). With ``--holdout F`` the project is new people instead:
the pool and the test faces are both the held-out part of train (``train_expression_default.py
--holdout F``: whole source subjects, never fitted by an ``--init`` trained with the same
``--holdout``): each draw fine-tunes on ``size`` of its images and is scored on the rest of its
faces (expressions val shares subjects with train, so an init fitted on train scores val as
people it has seen). Prints one JSON line per run and a summary per config:
mean ± std over the draws, per draw, and the difference to the first config draw by draw.

Run (1 thread; ~20-60 s a run):
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/stage2_known_classes.py \\
        --sizes 10,40 --seeds 0,1,2 --config recipe: --config keep_margin:crop_margin=0.2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import torch  # noqa: E402

from facemodels.classifier import FaceClassifier, evaluate, fine_tune  # noqa: E402
from train_expression_default import load_split  # noqa: E402


def parse_config(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> ``(name, {key: value})`` (values parsed as JSON, else text)."""
    name, _, rest = text.partition(":")
    out = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return name, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "expressions")
    ap.add_argument("--init", type=Path, default=REPO / "models" / "face_expression_ft.pt")
    ap.add_argument("--sizes", default="10,40")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="draw and score within the held-out part of train (new people; see above)")
    ap.add_argument("--config", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="a fine_tune setting set (RECIPE keys and epochs); the first is the reference")
    args = ap.parse_args()
    if not (args.data / "data.yaml").is_file():
        raise SystemExit(f"dataset not found: {args.data} (../shared/data is needed)")
    torch.set_num_threads(1)
    configs = [parse_config(c) for c in (args.config or ["recipe:"])]
    init = FaceClassifier.load(args.init)
    classes = list(init.classes)
    names: list[str] = []
    train, _, _ = load_split(args.data, "train", classes, names)
    if args.holdout:
        from train_expression_default import holdout_images

        held = holdout_images(args.data, "train", args.holdout, 0)
        train, names = ([s for s, n in zip(train, names) if n in held], [n for n in names if n in held])
        val = []
    else:
        val, _, _ = load_split(args.data, "val", classes)
    by_image: dict[str, list] = {}
    for s, n in zip(train, names):
        by_image.setdefault(n, []).append(s)
    images = sorted(by_image)
    if not args.holdout:
        day0 = evaluate(init, val)["accuracy"]
        print(json.dumps({"config": "day0 (init as is)", "val_faces": len(val), "accuracy": round(day0, 4)}), flush=True)
    day0s = []
    res: dict[str, list[float]] = {name: [] for name, _ in configs}
    for size in [int(x) for x in args.sizes.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            pick = np.random.default_rng(seed).choice(len(images), size=size, replace=False)
            samples = [s for i in sorted(pick) for s in by_image[images[i]]]
            if args.holdout:  # score on the held-out faces not drawn
                drawn = {images[i] for i in pick}
                val = [s for n in images if n not in drawn for s in by_image[n]]
                day0 = evaluate(init, val)["accuracy"]
                day0s.append(day0)
                print(json.dumps({"config": "day0 (init as is)", "size": size, "seed": seed, "test_faces": len(val),
                                  "accuracy": round(day0, 4)}), flush=True)
            for name, over in configs:
                over = dict(over)
                epochs = int(over.pop("epochs", 40))
                t = time.process_time()
                model, met = fine_tune(init, samples, classes, epochs=epochs, seed=seed, **over)
                acc = evaluate(model, val)["accuracy"]
                res[name].append(acc)
                print(json.dumps({"config": name, "size": size, "seed": seed, "faces": len(samples),
                                  "accuracy": round(acc, 4), "first_loss": round(met["loss"][0], 3),
                                  "last_loss": round(met["loss"][-1], 3),
                                  "cpu_s": round(time.process_time() - t, 1)}), flush=True)
    ref = np.array(res[configs[0][0]])
    if day0s:
        print(f"day 0 (init as is): {np.mean(day0s):.4f} ({' / '.join(f'{x:.3f}' for x in day0s)})")
    else:
        print(f"day 0 (init as is): {day0:.4f} on {len(val)} val faces")
    for name, _ in configs:
        a = np.array(res[name])
        d = a - ref
        print(f"{name:28s} {a.mean():.4f} ± {a.std():.4f} ({' / '.join(f'{x:.3f}' for x in a)})  "
              f"Δ vs {configs[0][0]} {d.mean():+.4f} [{int((d > 0).sum())} better / {int((d < 0).sum())} worse]")


if __name__ == "__main__":
    main()
