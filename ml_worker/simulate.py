"""Active-learning simulation: the faceloop loop without Label Studio, on a labelled data set.

The product's own parts do the work: :func:`ml_worker.training.fine_tune` and
:func:`ml_worker.training.evaluate` train and measure, :func:`backend.predict.predict_tasks`
(``FaceModel.detect`` + :func:`backend.predict.analyse`, with the project's label config so the
class mapping is the product's) scores the unlabelled pool, and :func:`ml_worker.sampler.select`
picks the query batch. Labelling is simulated by revealing the ground-truth YOLO labels.

Protocol (per seed ``s`` and strategy):

1. round 0: a random seed set of ``k`` pool images (the same for every strategy of a seed);
2. each round: fine-tune **from the initial weights** (the project's default model) on every image
   labelled so far, evaluate on the fixed test split (mAP50, mAP50-95);
3. score the rest of the pool with that round's model, let the strategy pick ``b`` images, reveal
   their labels, go to 2; stop after ``rounds`` query rounds (``k + rounds * b`` labels).

By default fine-tuning restarts from the initial weights each round (not from the previous round's
model), so a round's model depends only on *which* images are labelled, never on the path that led
there; the strategies are compared on their selections alone (``warm_start`` continues from the
previous round's weights instead, as the product does from its promoted version). A full-pool reference run (the same recipe on
every pool image) sets the target: the labels a strategy needs to reach 95% of its mAP50.

Training runs are content-addressed: a run is keyed by the training code, the initial weights'
sha256, the labelled ids, the test ids and the training settings, and its result is stored under
``<work>/train/<key>/``. Round 0 is therefore trained once per seed and shared by all strategies,
and an interrupted simulation resumes where it stopped.

Outputs (``out_dir``): ``rounds.csv`` (one row per strategy, seed and round), ``learning_curves.png``
(mAP50 against labelled images, mean and std band over seeds, one line per strategy),
``summary.csv`` and ``summary.md`` (labels to reach the target per strategy and their ratio to
random), ``config.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote

import numpy as np

from backend.hashing import file_sha256
from backend.config import LABEL_CONFIG_DIR, REPO_ROOT, SINGLE_STAGE_BASE_PATH, Settings
from backend.labels import ProjectSchema
from backend.uncertainty import AGGREGATIONS, MEASURES
from ml_worker.sampler import STRATEGIES, USES_LABELLED, select, strategy_measure

log = logging.getLogger("faceloop.simulate")

SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()
DEFAULT_DATA = SHARED_DATA / "awake_sleep"
DEFAULT_LABEL_CONFIG = LABEL_CONFIG_DIR / "awake_sleep.xml"
#: Columns of ``rounds.csv``.
ROUND_COLUMNS = ["strategy", "seed", "round", "n_labelled", "mAP50", "mAP50-95", "precision", "recall",
                 "selected", "selected_uncertainty", "seconds", "score_s", "train_s", "eval_s", "cached"]
#: Columns of ``summary.csv``.
SUMMARY_COLUMNS = ["strategy", "labels_to_target", "ratio_to_random", "labels_to_target_per_seed",
                   "seeds_reaching_target", "labels_mean", "labels_std", "final_mAP50_mean", "final_mAP50_std",
                   "mean_mAP50_over_rounds", "auc_ratio_to_random", "ratio_per_seed_mean", "ratio_per_seed_std",
                   "seeds_with_ratio"]
#: Images scored per ``predict_tasks`` call (as in ``ml_worker.scoring``).
SCORE_CHUNK = 32


# --- data ---------------------------------------------------------------------------------------

@dataclass
class LabelledImage:
    """One image of a YOLO-layout data set with its ground truth.

    Attributes:
        id: the file stem (unique in a split), used as the image id in selections.
        path: the image file, read in place.
        rel: the path relative to the data set folder (``images/train/x.jpg``).
        boxes: ``(cx, cy, w, h, class_index)``, normalised 0-1, class index in the project's
            label order (:attr:`ProjectSchema.labels`).
    """

    id: str
    path: Path
    rel: str
    boxes: list[tuple[float, float, float, float, int]] = field(default_factory=list)


@dataclass
class SimData:
    """A labelled pool and a fixed test split, classes in the project's label order.

    Attributes:
        folder: the data set folder (``images/``, ``labels/``, ``data.yaml``).
        names: class names in the project's order (``schema.labels``).
        pool: images whose labels are revealed when selected.
        test: the fixed test split.
    """

    folder: Path
    names: list[str]
    pool: list[LabelledImage]
    test: list[LabelledImage]


def read_split(folder: Path, split: str, dataset_names: list[str], schema: ProjectSchema) -> list[LabelledImage]:
    """Read ``folder/images/<split>`` and its YOLO labels ``folder/labels/<split>/<stem>.txt``.

    Args:
        folder: YOLO-layout data set folder.
        split: ``train`` or ``val`` (any folder under ``images/``).
        dataset_names: the data set's class names in its own index order (``data.yaml``).
        schema: the project's label config; data set classes are mapped to its labels by name.
    Returns: images sorted by id. An image without a label file has no boxes (background).
    Raises: FileNotFoundError (no such split), ValueError (a class the label config lacks, or a
        malformed label line).
    """
    from backend.demo import label_file_for
    from backend.lsapi import IMAGE_SUFFIXES

    img_dir = Path(folder) / "images" / split
    if not img_dir.is_dir():
        raise FileNotFoundError(f"no split {split!r} at {img_dir}")
    to_project = {}
    for i, name in enumerate(dataset_names):
        try:
            to_project[i] = schema.class_index(name)
        except KeyError as e:
            raise ValueError(f"data set class {name!r} is not a label of the project ({schema.labels})") from e
    out = []
    for p in sorted(x for x in img_dir.iterdir() if x.suffix.lower() in IMAGE_SUFFIXES):
        lf = label_file_for(p)
        boxes = []
        for n, line in enumerate(lf.read_text().splitlines() if lf.exists() else [], 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 5 or int(parts[0]) not in to_project:
                raise ValueError(f"{lf}:{n}: expected 'class cx cy w h' with a known class, got {line!r}")
            cx, cy, w, h = map(float, parts[1:])
            boxes.append((cx, cy, w, h, to_project[int(parts[0])]))
        out.append(LabelledImage(p.stem, p, p.relative_to(folder).as_posix(), boxes))
    ids = [x.id for x in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate image stems in {img_dir}")
    return out


def subsample(items: list, n: int | None, seed: int) -> list:
    """``n`` items drawn without replacement by ``default_rng(seed)``, in their original order
    (all of them when ``n`` is None or not smaller)."""
    if n is None or n >= len(items):
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[int(i)] for i in keep]


def load_data(folder: Path, schema: ProjectSchema, pool_split: str = "train", test_split: str = "val",
              pool_size: int | None = None, test_size: int | None = None, subsample_seed: int = 0) -> SimData:
    """Load a YOLO-layout data set in place: the pool from ``pool_split``, the test split from
    ``test_split`` (both optionally subsampled to ``pool_size`` / ``test_size`` images by a fixed
    seed). Raises FileNotFoundError when ``folder/data.yaml`` is missing."""
    from backend.demo import dataset_names

    folder = Path(folder).resolve()
    if not (folder / "data.yaml").exists():
        raise FileNotFoundError(f"no YOLO data set at {folder} (expected data.yaml, images/, labels/)")
    names = dataset_names(folder)
    pool = subsample(read_split(folder, pool_split, names, schema), pool_size, subsample_seed)
    test = subsample(read_split(folder, test_split, names, schema), test_size, subsample_seed + 1)
    if not pool or not test:
        raise ValueError(f"empty pool ({len(pool)}) or test split ({len(test)}) in {folder}")
    return SimData(folder, list(schema.labels), pool, test)


def write_dataset(out_dir: Path, names: list[str], train: list[LabelledImage], val: list[LabelledImage]) -> Path:
    """A YOLO data set of symlinks to the images (labels written) via the product's
    :func:`ml_worker.dataset.write_yolo_dataset`; returns its ``data.yaml``. ultralytics' label
    caches land in ``out_dir``, never beside the shared data."""
    from ml_worker.dataset import write_yolo_dataset

    items = [("train", x.id, x.path, x.boxes) for x in train] + [("val", x.id, x.path, x.boxes) for x in val]
    return write_yolo_dataset(Path(out_dir), names, items)


# --- configuration ------------------------------------------------------------------------------

@dataclass
class SimConfig:
    """Settings of one simulation.

    Attributes:
        data: YOLO-layout data set (pool = ``pool_split``, test = ``test_split``).
        label_config: the project's label config (classes and score threshold).
        init_weights: weights every round is fine-tuned from (the project's default model).
        strategies: names from :data:`ml_worker.sampler.STRATEGIES`; ``random`` is always added.
        seeds: one seed set and one training seed per seed.
        k: seed-set size (images labelled at round 0).
        b: query batch size (images labelled per round).
        rounds: query rounds after round 0 (budget ``k + rounds * b`` labels).
        epochs, imgsz, train_batch: training recipe (epochs per round, pixels, images per batch;
            the product's ``TRAIN_BATCH`` by default, one optimizer step per batch).
        aggregation: how box uncertainties make an image's (``max``, ``mean``, ``sum``).
        candidates: ``diverse_*`` strategies consider the ``candidates * b`` most uncertain images.
        prefilter: ``cluster_*`` strategies cluster the ``prefilter * b`` most uncertain images.
        pool_size, test_size: subsample the pool / test split (None = all).
        target: fraction of the full-pool reference mAP50 that counts as reached.
        reference: train the full-pool reference run (else ``reference_map50`` or no target).
        reference_map50: a known full-pool mAP50 (skips the reference run).
        warm_start: fine-tune each round from the previous round's weights (as the product does
            from its promoted version) instead of from ``init_weights`` (the default: a round's
            model then depends only on which images are labelled).
        device: torch device ('' = GPU if any, else CPU).
    """

    data: Path = DEFAULT_DATA
    label_config: Path = DEFAULT_LABEL_CONFIG
    init_weights: Path = SINGLE_STAGE_BASE_PATH
    strategies: tuple[str, ...] = ("random", "least_confidence", "margin", "entropy", "diverse_margin", "typiclust",
                                   "cluster_margin")
    seeds: tuple[int, ...] = (0, 1, 2)
    k: int = 20
    b: int = 20
    rounds: int = 7
    epochs: int = 10
    imgsz: int = 160
    train_batch: int = 16
    aggregation: str = "max"
    candidates: int = 3
    prefilter: int = 10
    pool_split: str = "train"
    test_split: str = "val"
    pool_size: int | None = None
    test_size: int | None = None
    target: float = 0.95
    reference: bool = True
    reference_map50: float | None = None
    warm_start: bool = False
    device: str = ""

    def check(self) -> "SimConfig":
        """Validate and normalise (``random`` first, no duplicates). Raises ValueError."""
        strategies = ["random"] + [s for s in self.strategies if s != "random"]
        bad = [s for s in strategies if s not in STRATEGIES]
        if bad:
            raise ValueError(f"unknown strategies {bad}; use some of {STRATEGIES}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; use one of {AGGREGATIONS}")
        if self.k < 1 or self.b < 1 or self.rounds < 0 or self.epochs < 1:
            raise ValueError("k, b and epochs must be >= 1 and rounds >= 0")
        if self.candidates < 1 or self.prefilter < 1:
            raise ValueError("candidates and prefilter must be >= 1 (they multiply the batch size b)")
        if any(n is not None and n < 1 for n in (self.pool_size, self.test_size)):
            raise ValueError("pool_size and test_size must be >= 1 when given")
        if not self.seeds:
            raise ValueError("give at least one seed")
        self.strategies = tuple(dict.fromkeys(strategies))
        self.seeds = tuple(dict.fromkeys(int(s) for s in self.seeds))
        self.data, self.label_config, self.init_weights = Path(self.data), Path(self.label_config), Path(self.init_weights)
        return self

    def settings(self, work_dir: Path) -> Settings:
        """The product's :class:`Settings` for this run (state under ``work_dir``; images of
        ``/data/local-files/?d=`` URLs read from the data set folder)."""
        return Settings(var_dir=Path(work_dir), train_epochs=self.epochs, imgsz=self.imgsz,
                        train_batch=self.train_batch, aggregation=self.aggregation, device=self.device,
                        local_files_document_root=str(Path(self.data).resolve()), train_patience=0)


def code_fingerprint() -> str:
    """sha1 of the training code (``ml_worker/training.py``) and the ultralytics and torch versions,
    so that a changed training recipe never reuses a stored run."""
    from importlib.metadata import version  # not importing ultralytics: configure_ultralytics comes first

    from ml_worker import training

    h = hashlib.sha1(Path(training.__file__).read_bytes())
    h.update(f"{version('ultralytics')} {version('torch')}".encode())
    return h.hexdigest()[:16]


# --- the parts of a round ---------------------------------------------------------------------

@dataclass
class TrainResult:
    """One fine-tune + evaluation (see :func:`train_and_evaluate`).

    Attributes:
        weights: best weights of the run.
        metrics: ``{"mAP50", "mAP50-95", "precision", "recall"}`` on the test split, 0-1.
        train_s, eval_s: seconds spent (of the run that produced the result, when cached).
        cached: the result was found in the work dir.
    """

    weights: Path
    metrics: dict
    train_s: float
    eval_s: float
    cached: bool = False


def train_and_evaluate(labelled: list[LabelledImage], val: list[LabelledImage], data: SimData, test_yaml: Path,
                       settings: Settings, init: Path, init_sha: str, seed: int, work_dir: Path) -> TrainResult:
    """Fine-tune ``init`` on ``labelled`` with the product's :func:`fine_tune` and evaluate on the
    test split with :func:`evaluate`, or return the stored result of an identical earlier run.

    Args:
        labelled: images with revealed labels (``len >= 1``).
        val: ultralytics' per-epoch validation images, by which it picks ``best.pt``: the seed set
            (labelled images, always part of ``labelled``), so the test split never influences
            training and the per-epoch validation costs the same in every round.
        test_yaml: data set yaml whose ``val`` split is the test split.
        init, init_sha: initial weights and their sha256 (part of the cache key).
        seed: training seed (ultralytics ``seed``, deterministic mode).
        work_dir: the simulation's work dir (runs go to ``work_dir/train/<key>``).
    Returns: :class:`TrainResult`.
    """
    from ml_worker.training import evaluate, fine_tune

    ids = sorted(x.id for x in labelled)
    key_src = json.dumps({"code": code_fingerprint(), "init": init_sha, "train": ids, "val": sorted(x.id for x in val), "test": sorted(x.id for x in data.test),
                          "data": str(data.folder), "epochs": settings.train_epochs, "imgsz": settings.imgsz,
                          "batch": settings.train_batch, "seed": seed, "device": settings.device,
                          "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FACELOOP_")}}, sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    run = Path(work_dir) / "train" / key
    done = run / "result.json"
    if done.exists():
        r = json.loads(done.read_text())
        if Path(r["weights"]).exists():
            return TrainResult(Path(r["weights"]), r["metrics"], r["train_s"], r["eval_s"], cached=True)
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    (run / "key.json").write_text(key_src)
    yaml_path = write_dataset(run / "dataset", data.names, labelled, val)
    t0 = time.time()
    best = fine_tune(init, yaml_path, run, settings, seed=seed, quiet=True)
    train_s = time.time() - t0
    t1 = time.time()
    m = evaluate(best, test_yaml, run, settings, name="test", split="val")
    eval_s = time.time() - t1
    last = best.with_name("last.pt")
    if last.exists() and last != best:
        last.unlink()  # only best.pt is used; saves ~5 MB a round
    metrics = {k: m[k] for k in ("mAP50", "mAP50-95", "precision", "recall")}
    done.write_text(json.dumps({"weights": str(best), "metrics": metrics, "train_s": round(train_s, 2),
                                "eval_s": round(eval_s, 2), "n_labelled": len(ids)}))
    return TrainResult(best, metrics, round(train_s, 2), round(eval_s, 2))


def score_pool(weights: Path, images: list[LabelledImage], schema: ProjectSchema, settings: Settings,
               on_chunk: Callable[[int, int], None] | None = None):
    """Score unlabelled images as the product's scoring station does (:func:`predict_tasks` with
    embeddings, in chunks of :data:`SCORE_CHUNK`).

    Args:
        weights: the round's model.
        images: the unlabelled pool, in candidate order.
        settings: from :meth:`SimConfig.settings` (reads ``/data/local-files`` URLs from disk).
        on_chunk: called with ``(done, total)`` after each chunk.
    Returns: ``(uncertainty, embeddings, ok)``: ``{measure: (n,) 0-1}``, ``(n, d)`` embeddings and
        the ``(n,)`` positions in ``images`` that scored (an image that fails is left out).
    """
    from backend.predict import predict_tasks
    from facemodels.detector import FaceModel

    model = FaceModel(weights, settings.device)
    preds = []
    for i in range(0, len(images), SCORE_CHUNK):
        chunk = images[i : i + SCORE_CHUNK]
        tasks = [{"id": i + j, "data": {schema.value_key: "/data/local-files/?d=" + quote(x.rel)}}
                 for j, x in enumerate(chunk)]
        preds.extend(predict_tasks(tasks, schema, model, settings, embed=True))
        if on_chunk:
            on_chunk(min(i + SCORE_CHUNK, len(images)), len(images))
    ok = [i for i, p in enumerate(preds) if p.error is None]
    for i, p in enumerate(preds):
        if p.error is not None:
            log.warning("image %s not scored: %s", images[i].id, p.error)
    unc = {m: np.array([preds[i].uncertainty.get(m) for i in ok], dtype=np.float64) for m in MEASURES}
    dims = {len(preds[i].embedding) for i in ok if preds[i].embedding is not None}
    d = dims.pop() if len(dims) == 1 else 1
    emb = np.stack([preds[i].embedding if preds[i].embedding is not None else np.zeros(d) for i in ok]) if ok \
        else np.zeros((0, d))
    return unc, emb, np.asarray(ok, dtype=int)


def random_rng(seed: int, round_index: int) -> np.random.Generator:
    """The generator of the ``random`` strategy at a round (a pure function of seed and round)."""
    return np.random.default_rng([int(seed), int(round_index), 7919])


def query(strategy: str, unlabelled: list[LabelledImage], b: int, seed: int, round_index: int,
          weights: Path | None, schema: ProjectSchema, settings: Settings, candidates: int = 3,
          on_chunk: Callable[[int, int], None] | None = None,
          labelled: list[LabelledImage] | None = None, prefilter: int = 10) -> tuple[list[int], float | None]:
    """Pick the next query batch with the product's :func:`ml_worker.sampler.select`.

    Args:
        strategy: a sampler strategy; ``random`` needs no model (``weights`` may be None).
        unlabelled: candidates in candidate order (ties in uncertainty go to the earlier one).
        b: batch size.
        seed, round_index: make ``random`` reproducible.
        weights: the model that scores the candidates.
        labelled: images labelled so far; strategies in :data:`USES_LABELLED` (``diverse_*``,
            ``typiclust``) get their embeddings too, as the product's scoring station passes them.
    Returns: ``(positions in unlabelled, mean uncertainty of the picks by the strategy's measure
        (entropy for ``typiclust``) or None for random)``.
    """
    n = len(unlabelled)
    rng = random_rng(seed, round_index)
    if strategy == "random":
        return select("random", {"entropy": np.zeros(n)}, b, rng=rng), None
    extra = list(labelled or []) if strategy in USES_LABELLED else []
    unc, emb, ok = score_pool(weights, list(unlabelled) + extra, schema, settings, on_chunk)
    in_pool = ok < n
    lab_emb = emb[~in_pool] if extra else None
    unc, emb, ok = {m: v[in_pool] for m, v in unc.items()}, emb[in_pool], ok[in_pool]
    picks = select(strategy, unc, b, embeddings=emb, candidates=candidates, rng=rng, labelled_embeddings=lab_emb,
                   prefilter=prefilter)
    measure = strategy_measure(strategy) or "entropy"
    return [int(ok[i]) for i in picks], float(np.mean(unc[measure][picks])) if picks else None


def seed_order(n: int, seed: int) -> list[int]:
    """A seed's permutation of pool positions: its first ``k`` are the seed set, the rest the
    candidate order (so that ties in uncertainty break at random, not by file name)."""
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


# --- the simulation ---------------------------------------------------------------------------

@dataclass
class SimResult:
    """What :func:`run_simulation` wrote and measured.

    Attributes:
        rows: one dict per strategy, seed and round (the columns of :data:`ROUND_COLUMNS`).
        reference: full-pool metrics (``{"mAP50", ...}``) or None.
        summary: one dict per strategy (:data:`SUMMARY_COLUMNS`).
        files: ``{"rounds_csv", "curves_png", "summary_csv", "summary_md", "config_json"}`` paths.
        seconds: wall-clock time of the whole simulation.
    """

    rows: list[dict]
    reference: dict | None
    summary: list[dict]
    files: dict[str, Path]
    seconds: float


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def run_simulation(cfg: SimConfig, out_dir: Path, work_dir: Path | None = None, progress: bool = True,
                   on_round: Callable[[dict], None] | None = None) -> SimResult:
    """Run the simulation of ``cfg`` and write its outputs to ``out_dir``.

    Args:
        cfg: the simulation's settings.
        out_dir: where ``rounds.csv``, ``learning_curves.png``, ``summary.{csv,md}`` and
            ``config.json`` go.
        work_dir: training runs and their cache (default ``out_dir/work``).
        progress: show rich progress bars (rounds, pool scoring).
        on_round: called with each new row of ``rounds.csv``.
    Returns: :class:`SimResult`.
    """
    t_start = time.time()
    cfg = cfg.check()
    schema = ProjectSchema.parse(Path(cfg.label_config).read_text())
    data = load_data(cfg.data, schema, cfg.pool_split, cfg.test_split, cfg.pool_size, cfg.test_size)
    if cfg.k > len(data.pool):
        raise ValueError(f"seed set k={cfg.k} is larger than the pool ({len(data.pool)} images)")
    init = Path(cfg.init_weights)
    if not init.exists():
        raise FileNotFoundError(f"initial weights not found: {init}")
    out_dir = Path(out_dir)  # created only once the inputs are known to be usable
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir or out_dir / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    settings = cfg.settings(work)
    init_sha = file_sha256(init)
    # every round starts from the same bytes, even if the file is replaced while the simulation runs
    snap = work / "init" / f"{init_sha[:16]}.pt"
    if not snap.exists():
        snap.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(init, snap.with_suffix(".tmp"))
        if file_sha256(snap.with_suffix(".tmp")) != init_sha:
            raise RuntimeError(f"{init} changed while it was being copied; try again")
        snap.with_suffix(".tmp").replace(snap)
    init = snap
    test_yaml = write_dataset(work / "test_dataset", data.names, [], data.test)
    budget_rounds = min(cfg.rounds, math.ceil((len(data.pool) - cfg.k) / cfg.b)) if cfg.b else 0
    files = _output_files(out_dir)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config.update(pool_images=len(data.pool), test_images=len(data.test), init_sha256=init_sha,
                  query_rounds=budget_rounds, classes=data.names, work_dir=str(work),
                  score_threshold=schema.score_threshold if schema.score_threshold is not None
                  else settings.score_threshold)
    files["config_json"].write_text(json.dumps(config, indent=2))

    rows: list[dict] = []
    total = len(cfg.seeds) * (1 + len(cfg.strategies) * budget_rounds) + (1 if cfg.reference and cfg.reference_map50 is None else 0)
    with _progress(progress) as prog:
        bar = prog.add_task("rounds", total=total) if prog else None
        scoring = prog.add_task("scoring pool", total=1, visible=False) if prog else None

        def advance(desc: str):
            if prog:
                prog.update(bar, advance=1, description=desc)

        def on_chunk(done, n):
            if prog:
                prog.update(scoring, completed=done, total=n, visible=done < n)

        reference = None
        if cfg.reference_map50 is not None:
            reference = {"mAP50": float(cfg.reference_map50), "given": True}
        elif cfg.reference:
            if prog:
                prog.update(bar, description=f"full-pool reference ({len(data.pool)} images)")
            val0 = [data.pool[i] for i in seed_order(len(data.pool), cfg.seeds[0])[: cfg.k]]
            r = train_and_evaluate(data.pool, val0, data, test_yaml, settings, init, init_sha, cfg.seeds[0], work)
            reference = dict(r.metrics, n_labelled=len(data.pool), train_s=r.train_s, eval_s=r.eval_s,
                             seed=cfg.seeds[0], weights=str(r.weights))
            advance("reference done")
        if reference is not None:
            (out_dir / "reference.json").write_text(json.dumps(reference, indent=2))

        for seed in cfg.seeds:
            order = seed_order(len(data.pool), seed)
            seed_set = order[: cfg.k]
            if prog:
                prog.update(bar, description=f"seed {seed} round 0 ({cfg.k} labels)")
            val = [data.pool[i] for i in seed_set]
            r0 = train_and_evaluate(val, val, data, test_yaml, settings, init, init_sha, seed, work)
            advance(f"seed {seed} round 0 done")
            for strategy in cfg.strategies:
                labelled = list(seed_set)
                rest = order[cfg.k :]
                res = r0
                row = _row(strategy, seed, 0, labelled, [data.pool[i].id for i in seed_set], None, res, 0.0)
                row["cached"] = int(res.cached or strategy != cfg.strategies[0])  # round 0 is shared
                rows.append(row)
                if on_round:
                    on_round(row)
                for rnd in range(1, budget_rounds + 1):
                    if prog:
                        prog.update(bar, description=f"seed {seed} {strategy} round {rnd}")
                    t0 = time.time()
                    picks, sel_unc = query(strategy, [data.pool[i] for i in rest], cfg.b, seed, rnd, res.weights,
                                           schema, settings, cfg.candidates, on_chunk,
                                           labelled=[data.pool[i] for i in labelled], prefilter=cfg.prefilter)
                    score_s = time.time() - t0
                    chosen = [rest[p] for p in picks]
                    labelled = labelled + chosen
                    taken = set(chosen)
                    rest = [i for i in rest if i not in taken]
                    start, start_sha = (res.weights, file_sha256(res.weights)) if cfg.warm_start else (init, init_sha)
                    res = train_and_evaluate([data.pool[i] for i in labelled], val, data, test_yaml, settings,
                                             start, start_sha, seed, work)
                    row = _row(strategy, seed, rnd, labelled, [data.pool[i].id for i in chosen], sel_unc, res,
                               score_s)
                    rows.append(row)
                    _write_rounds(files["rounds_csv"], rows)
                    if on_round:
                        on_round(row)
                    advance(f"seed {seed} {strategy} round {rnd} done")
                _write_rounds(files["rounds_csv"], rows)

    summary = _write_report(files, rows, reference, cfg, len(data.pool), len(data.test), time.time() - t_start)
    return SimResult(rows, reference, summary, files, time.time() - t_start)


def _output_files(out_dir: Path) -> dict[str, Path]:
    return {"rounds_csv": out_dir / "rounds.csv", "curves_png": out_dir / "learning_curves.png",
            "summary_csv": out_dir / "summary.csv", "summary_md": out_dir / "summary.md",
            "config_json": out_dir / "config.json"}


def _write_report(files: dict[str, Path], rows: list[dict], reference: dict | None, cfg: SimConfig, pool_images,
                  test_images, seconds: float, time_label: str = "Wall-clock time of the simulation") -> list[dict]:
    """``rounds.csv``, ``summary.{csv,md}`` and ``learning_curves.png`` from round rows; returns
    the summary (shared by :func:`run_simulation` and :func:`merge_runs`)."""
    _write_rounds(files["rounds_csv"], rows)
    ref50 = reference["mAP50"] if reference else None
    summary = summarise(rows, ref50, cfg.target)
    write_summary(files["summary_csv"], files["summary_md"], summary, rows, reference, cfg, seconds, time_label)
    plot_learning_curves(rows, files["curves_png"], ref50, cfg.target,
                         title=f"{Path(cfg.data).name}: pool {pool_images}, test {test_images}, "
                               f"{len(cfg.seeds)} seed(s), {cfg.epochs} epochs @ {cfg.imgsz}px")
    return summary


def _row(strategy: str, seed: int, rnd: int, labelled: list[int], selected: list[str], sel_unc: float | None,
         res: TrainResult, score_s: float) -> dict:
    return {"strategy": strategy, "seed": seed, "round": rnd, "n_labelled": len(labelled),
            "mAP50": round(res.metrics["mAP50"], 5), "mAP50-95": round(res.metrics["mAP50-95"], 5),
            "precision": round(res.metrics["precision"], 5), "recall": round(res.metrics["recall"], 5),
            "selected": " ".join(selected), "selected_uncertainty": "" if sel_unc is None else round(sel_unc, 5),
            "seconds": round(score_s + res.train_s + res.eval_s, 2), "score_s": round(score_s, 2), "train_s": res.train_s,
            "eval_s": res.eval_s, "cached": int(res.cached)}


def _write_rounds(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROUND_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def read_rounds(path: Path) -> list[dict]:
    """Rows of a ``rounds.csv`` with numbers parsed (``selected`` stays a space-separated string)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for c in ("seed", "round", "n_labelled", "cached"):
                r[c] = int(r[c])
            for c in ("mAP50", "mAP50-95", "precision", "recall", "seconds", "score_s", "train_s", "eval_s"):
                r[c] = float(r[c])
            out.append(r)
    return out


