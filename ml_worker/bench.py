"""The product's headline benchmark: how many pre-labels would a person accept?

- :func:`evaluate_folder` scores any model version (a two-stage bundle ``.json`` or YOLO ``.pt``)
  on a labelled YOLO folder through the product's prediction path
  (:func:`ml_worker.evaluation.evaluate_model`), classes mapped by name; classes the folder lacks
  are never predicted (the label config is built from the folder's class names).
- :func:`bench_accept` simulates a person labelling a project: for each number of labels (chosen
  by the product's sampler, and at random), it retrains through the worker's own code
  (:func:`ml_worker.dataset.build_dataset` reading the images as ``/data/local-files`` tasks,
  :func:`ml_worker.training.train_two_stage`) from the shipped default, then predicts the held-out
  images and counts what a person does with each face (:mod:`ml_worker.evaluation`).

On awake_sleep the pool is the train split and the test set is the val split, whose people are
never seen in the pool (../shared/data/README.md).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import numpy as np
import yaml

from backend.config import Settings
from backend.labels import Box, ProjectSchema


def folder_names(folder: Path) -> list[str]:
    """Class names of a YOLO folder's ``data.yaml`` in index order.

    Raises: FileNotFoundError when ``data.yaml`` is missing; ValueError when it has no names.
    """
    y = Path(folder) / "data.yaml"
    if not y.is_file():
        raise FileNotFoundError(f"no data.yaml in {folder} (expected a YOLO folder: images/, labels/, data.yaml)")
    names = yaml.safe_load(y.read_text()).get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not names:
        raise ValueError(f"{y} names no classes")
    return [str(n) for n in names]


def schema_for(names: list[str]) -> ProjectSchema:
    """A RectangleLabels label config whose labels are ``names`` (what a project of that folder has)."""
    labels = "".join(f'<Label value="{n}"/>' for n in names)
    xml = (f'<View><Image name="image" value="$image"/><RectangleLabels name="face" toName="image">{labels}'
           f"</RectangleLabels></View>")
    return ProjectSchema.parse(xml)


@dataclass
class LabelledImage:
    """An image of a YOLO folder: its path, size in pixels, and boxes ``(x1, y1, x2, y2, class)`` in pixels."""

    path: Path
    width: int
    height: int
    boxes: list[tuple[float, float, float, float, int]]


def read_split(folder: Path, split: str, limit: int | None = None) -> list[LabelledImage]:
    """The labelled images of ``images/<split>`` (boxes from ``labels/<split>/*.txt``), sorted by name.

    Raises: FileNotFoundError when the split folder is missing or holds no image.
    """
    from PIL import Image

    img_dir = Path(folder) / "images" / split
    files = sorted(p for p in img_dir.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")) if img_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no images under {img_dir}")
    if limit:
        files = files[:: max(1, len(files) // limit)][:limit]
    out = []
    for f in files:
        with Image.open(f) as im:
            w, h = im.size
        lab = Path(folder) / "labels" / split / f"{f.stem}.txt"
        boxes = []
        if lab.exists():
            for line in lab.read_text().splitlines():
                parts = line.split()
                if len(parts) == 5:
                    c, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:])
                    boxes.append(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h, c))
        out.append(LabelledImage(f, w, h, boxes))
    return out


def _samples(images: list[LabelledImage], names: list[str]):
    from PIL import Image, ImageOps

    from ml_worker.evaluation import GTFace

    out = []
    for li in images:
        with Image.open(li.path) as im:
            arr = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        out.append((arr, [GTFace(tuple(b[:4]), names[b[4]]) for b in li.boxes]))
    return out


def evaluate_folder(model_path: Path, folder: Path, split: str, settings: Settings, limit: int | None = None) -> dict:
    """Evaluate a model version on a labelled YOLO folder (see module docstring).

    Returns: :func:`ml_worker.evaluation.evaluate_model`'s figures plus ``model``, ``folder``, ``split``.
    Raises: FileNotFoundError / ValueError for a missing model or folder.
    """
    from facemodels.detector import ModelCache

    names = folder_names(folder)
    model = ModelCache(settings.device).get(model_path)
    from ml_worker.evaluation import evaluate_model

    r = evaluate_model(model, _samples(read_split(folder, split, limit), names), schema_for(names), settings)
    return {"model": str(model_path), "folder": str(folder), "split": split, **r}


def _tasks(images: list[LabelledImage], folder: Path, schema: ProjectSchema, first_id: int):
    """Images as annotated Label Studio tasks (``/data/local-files/?d=`` URLs under ``folder``)."""
    from backend.lsapi import SnapshotTask

    tasks = []
    for i, li in enumerate(images):
        result = [schema.region(Box(*b[:4], label=schema.labels[b[4]]), li.width, li.height) for b in li.boxes]
        rel = li.path.resolve().relative_to(Path(folder).resolve())
        tasks.append(SnapshotTask(id=first_id + i, data={"image": f"/data/local-files/?d={quote(str(rel))}"},
                                  result=result))
    return tasks


def _score_pool(model, pool: list[LabelledImage], schema: ProjectSchema, settings: Settings):
    """Uncertainty (every measure) and embeddings of pool images, as the scoring station computes them."""
    from PIL import Image, ImageOps

    from backend.predict import analyse, pre_annotation_threshold

    thr = pre_annotation_threshold(schema, settings, model)
    unc = {m: [] for m in ("least_confidence", "margin", "entropy")}
    emb = []
    for start in range(0, len(pool), 32):
        arrs = []
        for li in pool[start : start + 32]:
            with Image.open(li.path) as im:
                arrs.append(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
        for det in model.detect(arrs, conf=min(settings.candidate_threshold, thr), imgsz=settings.imgsz, embed=True):
            _, u = analyse(det, schema, model.names, thr, settings.aggregation)
            for m in unc:
                unc[m].append(u.get(m))
            emb.append(det.embedding)
    return {m: np.asarray(v) for m, v in unc.items()}, np.stack(emb)


def bench_accept(data: Path, sizes: list[int], seeds: list[int], out: Path, settings: Settings,
                 strategies: tuple[str, ...] = ("sampler", "random"), init: Path | None = None,
                 test_limit: int | None = None, on_row: Callable[[dict], None] | None = None) -> dict:
    """Simulate a person labelling ``data``'s train split and accepting pre-labels on its val split.

    Args:
        data: YOLO folder (``images/{train,val}``, ``labels/``, ``data.yaml``).
        sizes: numbers of labelled images, increasing (0 = the shipped default as is).
        seeds: one run per seed (the random subsets and the training seed).
        strategies: ``"sampler"`` (the product's ``QUERY_STRATEGY``, rounds that score the pool with
            the previous round's model) and/or ``"random"``.
        init: the version every round starts from (default: the shipped default bundle).
        test_limit: evaluate on at most this many val images (default all).
    Writes: ``out/rounds.csv`` (one row per strategy, seed and size), ``out/summary.json``,
        ``out/acceptance.png``, and each round's bundle under ``out/models/``.
    Returns: ``{"rows": [...], "files": {...}}``.
    """
    from facemodels.detector import ModelCache
    from ml_worker.dataset import build_dataset
    from ml_worker.evaluation import evaluate_model
    from ml_worker.sampler import DEFAULT_QUERY_STRATEGY
    from ml_worker.sampler import select as select_batch
    from ml_worker.training import train_two_stage

    data = Path(data).resolve()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = folder_names(data)
    schema = schema_for(names)
    init = Path(init or settings.default_model_path)
    settings = settings.model_copy(update={"local_files_document_root": str(data)})
    pool = read_split(data, "train")
    test = _samples(read_split(data, "val", test_limit), names)
    strategy = settings.query_strategy or DEFAULT_QUERY_STRATEGY
    sizes = sorted(set(int(s) for s in sizes))
    rows: list[dict] = []
    cache = ModelCache(settings.device)
    base_eval = None
    for seed in seeds:
        for how in strategies:
            rng = np.random.default_rng(seed)
            labelled: list[int] = []
            model_path = init
            for size in sizes:
                t0 = time.time()
                need = size - len(labelled)
                if need > 0:
                    free = [i for i in range(len(pool)) if i not in set(labelled)]
                    if how == "random":
                        picks = [free[i] for i in rng.choice(len(free), size=need, replace=False)]
                    else:
                        unc, emb = _score_pool(cache.get(model_path), [pool[i] for i in free], schema, settings)
                        picks = [free[i] for i in select_batch(strategy, unc, need, embeddings=emb, rng=rng)]
                    labelled += picks
                if size == 0:
                    if base_eval is None:
                        base_eval = evaluate_model(cache.get(init), test, schema, settings)
                    r = dict(base_eval)
                    train_s = 0.0
                else:
                    work = out / "work" / f"{how}_s{seed}_n{size}"
                    tasks = _tasks([pool[i] for i in labelled], data, schema, first_id=1)
                    ds = build_dataset(tasks, schema, work / "dataset", settings)
                    s_seed = settings.model_copy(update={"seed": seed})
                    t1 = time.time()
                    trained = train_two_stage(ds, schema, init, s_seed, work, seed=seed)
                    train_s = time.time() - t1
                    dest = out / "models" / f"{how}_s{seed}_n{size}"
                    if dest.exists():
                        import shutil

                        shutil.rmtree(dest)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    trained["bundle"].parent.rename(dest)
                    model_path = dest / "bundle.json"
                    r = evaluate_model(cache.get(model_path), test, schema, settings)
                row = {"strategy": how if how == "random" else strategy, "seed": seed, "labels": size,
                       "train_seconds": round(train_s, 1), "seconds": round(time.time() - t0, 1),
                       **{k: v for k, v in r.items() if not isinstance(v, dict)}}
                rows.append(row)
                if on_row:
                    on_row(row)
                _write(rows, out)
    return {"rows": rows, "files": _write(rows, out)}


def _write(rows: list[dict], out: Path) -> dict:
    """rounds.csv, summary.json (mean and spread over seeds per strategy and size), acceptance.png."""
    files = {"rounds_csv": out / "rounds.csv", "summary_json": out / "summary.json", "plot": out / "acceptance.png"}
    keys = list(rows[0])
    with open(files["rounds_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    summary: dict = {}
    for r in rows:
        summary.setdefault(r["strategy"], {}).setdefault(str(r["labels"]), []).append(r)
    agg = {}
    for strat, by_size in summary.items():
        agg[strat] = {}
        for size, rs in by_size.items():
            agg[strat][size] = {k: {"mean": float(np.mean([x[k] for x in rs])), "std": float(np.std([x[k] for x in rs])),
                                    "n": len(rs)}
                                for k in ("acceptance_rate", "edits_per_image", "mAP50", "face_mAP50",
                                          "class_accuracy", "boxes_per_face", "recall_iou30",
                                          "false_boxes_per_image", "train_seconds")}
    files["summary_json"].write_text(json.dumps(agg, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for strat, by_size in agg.items():
            xs = sorted(by_size, key=int)
            for ax, k in zip(axes, ("acceptance_rate", "edits_per_image")):
                m = [by_size[x][k]["mean"] for x in xs]
                sd = [by_size[x][k]["std"] for x in xs]
                ax.errorbar([int(x) for x in xs], m, yerr=sd, marker="o", capsize=3, label=strat)
        axes[0].set_ylabel("pre-labels accepted as is (share of faces)")
        axes[1].set_ylabel("edits per image")
        for ax in axes:
            ax.set_xlabel("labelled images")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(files["plot"], dpi=110)
        plt.close(fig)
    except Exception:  # pragma: no cover - plotting is a convenience
        files.pop("plot")
    return files
