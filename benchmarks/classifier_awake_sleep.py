"""Few-shot recipe for new classes: fine-tune the face-api.js port on 40 awake_sleep faces.

For each seed, ``--n`` random images of ``../shared/data/awake_sleep`` train (their ground-truth
face boxes and classes) fine-tune ``models/face_expression.pt`` with ``facemodels.fine_tune`` under
each configuration (the recipe's defaults, overridden by ``key=value`` settings); class accuracy
is measured on awake_sleep val faces (ground-truth boxes): all 238, the 75 of the two people never
seen in train (``harish_``, ``agufsamudra_``) and the 163 of the person seen in train. A linear
probe (logistic regression on ``FaceClassifier.embed``) is the baseline (``--probe``).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifier_awake_sleep.py --seeds 0 1 2 \
        --config default --config "train_blocks=0" --probe
Prints one line per (config, seed) and a mean ± std table.
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from classifier_data import UNSEEN_PREFIXES, faces, load_rgb, samples  # noqa: E402
from facemodels.classifier import FaceClassifier, default_classifier_path, fine_tune  # noqa: E402
from facemodels.preprocess import face_batch  # noqa: E402

CLASSES = ["awake", "sleep"]


def parse_config(text: str) -> dict:
    if text == "default":
        return {}
    out = {}
    for part in text.split(","):
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


class ValSet:
    """awake_sleep val faces with network inputs cached per crop margin."""

    def __init__(self):
        self.faces = faces("awake_sleep", "val")
        self.y = np.array([CLASSES.index(f.label) for f in self.faces])
        self.unseen = np.array([f.image.name.startswith(UNSEEN_PREFIXES) for f in self.faces])
        self._x: dict[tuple, torch.Tensor] = {}

    def inputs(self, margin: float, size: int = 112) -> torch.Tensor:
        if (margin, size) not in self._x:
            self._x[margin, size] = torch.from_numpy(np.concatenate(
                [face_batch(load_rgb(f.image), np.array([f.box]), margin, size) for f in self.faces]))
        return self._x[margin, size]

    def score(self, pred: np.ndarray) -> dict:
        ok = pred == self.y
        return {"all": ok.mean(), "unseen": ok[self.unseen].mean(), "seen": ok[~self.unseen].mean()}

    @torch.no_grad()
    def evaluate(self, model: FaceClassifier) -> dict:
        """Accuracies of the model's argmax, and with horizontal-flip test-time augmentation (``*_tta``)."""
        model.net.eval()
        x = self.inputs(model.crop_margin, model.input_size)
        p = torch.cat([model.net(x[i:i + 64]).softmax(1) for i in range(0, len(x), 64)])
        pf = torch.cat([model.net(x[i:i + 64].flip(3)).softmax(1) for i in range(0, len(x), 64)])
        r = self.score(p.argmax(1).numpy())
        r.update({k + "_tta": v for k, v in self.score((p + pf).argmax(1).numpy()).items()})
        return r


def pick_train(n: int, seed: int):
    tr = faces("awake_sleep", "train")
    images = sorted({f.image for f in tr})
    chosen = set(random.Random(seed).sample(images, n))
    return [f for f in tr if f.image in chosen]


def linear_probe(clf: FaceClassifier, train, val: ValSet, margin: float, C: float) -> dict:
    from sklearn.linear_model import LogisticRegression

    clf.crop_margin = margin
    xtr = np.concatenate([clf.embed(load_rgb(f.image), np.array([f.box])) for f in train])
    ytr = np.array([CLASSES.index(f.label) for f in train])
    with torch.no_grad():
        x = val.inputs(margin)
        xva = torch.nn.functional.normalize(torch.cat([clf.net.features(x[i:i + 64]) for i in range(0, len(x), 64)]), dim=1).numpy()
    lr = LogisticRegression(C=C, max_iter=2000).fit(xtr, ytr)
    return val.score(lr.predict(xva))


