"""Evidence for the default model (issue 3): fine-tune on awake/sleep from it and from the yaml.

For each labelled-set size (nested random subsets of ``awake_sleep`` train, fixed seed) and each
starting point (``models/faceloop-base.pt`` vs ``yolov5nu.yaml``), fine-tune with the product's
:func:`ml_worker.training.fine_tune` and evaluate with :func:`ml_worker.training.evaluate` on
the validation split: all of it, the people seen in training (``Beastojenisto`` frames) and the
two people never seen in training (``Harish-Nedunuri``, ``AgufSamudra`` repositories), plus a
class-agnostic face-localisation mAP50 (``single_cls``) on the whole split.

Run: .venv/bin/python benchmarks/finetune_awake_sleep.py [--sizes 20 40 80] [--epochs 30]
Writes ``benchmarks/out/finetune_awake_sleep.csv`` and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.config import DEFAULT_MODEL_PATH, Settings  # noqa: E402
from backend.demo import dataset_names, label_file_for  # noqa: E402
from ml_worker.dataset import write_yolo_dataset  # noqa: E402
from ml_worker.training import BASE_YAML, evaluate, fine_tune  # noqa: E402

UNSEEN = ("Harish-Nedunuri/", "AgufSamudra/")


def _boxes(img: Path) -> list:
    lf = label_file_for(img)
    out = []
    for line in lf.read_text().splitlines() if lf.exists() else []:
        p = line.split()
        if len(p) == 5:
            out.append((float(p[1]), float(p[2]), float(p[3]), float(p[4]), int(p[0])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "awake_sleep")
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 40, 80])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--starts", nargs="+", default=["base", "yaml"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = ap.parse_args()
    if not (args.data / "data.yaml").exists():
        sys.exit(f"no dataset at {args.data}")
    work = args.out / "finetune_work"
    settings = Settings(var_dir=work / "var", imgsz=args.imgsz, train_epochs=args.epochs, train_batch=16)
    names = dataset_names(args.data)
    manifest = {row["file"]: row["source_repo"] for row in csv.DictReader(open(args.data / "manifest.csv"))}
    train = sorted((args.data / "images" / "train").glob("*.jpg"))
    val = sorted((args.data / "images" / "val").glob("*.jpg"))
    order = train[:]
    random.Random(args.seed).shuffle(order)
    unseen = [p for p in val if manifest.get(f"images/val/{p.name}", "").startswith(UNSEEN)]
    seen = [p for p in val if p not in set(unseen)]
    evals = {}
    for tag, imgs in (("all", val), ("seen", seen), ("unseen", unseen)):
        evals[tag] = write_yolo_dataset(work / f"val_{tag}", names, [("val", p.stem, p, _boxes(p)) for p in imgs]
                                        + [("train", p.stem, p, _boxes(p)) for p in imgs[:1]])
    one = write_yolo_dataset(work / "val_faces", ["face"],
                             [("val", p.stem, p, [b[:4] + (0,) for b in _boxes(p)]) for p in val]
                             + [("train", val[0].stem, val[0], [b[:4] + (0,) for b in _boxes(val[0])])])
    rows = []
    for n in args.sizes:
        subset = order[:n]
        # per-epoch validation (which picks best.pt) on the labelled images themselves: the val
        # split that is reported must not choose the weights
        small_val = subset
        y = write_yolo_dataset(work / f"train_{n}", names, [("train", p.stem, p, _boxes(p)) for p in subset]
                               + [("val", p.stem, p, _boxes(p)) for p in small_val])
        for start in args.starts:
            init = DEFAULT_MODEL_PATH if start == "base" else BASE_YAML
            t0 = time.time()
            best = fine_tune(init, y, work / f"run_{start}_{n}", settings)
            secs = time.time() - t0
            row = {"start": start, "n_labelled": n, "epochs": args.epochs, "imgsz": args.imgsz, "train_s": round(secs, 1)}
            for tag, yml in evals.items():
                m = evaluate(best, yml, work / f"run_{start}_{n}", settings, name=f"val_{tag}")
                row[f"mAP50_{tag}"] = round(m["mAP50"], 4)
                row[f"mAP50-95_{tag}"] = round(m["mAP50-95"], 4)
            # class-agnostic localisation: evaluate the 2-class model as one "face" class
            from ultralytics import YOLO

            mm = YOLO(str(best)).val(data=str(one), split="val", imgsz=args.imgsz, single_cls=True, verbose=False,
                                     plots=False, project=str(work / f"run_{start}_{n}"), name="val_faces",
                                     exist_ok=True, workers=0, device="cpu")
            row["face_mAP50_all"] = round(float(mm.box.map50), 4)
            rows.append(row)
            print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "finetune_awake_sleep.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\n{'start':6} {'n':>4} {'mAP50 all':>10} {'seen':>7} {'unseen':>7} {'mAP50-95':>9} {'faces':>7} {'train s':>8}")
    for r in rows:
        print(f"{r['start']:6} {r['n_labelled']:4d} {r['mAP50_all']:10.3f} {r['mAP50_seen']:7.3f} {r['mAP50_unseen']:7.3f} "
              f"{r['mAP50-95_all']:9.3f} {r['face_mAP50_all']:7.3f} {r['train_s']:8.0f}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
