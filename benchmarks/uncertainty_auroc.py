"""Do the uncertainty measures point at the images the model gets wrong? (issue 4 diagnosis)

For a few rounds of the ``random`` strategy of the active-learning simulation (the same nested
random labelled sets, the same training runs: pass the simulation's work dir and they are reused
from its cache), the round's model predicts every still-unlabelled pool image, and each image is
marked **wrong** when a ground-truth face has no shown box (confidence >= the label config's
threshold) with IoU >= 0.5 and the right class, or a shown box matches no face. Each measure's
AUROC for telling wrong images from right ones is printed (0.5 = no better than random order,
below 0.5 = ranks right images first), with the error rate of its top-``b`` images (the query
batch) and the sources those come from.

Measures, all per image from the best box (the highest confidence ``c``):

- the product's (``backend.uncertainty``, what the sampler ranks by): joint ``1 - c (1 - u)``
  with ``u`` least-confidence / margin / entropy of the class scores normalised over the
  project's classes, aggregated with ``max`` over the shown boxes;
- ``class_entropy_only``: the previous rule, class entropy of the normalised scores, raised to
  ``1 - c`` only when no box is shown (kept to show why it was replaced);
- ``detection_only``: ``1 - c``.

Run: .venv/bin/python benchmarks/uncertainty_auroc.py --work /tmp/sim/work [--rounds 0 1 3 5]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.config import DEFAULT_MODEL_PATH  # noqa: E402
from backend.geometry import iou  # noqa: E402
from backend.hashing import file_sha256  # noqa: E402
from backend.labels import ProjectSchema  # noqa: E402
from backend.uncertainty import MEASURE_FUNCS, MEASURES, normalise  # noqa: E402
from ml_worker.simulate import (DEFAULT_DATA, DEFAULT_LABEL_CONFIG, SimConfig, load_data, query,  # noqa: E402
                                seed_order, train_and_evaluate, write_dataset)


def _wrong(gts: list[tuple], shown: list[tuple]) -> bool:
    """``gts``/``shown``: ``(x1, y1, x2, y2, class)`` in pixels. True when a face is missed or
    mislabelled, or a shown box matches no face (IoU 0.5)."""
    hit = [any(iou(s[:4], g[:4]) >= 0.5 and s[4] == g[4] for s in shown) for g in gts]
    spurious = [not any(iou(s[:4], g[:4]) >= 0.5 for g in gts) for s in shown]
    return not all(hit) or any(spurious)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="work dir (the simulation's, to reuse its runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, nargs="+", default=[0, 1, 3, 5])
    ap.add_argument("--init", type=Path, default=DEFAULT_MODEL_PATH)
    args = ap.parse_args()
    from sklearn.metrics import roc_auc_score

    from facemodels.detector import FaceModel

    cfg = SimConfig(init_weights=args.init, seeds=(args.seed,)).check()
    work = args.work.resolve()
    settings = cfg.settings(work)
    schema = ProjectSchema.parse(Path(DEFAULT_LABEL_CONFIG).read_text())
    threshold = schema.score_threshold if schema.score_threshold is not None else settings.score_threshold
    data = load_data(DEFAULT_DATA, schema)
    init_sha = file_sha256(args.init)
    init = work / "init" / f"{init_sha[:16]}.pt"
    if not init.exists():
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_bytes(Path(args.init).read_bytes())
    test_yaml = write_dataset(work / "test_dataset", data.names, [], data.test)
    order = seed_order(len(data.pool), args.seed)
    labelled, rest = list(order[: cfg.k]), list(order[cfg.k:])
    val = [data.pool[i] for i in labelled]
    from PIL import Image, ImageOps

    for rnd in range(max(args.rounds) + 1):
        if rnd > 0:  # the random strategy's picks, exactly as the simulation draws them
            picks, _ = query("random", [data.pool[i] for i in rest], cfg.b, args.seed, rnd, None, schema, settings)
            chosen = [rest[p] for p in picks]
            labelled += chosen
            rest = [i for i in rest if i not in set(chosen)]
        if rnd not in args.rounds:
            continue
        res = train_and_evaluate([data.pool[i] for i in labelled], val, data, test_yaml, settings, init, init_sha,
                                 args.seed, work)
        model = FaceModel(res.weights, settings.device)
        pool = [data.pool[i] for i in rest]
        imgs = [np.asarray(ImageOps.exif_transpose(Image.open(x.path)).convert("RGB")) for x in pool]
        dets = model.detect(imgs, conf=settings.candidate_threshold, imgsz=settings.imgsz, batch=32)
        lmap = schema.label_map(model.names)
        idx = sorted(lmap)
        scores: dict[str, list[float]] = {f"joint_{m}": [] for m in MEASURES}
        scores.update(class_entropy_only=[], detection_only=[])
        wrong, source = [], []
        from backend.predict import analyse

        for x, d in zip(pool, dets):
            W, H = d.width, d.height
            gts = [((cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H, c) for cx, cy, w, h, c in x.boxes]
            shown = [(*t.box, schema.labels.index(lmap[idx[int(np.argmax(t.class_scores[idx]))]]))
                     for t in d.detections if t.class_scores[idx].max() >= threshold]
            wrong.append(_wrong(gts, shown))
            source.append(x.id.split("_")[0])
            _, unc = analyse(d, schema, model.names, threshold, "max")
            for m in MEASURES:
                scores[f"joint_{m}"].append(unc.get(m))
            if d.detections:
                s = d.detections[0].class_scores[idx]
                c = float(s.max())
                ent = float(MEASURE_FUNCS["entropy"](normalise(s[None]))[0])
            else:
                c, ent = 0.0, 1.0
            scores["class_entropy_only"].append(ent if c >= threshold else max(ent, 1 - c))
            scores["detection_only"].append(1 - c)
        y = np.array(wrong, dtype=int)
        print(f"\nround {rnd}: {len(labelled)} labels, test mAP50 {res.metrics['mAP50']:.3f}; "
              f"{len(pool)} unlabelled, {y.mean():.0%} wrong")
        print(f"{'measure':20s} AUROC  top-{cfg.b} wrong  top-{cfg.b} sources")
        for name, v in scores.items():
            v = np.asarray(v)
            top = np.lexsort((np.arange(len(v)), -v))[: cfg.b]
            auc = roc_auc_score(y, v) if 0 < y.sum() < len(y) else float("nan")
            print(f"{name:20s} {auc:.3f}  {y[top].mean():.2f}         "
                  + ", ".join(f"{k} {n}" for k, n in Counter(source[i] for i in top).most_common()))


if __name__ == "__main__":
    main()
