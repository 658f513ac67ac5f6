"""Image-level Choices on awake/sleep: how well the classifier learns from a person's choices.

A simulated person labels N awake_sleep train images with the class of the image's largest
ground-truth face (the rule faceloop serves by, docs/label_configs.md). The worker's own code
builds the Choices dataset (the shipped detector finds the faces), fine-tunes the classifier
only, and the new version is scored through the serving path on held-out val images: image
accuracy (right choice / images), images without a choice, and how often the face the choice
came from is the ground truth's largest face (IoU >= 0.5).

Run: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/choices_awake_sleep.py
[--sizes 20,40] [--test 120] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageOps

from backend.config import DEFAULT_MODEL_PATH, LABEL_CONFIG_DIR, REPO_ROOT, Settings
from backend.demo import dataset_names, ground_truth_boxes
from backend.labels import ProjectSchema
from backend.lsapi import SnapshotTask

DATA = REPO_ROOT.parent / "shared" / "data" / "awake_sleep"


def main_truth(img: Path, names):
    boxes, _, _ = ground_truth_boxes(img, names)
    return max(boxes, key=lambda b: (b.x2 - b.x1) * (b.y2 - b.y1)) if boxes else None


def score(model, files, schema, settings, names):
    from backend.predict import analyse_choice, pre_annotation_threshold
    from ml_worker.evaluation import iou_matrix

    thr = pre_annotation_threshold(schema, settings, model)
    right = chosen = same_face = n = 0
    for f in files:
        gt = main_truth(f, names)
        if gt is None:
            continue
        with Image.open(f) as im:
            arr = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        det = model.detect([arr], conf=min(settings.candidate_threshold, thr), imgsz=settings.imgsz)[0]
        _, face, _ = analyse_choice(det, schema, model.names, thr)
        n += 1
        if face is None:
            continue
        chosen += 1
        right += face.label == gt.label
        same_face += float(iou_matrix([face.box], [gt.xyxy])[0, 0]) >= 0.5
    return {"images": n, "accuracy": right / n, "with_choice": chosen / n, "main_face_matches_gt": same_face / max(chosen, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20,40")
    ap.add_argument("--test", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from facemodels.detector import ModelCache
    from ml_worker.dataset import build_dataset
    from ml_worker.evaluation import evaluate_choices
    from ml_worker.training import train_two_stage

    schema = ProjectSchema.parse((LABEL_CONFIG_DIR / "awake_sleep_choices.xml").read_text())
    names = dataset_names(DATA)
    rng = np.random.default_rng(args.seed)
    pool = sorted((DATA / "images" / "train").glob("*.jpg"))
    test = sorted((DATA / "images" / "val").glob("*.jpg"))
    test = [test[i] for i in sorted(rng.choice(len(test), min(args.test, len(test)), replace=False))]
    cache = ModelCache()
    work = Path(tempfile.mkdtemp(prefix="choices-bench-"))
    settings = Settings(var_dir=work, database_url=f"sqlite:///{work / 'db.sqlite'}", local_files_document_root=str(DATA))
    out = {"test_images": len(test), "base": score(cache.get(DEFAULT_MODEL_PATH), test, schema, settings, names)}
    print("base", out["base"], flush=True)
    order = rng.permutation(len(pool))
    for n in [int(x) for x in args.sizes.split(",")]:
        files = [pool[i] for i in order[:n]]
        tasks = [SnapshotTask(id=1000 + i, data={"image": "/data/local-files/?d=" + quote(str(f.relative_to(DATA)))},
                              result=[schema.choice_region(main_truth(f, names).label)])
                 for i, f in enumerate(files) if main_truth(f, names) is not None]
        t0 = time.time()
        ds = build_dataset(tasks, schema, work / f"ds{n}", settings, model=cache.get(DEFAULT_MODEL_PATH))
        trained = train_two_stage(ds, schema, DEFAULT_MODEL_PATH, settings, work / f"job{n}", seed=args.seed)
        secs = time.time() - t0
        model = cache.get(trained["bundle"])
        val = [(s.image, schema.labels[s.label]) for s in ds.samples if s.split == "val"]
        gate_val = evaluate_choices(model, val, schema, settings)
        r = {"labelled": len(tasks), "no_face_in_labelled": len(ds.no_face), "train_seconds": round(secs, 1),
             "gate_val_images": len(val), "gate_val_accuracy": round(gate_val["accuracy"], 3),
             "test": score(model, test, schema, settings, names)}
        out[f"n{n}"] = r
        print(n, r, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