# --- analysis -----------------------------------------------------------------------------------

def curves(rows: Iterable[dict], metric: str = "mAP50") -> dict[str, dict[int, list[float]]]:
    """``{strategy: {n_labelled: [metric per seed]}}`` from round rows."""
    out: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        out.setdefault(r["strategy"], {}).setdefault(int(r["n_labelled"]), []).append(float(r[metric]))
    return out


def labels_to_reach(points: dict[int, float], target: float) -> int | None:
    """The fewest labelled images whose value reaches ``target`` (``points``: ``{n: value}``), or
    None when no budget reaches it."""
    hits = [n for n, v in sorted(points.items()) if v >= target]
    return hits[0] if hits else None


def summarise(rows: list[dict], reference_map50: float | None, target: float = 0.95) -> list[dict]:
    """Per strategy: labels to reach ``target * reference_map50`` on the mean curve (over seeds)
    and per seed, the ratio to random's, the final mAP50 and the mean mAP50 over rounds (a
    normalised area under the learning curve) with its ratio to random's.

    Returns: one dict per strategy (keys :data:`SUMMARY_COLUMNS`), random first. Labels are None
    when the target is not reached within the budget (or there is no positive reference).
    """
    c = curves(rows)
    by_seed: dict[tuple[str, int], dict[int, float]] = {}
    for r in rows:
        by_seed.setdefault((r["strategy"], int(r["seed"])), {})[int(r["n_labelled"])] = float(r["mAP50"])
    goal = None if not reference_map50 or reference_map50 <= 0 else target * reference_map50
    out = []
    for s, pts in c.items():
        mean_curve = {n: float(np.mean(v)) for n, v in pts.items()}
        final_n = max(pts)
        per_seed = {seed: (labels_to_reach(p, goal) if goal is not None else None)
                    for (st, seed), p in sorted(by_seed.items()) if st == s}
        reached = [v for v in per_seed.values() if v is not None]
        out.append({
            "strategy": s,
            "labels_to_target": labels_to_reach(mean_curve, goal) if goal is not None else None,
            "labels_to_target_per_seed": " ".join(f"{k}:{'-' if v is None else v}" for k, v in per_seed.items()),
            "seeds_reaching_target": f"{len(reached)}/{len(per_seed)}",
            "labels_mean": round(float(np.mean(reached)), 1) if reached else None,
            "labels_std": round(float(np.std(reached)), 1) if reached else None,
            "final_mAP50_mean": round(float(np.mean(pts[final_n])), 4),
            "final_mAP50_std": round(float(np.std(pts[final_n])), 4),
            "mean_mAP50_over_rounds": round(float(np.mean(list(mean_curve.values()))), 4),
        })
    rnd = next((o for o in out if o["strategy"] == "random"), None)
    rnd_seed = _labels_per_seed(by_seed, "random", goal) if goal is not None else {}
    for o in out:
        ratios = [v / rnd_seed[seed] for seed, v in _labels_per_seed(by_seed, o["strategy"], goal).items()
                  if v is not None and rnd_seed.get(seed)] if goal is not None else []
        o["ratio_per_seed_mean"] = round(float(np.mean(ratios)), 3) if ratios else None
        o["ratio_per_seed_std"] = round(float(np.std(ratios)), 3) if ratios else None
        o["seeds_with_ratio"] = f"{len(ratios)}/{len(rnd_seed)}"
        lt, lr = o["labels_to_target"], rnd["labels_to_target"] if rnd else None
        o["ratio_to_random"] = round(lt / lr, 3) if (lt is not None and lr) else None
        ar = rnd["mean_mAP50_over_rounds"] if rnd else None
        o["auc_ratio_to_random"] = round(o["mean_mAP50_over_rounds"] / ar, 3) if ar else None
    out.sort(key=lambda o: (o["strategy"] != "random",))
    return out