def self_train(init, model, train, tr, val: ValSet, seed: int, k: int, epochs: int, met: dict, over: dict) -> dict:
    """Pseudo-label the unlabelled train faces with ``model``, keep the ``k`` most confident per
    predicted class, fine-tune again from ``init`` on labelled + pseudo-labelled faces."""
    t = time.perf_counter()
    chosen = {f.image for f in train}
    rest = [f for f in faces("awake_sleep", "train") if f.image not in chosen]
    x = torch.from_numpy(np.concatenate([face_batch(load_rgb(f.image), np.array([f.box]), model.crop_margin,
                                                    model.input_size) for f in rest]))
    with torch.no_grad():
        p = torch.cat([model.net(x[i:i + 64]).softmax(1) for i in range(0, len(x), 64)]).numpy()
    pred, conf = p.argmax(1), p.max(1)
    keep = []
    for c in range(len(CLASSES)):
        idx = np.where(pred == c)[0]
        keep += list(idx[np.argsort(-conf[idx])][:k])
    truth = np.array([CLASSES.index(rest[i].label) for i in keep])
    pseudo = [(load_rgb(rest[i].image), np.array(rest[i].box), int(pred[i])) for i in keep]
    model2, met2 = fine_tune(init, tr + pseudo, CLASSES, seed=seed, **dict(over, epochs=epochs))
    r = val.evaluate(model2)
    r["s"] = met["train_seconds"] + time.perf_counter() - t
    r["pseudo_acc"] = float((truth == pred[keep]).mean())
    r["pseudo_n"] = len(keep)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=40, help="labelled train images per seed")
    ap.add_argument("--config", action="append", default=None,
                    help="'default' or comma-separated key=value overrides of facemodels.classifier.RECIPE (repeatable)")
    ap.add_argument("--probe", action="store_true", help="also the linear-probe baseline")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--self-train", type=int, default=0, metavar="K",
                    help="also self-training: after each config's fine-tune, pseudo-label the rest of the train pool "
                         "(ground-truth boxes, no labels), keep the K most confident faces per class and fine-tune "
                         "again from the port on labelled + pseudo-labelled faces (--self-train-epochs)")
    ap.add_argument("--self-train-epochs", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = args.config or ["default"]
    init = FaceClassifier.load(default_classifier_path())
    val = ValSet()
    print(f"awake_sleep val: {len(val.y)} faces ({int(val.unseen.sum())} of unseen people); "
          f"{args.n} train images per seed, seeds {args.seeds}, {args.threads} thread(s)", flush=True)
    rows: dict[str, list] = {}
    for seed in args.seeds:
        train = pick_train(args.n, seed)
        tr = samples(train, CLASSES)
        counts = np.bincount([s[2] for s in tr], minlength=2)
        if args.probe:
            for m in (0.0, 0.2):
                for C in (1.0, 10.0):
                    name = f"linear probe (embed, margin={m}, C={C})"
                    t = time.perf_counter()
                    r = linear_probe(FaceClassifier.load(default_classifier_path()), train, val, m, C)
                    r["s"] = time.perf_counter() - t
                    rows.setdefault(name, []).append(r)
                    print(f"seed {seed} {name}: all {r['all']:.3f} unseen {r['unseen']:.3f} seen {r['seen']:.3f} ({r['s']:.1f} s)", flush=True)
        for cfg in configs:
            over = parse_config(cfg)
            model, met = fine_tune(init, tr, CLASSES, seed=seed, **over)
            r = val.evaluate(model)
            r["s"] = met["train_seconds"]
            rows.setdefault(cfg, []).append(r)
            if args.self_train:
                rs = self_train(init, model, train, tr, val, seed, args.self_train, args.self_train_epochs, met, over)
                rows.setdefault(f"{cfg} + self-training (K={args.self_train}, {args.self_train_epochs} epochs)", []).append(rs)
                print(f"seed {seed} [{cfg} + self-training]: all {rs['all']:.3f} unseen {rs['unseen']:.3f} seen "
                      f"{rs['seen']:.3f} (pseudo-labels right: {rs['pseudo_acc']:.3f} of {rs['pseudo_n']}) train "
                      f"{rs['s']:.1f} s in all", flush=True)
            print(f"seed {seed} n={len(tr)} (awake {counts[0]}, sleep {counts[1]}) [{cfg}]: all {r['all']:.3f} "
                  f"unseen {r['unseen']:.3f} seen {r['seen']:.3f} (flip TTA: {r['all_tta']:.3f} / {r['unseen_tta']:.3f} / "
                  f"{r['seen_tta']:.3f}) train {r['s']:.1f} s; loss {met['loss'][0]:.3f}->{met['loss'][-1]:.3f}",
                  flush=True)
    print("\n| configuration | val acc (all 238) | unseen people (75) | seen person (163) | all, flip TTA | train s (1 thread) |")
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        def ms(k):
            v = np.array([r[k] for r in rs])
            return f"{v.mean():.3f} ± {v.std():.3f}"
        tta = ms("all_tta") if "all_tta" in rs[0] else "-"
        print(f"| {name} | {ms('all')} | {ms('unseen')} | {ms('seen')} | {tta} | {np.mean([r['s'] for r in rs]):.1f} |")


if __name__ == "__main__":
    main()
