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

- :func:`bench_reference` retrains once on every pool image: the reference of the labels-to-target
  figure.
- :func:`labels_to_target` is active learning's headline figure, with the definition of
  :mod:`ml_worker.simulate` (``summarise``): the fewest labelled images whose figure (acceptance
  rate, or mAP50) reaches ``TARGET`` (95%) of the reference, on the mean curve over seeds and per
  seed, and its ratio to random's. The reference is the figure of the full-pool retrain
  (``reference.json``) or, without one, the best mean over every strategy and size of the run
  (then a strategy's labels-to-target only says which size reaches 95% of the best one).

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


def _bench_inputs(data: Path, out: Path, settings: Settings, init: Path | None, test_limit: int | None,
                  **update) -> tuple:
    """What every benchmark run starts from: ``(data, out, names, schema, init, settings, pool,
    test)``: the resolved YOLO folder, the output folder (made), its class names and label schema,
    the starting bundle (default: the shipped one), settings serving ``data`` as Label Studio's
    local-files root (plus ``update``), the train split's images (the pool) and the val split's
    samples (at most ``test_limit``)."""
    data = Path(data).resolve()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = folder_names(data)
    schema = schema_for(names)
    init = Path(init or settings.default_model_path)
    settings = settings.model_copy(update={"local_files_document_root": str(data), **update})
    pool = read_split(data, "train")
    test = _samples(read_split(data, "val", test_limit), names)
    return data, out, names, schema, init, settings, pool, test


def bench_accept(data: Path, sizes: list[int], seeds: list[int], out: Path, settings: Settings,
                 strategies: tuple[str, ...] = ("sampler", "random"), init: Path | None = None,
                 test_limit: int | None = None, on_row: Callable[[dict], None] | None = None,
                 query_batch: int = 0) -> dict:
    """Simulate a person labelling ``data``'s train split and accepting pre-labels on its val split.

    Args:
        data: YOLO folder (``images/{train,val}``, ``labels/``, ``data.yaml``).
        sizes: numbers of labelled images, increasing (0 = the shipped default as is).
        seeds: one run per seed (the random subsets and the training seed).
        strategies: ``"sampler"`` (the product's ``QUERY_STRATEGY``, rounds that score the pool with
            the previous round's model) and/or ``"random"``.
        init: the version every round starts from (default: the shipped default bundle).
        test_limit: evaluate on at most this many val images (default all).
        query_batch: the sampler picks ``max(query_batch, step)`` images a round and the first
            ``step`` (the size step) are labelled, as a person served the query batch in pick order
            labels its head before the next retrain re-picks it (``QUERY_BATCH_SIZE`` 20,
            ``RETRAIN_MIN_ANNOTATIONS`` 10 in the product); 0 = pick exactly ``step``.
    Writes: ``out/rounds.csv`` (one row per strategy, seed and size), ``out/summary.json``,
        ``out/acceptance.png``, and each round's bundle under ``out/models/``.
    Returns: ``{"rows": [...], "files": {...}}``.
    """
    from facemodels.detector import ModelCache
    from ml_worker.dataset import build_dataset
    from ml_worker.evaluation import evaluate_model
    from ml_worker.sampler import DEFAULT_QUERY_STRATEGY, USES_LABELLED
    from ml_worker.sampler import select as select_batch
    from ml_worker.training import refine_classifier, train_two_stage

    data, out, _names, schema, init, settings, pool, test = _bench_inputs(data, out, settings, init, test_limit)
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
                        model = cache.get(model_path)
                        unc, emb = _score_pool(model, [pool[i] for i in free], schema, settings)
                        # as ml_worker.scoring passes them: the labelled images' embeddings, for the
                        # strategies that place a batch away from what is labelled (typiclust, diverse_*)
                        lab_emb = (_score_pool(model, [pool[i] for i in labelled], schema, settings)[1]
                                   if labelled and strategy in USES_LABELLED else None)
                        picks = [free[i] for i in select_batch(strategy, unc, max(need, query_batch), embeddings=emb,
                                                               rng=rng, labelled_embeddings=lab_emb)][:need]
                    labelled += picks
                if size == 0:
                    if base_eval is None:
                        base_eval = evaluate_model(cache.get(init), test, schema, settings)
                    r = dict(base_eval)
                    train_s = train_cpu = 0.0
                else:
                    work = out / "work" / f"{how}_s{seed}_n{size}"
                    tasks = _tasks([pool[i] for i in labelled], data, schema, first_id=1)
                    ds = build_dataset(tasks, schema, work / "dataset", settings)
                    s_seed = settings.model_copy(update={"seed": seed})
                    t1, c1 = time.time(), time.process_time()
                    trained = train_two_stage(ds, schema, init, s_seed, work, seed=seed)
                    # the worker's second classifier pass after a promotion, as if this candidate were
                    # promoted (ml_worker.training.refine_classifier; None when CLASSIFIER_REFIT_EPOCHS=0)
                    refined = refine_classifier(trained, ds, schema, s_seed)
                    train_s = time.time() - t1
                    # CPU seconds of this process (all its threads): the retrain's cost with less
                    # dependence on what else loads a shared machine than the wall-clock seconds
                    train_cpu = time.process_time() - c1
                    dest = out / "models" / f"{how}_s{seed}_n{size}"
                    if dest.exists():
                        import shutil

                        shutil.rmtree(dest)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    trained["bundle"].parent.rename(dest)
                    model_path = dest / "bundle.json"
                    r = evaluate_model(cache.get(model_path), test, schema, settings)
                    if refined:
                        r = dict(r, refit_seconds=refined["seconds"])
                row = {"strategy": how if how == "random" else strategy, "seed": seed, "labels": size,
                       "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
                       "seconds": round(time.time() - t0, 1),
                       **{k: v for k, v in r.items() if not isinstance(v, dict)}}
                rows.append(row)
                if on_row:
                    on_row(row)
                _write(rows, out)
    return {"rows": rows, "files": _write(rows, out)}


#: Share of the reference a strategy must reach (``ml_worker.simulate``'s ``SimConfig.target``).
TARGET = 0.95
#: Figures the labels-to-target is computed for (keys of the rounds' rows).
TARGET_METRICS = ("acceptance_rate", "mAP50")


def bench_reference(data: Path, out: Path, settings: Settings, seed: int = 0, init: Path | None = None,
                    test_limit: int | None = None) -> dict:
    """Retrain once on every image of ``data``'s train split (the whole pool) and evaluate on val.

    The same path as a round of :func:`bench_accept` (the worker's dataset split, both stages from
    ``init``). Writes ``out/reference.json``: ``{"labels", "seed", "train_seconds", <evaluate_model
    figures>}``, and the bundle under ``out/models/reference``. Returns that dict.
    Raises: FileNotFoundError / ValueError for a missing folder or model.
    """
    from facemodels.detector import ModelCache
    from ml_worker.dataset import build_dataset
    from ml_worker.evaluation import evaluate_model
    from ml_worker.training import train_two_stage

    data, out, _names, schema, init, settings, pool, test = _bench_inputs(data, out, settings, init, test_limit,
                                                                          seed=seed)
    work = out / "work" / "reference"
    ds = build_dataset(_tasks(pool, data, schema, first_id=1), schema, work / "dataset", settings)
    t0 = time.time()
    trained = train_two_stage(ds, schema, init, settings, work, seed=seed)
    train_s = time.time() - t0
    dest = out / "models" / "reference"
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    trained["bundle"].parent.rename(dest)
    r = evaluate_model(ModelCache(settings.device).get(dest / "bundle.json"), test, schema, settings)
    ref = {"labels": len(pool), "seed": seed, "train_seconds": round(train_s, 1),
           **{k: v for k, v in r.items() if not isinstance(v, dict)}}
    (out / "reference.json").write_text(json.dumps(ref, indent=2))
    return ref


def labels_to_target(rows: list[dict], reference: dict | None = None, target: float = TARGET) -> dict:
    """Labels to reach ``target`` x the reference, per figure of :data:`TARGET_METRICS` and strategy.

    Args:
        rows: :func:`bench_accept` rows (``strategy``, ``seed``, ``labels`` and the figures).
        reference: the full-pool figures (:func:`bench_reference`); None = the best mean over
            strategies and sizes of ``rows``.
    Returns: ``{metric: {"reference", "reference_source" ("full pool (N labels)" or "best size"),
        "goal", "strategies": [...]}}``; each strategy's dict is
        :func:`ml_worker.simulate.summarise`'s (its ``*mAP50*`` keys hold the figure named by
        ``metric``): ``labels_to_target`` on the mean curve, ``labels_to_target_per_seed``,
        ``labels_mean``/``labels_std`` over the seeds that reach it, ``ratio_to_random`` (mean
        curve) and ``ratio_per_seed_mean``/``_std`` (seeds where both reach it). None where the
        target is not reached within the sizes run.
    """
    from ml_worker.simulate import summarise

    out = {}
    for metric in TARGET_METRICS:
        if reference is not None and metric in reference:
            ref, source = float(reference[metric]), f"full pool ({reference.get('labels', '?')} labels)"
        else:
            means: dict[tuple, list[float]] = {}
            for r in rows:
                means.setdefault((r["strategy"], int(r["labels"])), []).append(float(r[metric]))
            ref = max((float(np.mean(v)) for v in means.values()), default=0.0)
            source = "best size"
        mapped = [{"strategy": r["strategy"], "seed": int(r["seed"]), "n_labelled": int(r["labels"]),
                   "mAP50": float(r[metric])} for r in rows]
        out[metric] = {"reference": ref, "reference_source": source, "goal": target * ref,
                       "strategies": summarise(mapped, ref, target)}
    return out


def _labels_md(lt: dict, target: float = TARGET) -> str:
    """Markdown tables of :func:`labels_to_target`'s result."""
    na = lambda v: "not reached" if v is None else str(v)  # noqa: E731
    lines = []
    for metric, m in lt.items():
        lines += [f"**{metric}**: reference {m['reference']:.3f} ({m['reference_source']}); target = {target:.0%} "
                  f"of it = {m['goal']:.3f}.", "",
                  f"| picked by | labels to {target:.0%} (mean curve) | ratio to random | per seed | "
                  "mean ± std (seeds reaching) | ratio to random per seed (mean ± std, seeds where both reach) | "
                  f"{metric} at the largest size | mean over sizes, ratio to random |",
                  "|---|---|---|---|---|---|---|---|"]
        for o in m["strategies"]:
            ms = "-" if o["labels_mean"] is None else f"{o['labels_mean']} ± {o['labels_std']} ({o['seeds_reaching_target']})"
            rs = ("-" if o.get("ratio_per_seed_mean") is None
                  else f"{o['ratio_per_seed_mean']} ± {o['ratio_per_seed_std']} ({o['seeds_with_ratio']})")
            rr = "n/a" if o["ratio_to_random"] is None else str(o["ratio_to_random"])
            ar = "n/a" if o["auc_ratio_to_random"] is None else str(o["auc_ratio_to_random"])
            lines.append(f"| {o['strategy']} | {na(o['labels_to_target'])} | {rr} | {o['labels_to_target_per_seed']} | "
                         f"{ms} | {rs} | {o['final_mAP50_mean']:.3f} ± {o['final_mAP50_std']:.3f} | "
                         f"{o['mean_mAP50_over_rounds']:.3f}, {ar} |")
        lines.append("")
    return "\n".join(lines)


def _summary_md(agg: dict) -> str:
    """Markdown table of summary.json: one row per size and strategy, mean ± std over seeds."""
    cols = [("acceptance_rate", "accepted as is", 3), ("edits_per_image", "edits / image", 2), ("mAP50", "mAP50", 3),
            ("class_accuracy", "class accuracy (found faces)", 3), ("boxes_per_face", "boxes / face", 2),
            ("recall_iou30", "faces found (IoU ≥ 0.3)", 3), ("false_boxes_per_image", "false boxes / image", 2),
            ("train_seconds", "retrain (s)", 0)]
    lines = ["| labels | picked by | seeds | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    sizes = sorted({int(n) for by in agg.values() for n in by})
    for n in sizes:
        for strat, by in agg.items():
            if str(n) not in by:
                continue
            a = by[str(n)]
            cells = [f"{a[k]['mean']:.{d}f} ± {a[k]['std']:.{d}f}" for k, _, d in cols]
            lines.append(f"| {n} | {strat} | {a['acceptance_rate']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_rounds(path: Path) -> list[dict]:
    """Rows of a ``rounds.csv`` written by :func:`bench_accept` (numbers parsed).

    Raises: FileNotFoundError when missing; ValueError when it lacks the columns of the report.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no rounds.csv at {path} (run faceloop bench-accept first)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"strategy", "seed", "labels", *TARGET_METRICS}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path} is not a bench-accept rounds.csv (needs columns {sorted(need)})")
    out = []
    for r in rows:
        d = {}
        for k, v in r.items():
            try:
                d[k] = int(v) if k in ("seed", "labels") else (v if k == "strategy" else float(v))
            except ValueError:
                d[k] = v
        out.append(d)
    return out


def bench_report(out: Path) -> dict:
    """Rewrite the report of a bench-accept folder from its ``rounds.csv`` (and ``reference.json``
    when present): summary.json, labels_to_target.{json,md}, acceptance.png. Returns the files."""
    return _write(read_rounds(Path(out) / "rounds.csv"), Path(out))


def _write(rows: list[dict], out: Path) -> dict:
    """rounds.csv, summary.json / summary.md (mean and spread over seeds per strategy and size), acceptance.png,
    labels_to_target.json / .md (:func:`labels_to_target`, with ``out/reference.json`` if present)."""
    files = {"rounds_csv": out / "rounds.csv", "summary_json": out / "summary.json", "plot": out / "acceptance.png",
             "labels_to_target_json": out / "labels_to_target.json", "labels_to_target_md": out / "labels_to_target.md"}
    keys = list(dict.fromkeys(k for r in rows for k in r))  # rows of a refit run carry refit figures
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
    files["summary_md"] = out / "summary.md"
    files["summary_md"].write_text(_summary_md(agg))
    ref_file = out / "reference.json"
    reference = json.loads(ref_file.read_text()) if ref_file.is_file() else None
    lt = labels_to_target(rows, reference)
    files["labels_to_target_json"].write_text(json.dumps(lt, indent=2))
    files["labels_to_target_md"].write_text(_labels_md(lt))
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
        acc = lt["acceptance_rate"]
        if acc["reference"] > 0:
            axes[0].axhline(acc["reference"], color="grey", lw=1, label=f"{acc['reference_source']} {acc['reference']:.3f}")
            axes[0].axhline(acc["goal"], color="grey", lw=1, ls=":", label=f"{TARGET:.0%} of it")
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