def _labels_per_seed(by_seed: dict[tuple[str, int], dict[int, float]], strategy: str, goal: float) -> dict[int, int | None]:
    return {seed: labels_to_reach(p, goal) for (st, seed), p in sorted(by_seed.items()) if st == strategy}


def winner(summary: list[dict]) -> str | None:
    """The best strategy: fewest labels to the target on the mean curve; strategies that never
    reach it rank after those that do; ties (and no target) go to the higher mean mAP50 over
    rounds. None for an empty summary."""
    if not summary:
        return None
    key = lambda o: (o["labels_to_target"] is None, o["labels_to_target"] or 0, -o["mean_mAP50_over_rounds"])  # noqa: E731
    return min(summary, key=key)["strategy"]


def write_summary(csv_path: Path, md_path: Path, summary: list[dict], rows: list[dict], reference: dict | None,
                  cfg: SimConfig, seconds: float, time_label: str = "Wall-clock time of the simulation") -> None:
    """Write ``summary.csv`` and a readable ``summary.md`` (target, table, winner, timings)."""
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        w.writerows([{k: ("" if o.get(k) is None else o.get(k)) for k in SUMMARY_COLUMNS} for o in summary])
    fmt = lambda v: "not reached" if v is None else str(v)  # noqa: E731
    na = lambda v: "n/a" if v is None else str(v)  # noqa: E731
    lines = ["# Active-learning simulation", ""]
    lines.append(f"Data `{cfg.data}`: pool = `{cfg.pool_split}`, test = `{cfg.test_split}`; "
                 f"k={cfg.k} seed images, b={cfg.b} per round, up to {max((r['n_labelled'] for r in rows), default=0)} "
                 f"labels; seeds {list(cfg.seeds)}; {cfg.epochs} epochs at {cfg.imgsz} px, batch {cfg.train_batch}, "
                 + ("from the previous round's weights (warm start, round 0 from "
                    f"`{Path(cfg.init_weights).name}`)" if cfg.warm_start else f"from `{Path(cfg.init_weights).name}` each round")
                 + f"; aggregation `{cfg.aggregation}`; diverse candidates {cfg.candidates} x b; cluster prefilter "
                 f"{cfg.prefilter} x b.")
    lines.append("")
    if reference is not None:
        lines.append(f"Full-pool reference mAP50 = {reference['mAP50']:.4f}"
                     + (f" (mAP50-95 {reference['mAP50-95']:.4f}, {reference['n_labelled']} images)"
                        if "mAP50-95" in reference else " (given)")
                     + (f"; target = {cfg.target:.0%} of it = {cfg.target * reference['mAP50']:.4f}."
                        if reference["mAP50"] > 0 else "; no target (the reference found nothing)."))
    else:
        lines.append("No full-pool reference: labels to target are not computed.")
    lines += ["", "| strategy | labels to target (mean curve) | ratio to random | per seed | mean ± std (seeds reaching) "
              "| ratio to random per seed (mean ± std, seeds where both reach) "
              "| final mAP50 | mean mAP50 over rounds | ratio to random |", "|---|---|---|---|---|---|---|---|---|"]
    for o in summary:
        ms = "-" if o["labels_mean"] is None else f"{o['labels_mean']} ± {o['labels_std']} ({o['seeds_reaching_target']})"
        rs = ("-" if o.get("ratio_per_seed_mean") is None
              else f"{o['ratio_per_seed_mean']} ± {o['ratio_per_seed_std']} ({o['seeds_with_ratio']})")
        lines.append(f"| {o['strategy']} | {fmt(o['labels_to_target'])} | {na(o['ratio_to_random'])} | "
                     f"{o['labels_to_target_per_seed']} | {ms} | {rs} | {o['final_mAP50_mean']:.4f} ± {o['final_mAP50_std']:.4f} | "
                     f"{o['mean_mAP50_over_rounds']:.4f} | {na(o['auc_ratio_to_random'])} |")
    lines += ["", f"Winner (fewest labels to target, then mean mAP50 over rounds): **{winner(summary)}**. "
              "Compare the differences with the spread over seeds (± std) before acting on them.", ""]
    fresh = [r for r in rows if not r["cached"] and r["round"] > 0]
    if fresh:
        lines.append(f"Per query round (not cached): {np.mean([r['seconds'] for r in fresh]):.1f} s on average "
                     f"(scoring {np.mean([r['score_s'] for r in fresh]):.1f} s, training "
                     f"{np.mean([r['train_s'] for r in fresh]):.1f} s, evaluation {np.mean([r['eval_s'] for r in fresh]):.1f} s).")
    lines.append(f"{time_label}: {seconds / 60:.1f} min.")
    md_path.write_text("\n".join(lines) + "\n")


def plot_learning_curves(rows: list[dict], path: Path, reference_map50: float | None = None, target: float = 0.95,
                         title: str = "") -> Path:
    """PNG of mAP50 against labelled images: per strategy the mean over seeds with a ±1 std band,
    the full-pool reference and the target as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for s, pts in curves(rows).items():
        xs = sorted(pts)
        mean = np.array([np.mean(pts[x]) for x in xs])
        std = np.array([np.std(pts[x]) for x in xs])
        ls = "--" if s == "random" else "-"
        line, = ax.plot(xs, mean, ls, marker="o", ms=3, label=s, color="black" if s == "random" else None,
                        zorder=5 if s == "random" else 2)  # the baseline stays visible on top
        ax.fill_between(xs, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), alpha=0.15, color=line.get_color())
    if reference_map50 is not None:
        ax.axhline(reference_map50, color="grey", lw=1, label=f"full pool {reference_map50:.3f}")
        ax.axhline(target * reference_map50, color="grey", lw=1, ls=":", label=f"{target:.0%} of full pool")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if reference_map50 is not None:
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, target * reference_map50 - 0.02), max(hi, reference_map50 + 0.02))
    ax.set_xlabel("labelled images")
    ax.set_ylabel("mAP50 on the test split")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def merge_runs(run_dirs: list[Path], out_dir: Path, reference: dict | None = None) -> dict[str, Path]:
    """Merge simulations run in parallel (e.g. one process per seed) into one report.

    Args:
        run_dirs: ``--out`` folders of :func:`run_simulation` with the same settings apart from
            seeds, strategies and ``reference_map50`` (their ``config.json`` files are compared).
        out_dir: where the merged ``rounds.csv``, ``summary.{csv,md}``, ``learning_curves.png``
            and ``config.json`` go.
        reference: full-pool metrics (``{"mAP50", ...}``); default a measured ``reference.json``
            of the runs, else a given one.
    Returns: the written files. Rows of the same strategy, seed and round appear once.
    Raises: ValueError when the runs' settings differ, FileNotFoundError when a run has no
        ``rounds.csv``.
    """
    ignore = {"seeds", "strategies", "reference_map50", "work_dir", "reference", "merged_from"}
    out_dir = Path(out_dir)
    configs, rows, seen, refs = [], [], set(), []
    for d in map(Path, run_dirs):
        for name in ("rounds.csv", "config.json"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d} is not a simulation output folder: no {name}")
        if d.resolve() == out_dir.resolve():
            raise ValueError(f"--out {out_dir} is one of the runs; merge into another folder")
        c = json.loads((d / "config.json").read_text())
        c.setdefault("prefilter", SimConfig.prefilter)  # runs written before the option had the default
        configs.append(c)
        try:
            run_rows = read_rounds(d / "rounds.csv")
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{d / 'rounds.csv'} is malformed ({e.__class__.__name__}: {e})") from None
        for r in run_rows:
            key = (r["strategy"], r["seed"], r["round"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
        if (d / "reference.json").exists():
            refs.append(json.loads((d / "reference.json").read_text()))
    base = {k: v for k, v in configs[0].items() if k not in ignore}
    for c in configs[1:]:
        diff = sorted(k for k in set(base) | set(c) if k not in ignore and base.get(k) != c.get(k))
        if diff:
            raise ValueError(f"runs differ in {diff}; only seeds and strategies may differ")
    if not rows:
        raise ValueError("the runs hold no rounds")
    if reference is None:
        measured = [r for r in refs if not r.get("given")]
        values = sorted({round(r["mAP50"], 6) for r in measured})
        if len(values) > 1:
            log.warning("the runs measured different full-pool references %s; using the first run's (pass "
                        "--reference to choose)", values)
        reference = (measured or refs or [None])[0]
    c0 = configs[0]
    seeds = sorted({r["seed"] for r in rows})
    strategies = tuple(dict.fromkeys(r["strategy"] for r in rows))
    cfg = SimConfig(data=Path(c0["data"]), init_weights=Path(c0["init_weights"]), strategies=strategies,
                    seeds=tuple(seeds), k=c0["k"], b=c0["b"], rounds=c0["rounds"], epochs=c0["epochs"],
                    imgsz=c0["imgsz"], train_batch=c0["train_batch"], aggregation=c0["aggregation"],
                    candidates=c0["candidates"], prefilter=c0.get("prefilter", 10), pool_split=c0["pool_split"], test_split=c0["test_split"],
                    target=c0["target"], warm_start=c0["warm_start"])
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _output_files(out_dir)
    rows.sort(key=lambda r: (r["seed"], strategies.index(r["strategy"]), r["round"]))
    _write_report(files, rows, reference, cfg, c0.get("pool_images"), c0.get("test_images"),
                  sum(r["seconds"] for r in rows if not r["cached"]),
                  time_label=f"Merged from {len(run_dirs)} runs; compute time of their rounds that were not cached")
    files["config_json"].write_text(json.dumps(dict(c0, seeds=seeds, strategies=list(strategies),
                                                    merged_from=[str(d) for d in run_dirs]), indent=2))
    if reference is not None:
        (out_dir / "reference.json").write_text(json.dumps(reference, indent=2))
    return files
