"""The train station: annotations -> YOLO dataset -> fine-tune -> evaluate -> register -> promote.

Plain functions (no Celery): :func:`fine_tune` and :func:`evaluate` are shared with the
active-learning simulation; :func:`run_training` is what the ``faceloop.train`` task calls.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from backend.config import Settings, configure_ultralytics

log = logging.getLogger("faceloop.training")

#: Every model starts here when there is no weights file: ultralytics builds it from the yaml.
BASE_YAML = "yolov5nu.yaml"

ProgressFn = Callable[[dict], None]


def _class_convs(model) -> list:
    """The last ``Conv2d`` of each level of a YOLO Detect head's class branch (``cv3``)."""
    head = model.model[-1]
    return [branch[-1] for branch in head.cv3]


def grow_class_head(trainer, old_model) -> bool:
    """Start a grown class head from the old head's face-ness instead of from scratch.

    When the project's classes differ from the model's (e.g. 8 expressions -> awake/sleep),
    ultralytics keeps every layer whose shape fits and initialises the class convolutions with a
    low prior (scores ~0.01): with a few dozen labels it then takes hundreds of iterations before
    any face scores above the threshold. Here each new class starts from the mean of the old
    classes' weights and biases (its score ~ the old model's mean class score on a face), so
    faces are detected from the first epoch and training only has to separate the new classes.
    Applied to the trainer's model and its EMA copy. Returns False when shapes do not allow it.
    """
    import torch

    new_convs = _class_convs(trainer.model)
    old_convs = _class_convs(old_model)
    if len(new_convs) != len(old_convs):
        return False
    with torch.no_grad():
        targets = [new_convs]
        if getattr(trainer, "ema", None) is not None:
            targets.append(_class_convs(trainer.ema.ema))
        for convs in targets:
            for new, old in zip(convs, old_convs):
                if new.weight.shape[1:] != old.weight.shape[1:] or new.weight.shape[0] == old.weight.shape[0]:
                    return False
                w = old.weight.detach().float().mean(0, keepdim=True).to(new.weight)
                new.weight.copy_(w.expand_as(new.weight))
                if new.bias is not None and old.bias is not None:
                    new.bias.fill_(float(old.bias.detach().float().mean()))
    return True


def _device(settings: Settings) -> str | None:
    if settings.device:
        return settings.device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def fine_tune(init: str | Path, data_yaml: Path, out_dir: Path, settings: Settings, epochs: int | None = None,
              on_epoch: ProgressFn | None = None, seed: int | None = None, quiet: bool = True) -> Path:
    """Fine-tune a YOLO model and return the path of its best weights.

    Args:
        init: weights to start from (``.pt``), or :data:`BASE_YAML` for an untrained model. With a
            different class count ultralytics rebuilds the head and keeps every layer that fits.
        data_yaml: dataset yaml (``train``/``val`` splits, ``names``).
        out_dir: folder for ultralytics' run (weights, ``results.csv``, ``results.png``, plots).
        epochs: default ``settings.train_epochs``.
        on_epoch: called after each epoch with ``{"epoch", "epochs", "metrics"}`` (1-based epoch).
        seed: default ``settings.seed``.
    Raises: RuntimeError when ultralytics produced no weights.
    """
    configure_ultralytics(settings.var_dir)
    from ultralytics import YOLO

    model = YOLO(str(init), task="detect")
    n_epochs = epochs or settings.train_epochs

    if str(init).endswith(".pt"):
        old = model.model

        def grow(trainer):
            if int(trainer.model.model[-1].nc) != int(old.model[-1].nc):
                ok = grow_class_head(trainer, old)
                log.info("class head grown %d -> %d classes from the old head: %s", old.model[-1].nc,
                         trainer.model.model[-1].nc, ok)

        model.add_callback("on_pretrain_routine_end", grow)

    if on_epoch is not None:
        def cb(trainer):
            on_epoch({"epoch": min(int(trainer.epoch) + 1, int(trainer.epochs)), "epochs": int(trainer.epochs),
                      "metrics": {k: float(v) for k, v in (trainer.metrics or {}).items()}})

        model.add_callback("on_fit_epoch_end", cb)
    # Few-shot fine-tuning recipe (measured on 16-image awake/sleep sets, see docs/training.md):
    # no warm-up (its bias learning rate of 0.1 wrecks the class head in a few dozen steps), SGD
    # at lr0=0.01, a trained backbone (first 10 layers) frozen so tiny batches cannot wreck its
    # features, and no mosaic below 100 images (mosaic shrinks the few faces there are). No
    # gradient accumulation (nbs = batch): ultralytics' default nbs=64 makes one optimizer step
    # per 64 images, so 40 labelled images and 10 epochs gave 10 steps and a model that barely
    # moved (awake/sleep test mAP50 0.13 with batch 64, 0.47 with batch 16 and nbs 16 = 30 steps,
    # same compute; docs/training.md).
    n_train = _count_images(data_yaml, "train")
    iters = n_epochs * max(1, -(-n_train // settings.train_batch))
    model.train(
        warmup_epochs=0 if iters < 300 else 3, warmup_bias_lr=0.0,
        freeze=int(os.environ.get("FACELOOP_FREEZE", "10")) if str(init).endswith(".pt") else None,
        mosaic=float(os.environ.get("FACELOOP_MOSAIC", "0" if n_train < 100 else "1")),
        nbs=int(os.environ.get("FACELOOP_NBS", str(settings.train_batch))),
        optimizer=os.environ.get("FACELOOP_OPTIMIZER", "SGD"), lr0=float(os.environ.get("FACELOOP_LR0", "0.01")),
        data=str(data_yaml), epochs=n_epochs, imgsz=settings.imgsz, batch=settings.train_batch,
        seed=settings.seed if seed is None else seed, deterministic=True, workers=0, device=_device(settings),
        project=str(Path(out_dir).resolve()), name="train", exist_ok=True, amp=False, plots=True,
        patience=settings.train_patience or 100, verbose=not quiet, cache=False, val=True,
    )
    best = Path(model.trainer.best)
    if not best.exists():
        best = Path(model.trainer.last)
    if not best.exists():
        raise RuntimeError(f"training wrote no weights under {out_dir}")
    return best


def _count_images(data_yaml: Path, split: str) -> int:
    """Number of images in a split of a dataset yaml (folder entries only; 0 if unknown)."""
    import yaml

    d = yaml.safe_load(Path(data_yaml).read_text())
    entry = d.get(split)
    if not isinstance(entry, str):
        return 0
    folder = Path(d.get("path", Path(data_yaml).parent)) / entry
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) if folder.is_dir() else 0


def evaluate(weights: str | Path, data_yaml: Path, out_dir: Path, settings: Settings, name: str = "val",
             split: str = "val") -> dict:
    """Evaluate weights on a dataset split.

    Returns: ``{"mAP50", "mAP50-95", "precision", "recall", "per_class": {name: {"precision",
    "recall", "mAP50", "mAP50-95", "instances"}}, "images"}``, all 0-1 (ultralytics' COCO-style
    101-point AP at IoU 0.5 and 0.5:0.95).
    """
    configure_ultralytics(settings.var_dir)
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    m = model.val(data=str(data_yaml), split=split, imgsz=settings.imgsz, batch=settings.train_batch,
                  device=_device(settings), project=str(Path(out_dir).resolve()), name=name, exist_ok=True,
                  plots=True, verbose=False, workers=0)
    names = m.names
    per = {}
    nt = getattr(m, "nt_per_class", None)
    for j, c in enumerate(m.box.ap_class_index):
        p, r, ap50, ap = m.box.class_result(j)
        per[names[int(c)]] = {"precision": float(p), "recall": float(r), "mAP50": float(ap50), "mAP50-95": float(ap),
                              "instances": int(nt[int(c)]) if nt is not None else None}
    return {"mAP50": float(m.box.map50), "mAP50-95": float(m.box.map), "precision": float(m.box.mp),
            "recall": float(m.box.mr), "per_class": per, "save_dir": str(m.save_dir)}


def gate(candidate: dict, current: dict | None, val_faces: int) -> tuple[bool, str]:
    """Promotion rule, on the same validation split, classes matched by name.

    - The split holds no labelled face: nothing is measured, the current version stays.
    - Neither version finds a labelled face with the right class (mAP50 0 for both): stays.
    - Otherwise **the faces a person would accept as is decide** (IoU >= 0.5 and the right class,
      :func:`ml_worker.evaluation.acceptance`): the candidate is promoted when it accepts more
      validation faces than the current version, kept out when it accepts fewer. On equal counts
      mAP50 decides (at least the current's: ties go to the newer data, and the reason says so).

    Why acceptance first: it is the figure people judge pre-labels by, and mAP50 (every class
    hypothesis counted) on the 5-15 validation faces of a young project disagreed with it. A new
    user's trial (awake_sleep, 37 and 52 labels) saw two candidates rejected on mAP50 (0.626 <
    0.723, 0.667 < 0.713) that accepted more validation faces (6 against 5 of 11, 7 against 6 of
    13) and were better on the 186 images still unlabelled: 154 against 135 accepted, mAP50 0.874
    against 0.814 (docs/training.md, "The gate decides by acceptance").

    Args:
        candidate, current: :func:`ml_worker.evaluation.evaluate_model` results (``accepted`` count,
            ``acceptance_rate``, ``mAP50``; ``current`` None when it could not be evaluated).
        val_faces: labelled faces in the validation split.
    Returns: ``(promote, reason)``.
    """
    if val_faces == 0:
        return False, "validation split has no labelled face: nothing to compare, the current version stays"
    c = candidate["mAP50"]
    acc = f", {_accepted(candidate, val_faces)}"
    if current is None:
        if c <= 0:
            return False, f"mAP50 {c:.3f}: the candidate finds no labelled face with its class"
        return True, f"mAP50 {c:.3f}{acc}; the current version could not be evaluated"
    o = current["mAP50"]
    if c <= 0 and o <= 0:
        return False, "mAP50 0.000 for both versions: neither finds a labelled face with its class"
    a_c, a_o = _accepted_count(candidate, val_faces), _accepted_count(current, val_faces)
    maps = f"mAP50 {c:.3f}, current {o:.3f}"
    if a_c > a_o:
        return True, (f"accepted as is {a_c} of {val_faces} validation faces > current {a_o}: "
                      f"acceptance decides ({maps})")
    if a_c < a_o:
        return False, (f"accepted as is {a_c} of {val_faces} validation faces < current {a_o}: "
                       f"acceptance decides ({maps})")
    if c >= o:
        tie = (f"; a tie: {val_faces} validation faces do not tell the versions apart, the newer labels win"
               if round(c, 3) == round(o, 3) else "")
        return True, (f"mAP50 {c:.3f} >= current {o:.3f} on the same {val_faces} validation faces{acc} "
                      f"(current {_accepted(current, val_faces, short=True)}; equal, so mAP50 decides){tie}")
    return False, (f"mAP50 {c:.3f} < current {o:.3f} on the same {val_faces} validation faces{acc} "
                   f"(current {_accepted(current, val_faces, short=True)}; equal, so mAP50 decides)")


def _accepted_count(ev: dict, val_faces: int) -> int:
    """Faces accepted as is: an evaluation's ``accepted`` count, or its ``acceptance_rate`` ×
    ``val_faces`` (rounded) when the count is missing."""
    n = ev.get("accepted")
    if n is None:
        n = round(float(ev.get("acceptance_rate", 0.0)) * val_faces)
    return int(n)


def _accepted(ev: dict, val_faces: int, short: bool = False) -> str:
    """``"accepted as is 7 of 8 faces"`` (:func:`_accepted_count`): on a few validation faces a
    count reads as what it is, one face, where 0.88 against 1.00 read as a regression."""
    n = _accepted_count(ev, val_faces)
    return f"{n} of {val_faces}" if short else f"accepted as is {n} of {val_faces} faces"


def gate_choices(candidate: dict, current: dict | None, val_images: int) -> tuple[bool, str]:
    """Promotion rule of a Choices project: image-level accuracy on the same validation images.

    - The split holds no labelled image: nothing is measured, the current version stays.
    - Neither version gets a validation image right (accuracy 0 for both): stays.
    - Otherwise the candidate is promoted when its accuracy is at least the current version's
      (ties go to the newer data).

    Args:
        candidate, current: :func:`ml_worker.evaluation.evaluate_choices` results (``current``
            None when the current version could not be evaluated).
        val_images: labelled images in the validation split.
    Returns: ``(promote, reason)``.
    """
    if val_images == 0:
        return False, "validation split has no labelled image: nothing to compare, the current version stays"
    c = candidate["accuracy"]
    if current is None:
        if c <= 0:
            return False, f"image accuracy {c:.3f}: the candidate gets no validation image right"
        return True, f"image accuracy {c:.3f} on {val_images} validation images; the current version could not be evaluated"
    o = current["accuracy"]
    if c <= 0 and o <= 0:
        return False, "image accuracy 0.000 for both versions: neither gets a validation image right"
    if c >= o:
        tie = (f"; a tie: {val_images} validation images do not tell the versions apart, the newer labels win"
               if round(c, 3) == round(o, 3) else "")
        return True, f"image accuracy {c:.3f} >= current {o:.3f} on the same {val_images} validation images{tie}"
    return False, f"image accuracy {c:.3f} < current {o:.3f} on the same {val_images} validation images"


@dataclass
class TrainOutcome:
    """Result of :func:`run_training`: the registered version name, whether it was promoted, why."""

    version: str
    promoted: bool
    reason: str
    metrics: dict


def _parent_bundle(path: str | Path, settings: Settings) -> dict:
    """The bundle a retrain continues from: the current version's, or, for a legacy single-stage
    version (a YOLO ``.pt``), the shipped default's (:func:`facemodels.two_stage.read_bundle`)."""
    from facemodels.two_stage import is_bundle, read_bundle

    return read_bundle(path if is_bundle(path) and Path(path).exists() else settings.default_model_path)


def _parts(path: str | Path, settings: Settings) -> tuple[Path, Path]:
    """Detector and classifier weights of the bundle a retrain continues from (:func:`_parent_bundle`)."""
    b = _parent_bundle(path, settings)
    return Path(b["detector_path"]), Path(b["classifier_path"])


def classifier_epochs(settings: Settings) -> int:
    """Epochs of the face-crop classifier per retrain: ``CLASSIFIER_EPOCHS``, else the recipe's."""
    from facemodels.classifier import RECIPE

    return settings.classifier_epochs or int(RECIPE["epochs"])


#: Highest face threshold :func:`tune_face_threshold` may choose, and its F1 tolerance.
MAX_FACE_THRESHOLD = 0.5
F1_TOLERANCE = 0.02


def tune_face_threshold(detector, samples, imgsz: int, grid: np.ndarray | None = None,
                        dets: list | None = None) -> tuple[float, dict]:
    """The face confidence that best separates faces from non-faces on labelled images.

    Runs the detector once (candidates down to 0.01) and, for each threshold of ``grid``
    (default 0.05 ... :data:`MAX_FACE_THRESHOLD`), matches the boxes above it one-to-one to the
    labelled faces at IoU >= 0.5 (class-agnostic, :func:`ml_worker.evaluation.acceptance`) and takes
    the lowest threshold whose F1 (faces found vs. boxes shown) is within :data:`F1_TOLERANCE` of
    the best.

    Args:
        detector: :class:`facemodels.detector.FaceModel`; samples: :class:`ml_worker.dataset.Sample` list.
        dets: the detector's detections of ``samples`` down to confidence 0.01, when the caller has
            them already (then ``detector`` is not run).
    Returns: ``(threshold, {"f1", "recall", "precision", "boxes_per_face"})`` at that threshold.
    """
    from ml_worker.evaluation import GTFace, PredFace, acceptance

    grid = np.round(np.arange(0.05, MAX_FACE_THRESHOLD + 0.001, 0.05), 2) if grid is None else grid
    if dets is None:
        dets = detector.detect([s.image for s in samples], conf=0.01, imgsz=imgsz)
    gts = [[GTFace(tuple(b[:4]), None) for b in s.boxes] for s in samples]
    fits = []
    for t in grid:
        tp = n_pred = n_gt = 0
        for d, g in zip(dets, gts):
            preds = [PredFace(x.box, None, x.conf) for x in d.detections if x.conf >= t]
            c = acceptance(preds, g)
            tp += c.class_fixed  # unlabelled boxes at IoU >= 0.5 count as "class fixed"
            n_pred += len(preds)
            n_gt += len(g)
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_gt if n_gt else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        fits.append((float(t), {"f1": round(f1, 4), "recall": round(r, 4), "precision": round(p, 4),
                                "boxes_per_face": round(n_pred / n_gt, 3) if n_gt else 0.0}))
    # the detector has seen these images: its confidence on them is higher than on new ones, so the
    # F1 peak sits too high (measured: 0.8-0.9 boxes per face on unseen people). A missed face
    # costs a person a drawing, a false box one deletion: take the lowest threshold within
    # F1_TOLERANCE of the best.
    top = max(f["f1"] for _, f in fits)
    return next((t, f) for t, f in fits if f["f1"] >= top - F1_TOLERANCE)


def _shrunk_face_threshold(fit: float, fit_info: dict, init, settings: Settings, samples, dets) -> tuple[float, dict]:
    """``tune_face_threshold``'s choice shrunk toward the prior threshold by the number of labelled
    faces (:func:`ml_worker.face_threshold.shrink_face_threshold`, prior from
    :func:`ml_worker.face_threshold.prior_threshold`: the threshold of the version the project's
    chain of retrains started from, not the last retrain's, which was fitted on some of these
    same faces); returns ``(threshold, fit figures at it + "fit_threshold", "parent_threshold",
    "prior_threshold", "faces")``."""
    from ml_worker.face_threshold import prior_threshold, shrink_face_threshold

    parent_bundle = _parent_bundle(init, settings)
    prior = prior_threshold(parent_bundle)
    n_faces = sum(len(s.boxes) for s in samples)
    t = shrink_face_threshold(fit, prior, n_faces)
    info = fit_info if t == fit else tune_face_threshold(None, samples, settings.imgsz, grid=np.array([t]), dets=dets)[1]
    return t, {**info, "fit_threshold": fit, "parent_threshold": parent_bundle.get("face_threshold"),
               "prior_threshold": prior, "faces": n_faces}


def detector_boxes(dets, samples, threshold: float) -> list[list]:
    """The detector's box on each labelled face: the box it would show (confidence >= ``threshold``)
    with the highest IoU with the face, when that IoU is >= 0.5, else None.

    Args:
        dets: the detector's detections of ``samples`` (:class:`facemodels.detector.ImageDetections`).
        samples: :class:`ml_worker.dataset.Sample` list; boxes in pixels.
    Returns: per sample, per labelled box: ``(x1, y1, x2, y2)`` pixels (clipped to the image) or None.
    """
    from ml_worker.evaluation import MATCH_IOU, iou_matrix

    out = []
    for s, d in zip(samples, dets):
        h, w = s.image.shape[:2]
        shown = np.array([x.box for x in d.detections if x.conf >= threshold], float).reshape(-1, 4)
        shown[:, [0, 2]] = shown[:, [0, 2]].clip(0, w)
        shown[:, [1, 3]] = shown[:, [1, 3]].clip(0, h)
        ious = iou_matrix(np.array([b[:4] for b in s.boxes], float).reshape(-1, 4), shown)
        row = []
        for i in range(len(s.boxes)):
            j = int(ious[i].argmax()) if shown.shape[0] else -1
            row.append(tuple(float(v) for v in shown[j]) if j >= 0 and ious[i, j] >= MATCH_IOU else None)
        out.append(row)
    return out


def face_crops(samples, splits: tuple[str, ...], det_boxes: list[list] | None = None) -> list:
    """Stage 2's training crops: ``(image, box (4,) pixels, class index)`` for every labelled face
    of the samples in ``splits``, plus, with ``det_boxes`` (:func:`detector_boxes`, aligned with
    ``samples``), the detector's box on that face with the same class. At serving time the classifier
    sees the detector's boxes, whose style (size, centring) differs from the person's; learning from
    both costs one more crop per face and epoch (measured in docs/classifier.md, "Fourth round").
    """
    crops = []
    for k, s in enumerate(samples):
        if s.split not in splits:
            continue
        for i, b in enumerate(s.boxes):
            crops.append((s.image, np.asarray(b[:4], float), int(b[4])))
            if det_boxes is not None and det_boxes[k][i] is not None:
                crops.append((s.image, np.asarray(det_boxes[k][i], float), int(b[4])))
    return crops


def _init_classifier(path: str | Path, schema):
    """The classifier a fine-tune starts from, its known classes renamed to the project's labels
    (:meth:`backend.labels.ProjectSchema.label_map`; kept as they are when two would get one name)."""
    from facemodels.classifier import FaceClassifier

    clf = FaceClassifier.load(path)
    lmap = schema.label_map(clf.classes)  # rename known classes to the project's labels
    clf.classes = [lmap.get(i, c) for i, c in enumerate(clf.classes)]
    if len(set(clf.classes)) != len(clf.classes):  # two old classes map to one label: keep old names
        clf = FaceClassifier.load(path)
    return clf


def train_two_stage(ds, schema, init: str | Path, settings: Settings, work: Path,
                    progress: ProgressFn | None = None, seed: int | None = None) -> dict:
    """Fine-tune both stages of ``init`` on a built dataset and write a candidate bundle.

    Stage 1: the YOLO face detector on every labelled box as one class ``face`` (so its boxes
    follow the project's box style); for a Choices dataset (``ds.kind == "choices"``) the
    detector and its face threshold are kept from ``init``: a choice says nothing about where the
    face is. Stage 2: the face-crop classifier on the train split's crops
    with the project's classes; classes the current classifier already names (by name, synonyms
    included: :meth:`backend.labels.ProjectSchema.label_map`) keep their weights.

    Args:
        ds: :class:`ml_worker.dataset.DatasetInfo` (with ``samples``).
        init: the current version (bundle ``.json``, or a legacy ``.pt``).
        work: job folder; the candidate lands in ``work/candidate/bundle.json``.
        progress: called with ``{"stage", "epoch", "epochs", "message"}``.
    Stage 2 learns from each labelled face's box and, with ``CLASSIFIER_DETECTOR_CROPS`` (default
    on), also from the retrained detector's box on that face (:func:`face_crops`). Its settings:
    the new-class recipe (:data:`facemodels.classifier.RECIPE`), or, for a project whose classes
    the shipped classifier knew before its first label (``facemodels.two_stage.classifier_recipe``
    "known": expression projects), the classifier's own crop margin and
    :data:`facemodels.classifier.KNOWN_CLASSES_RECIPE`; the choice is recorded in the candidate
    bundle (``classifier_recipe``) and kept by the project's later retrains.

    Returns: ``{"bundle": path, "detector_seconds", "classifier_seconds", "classifier": metrics,
        "classifier_recipe": "new" | "known",
        "detector_boxes": per sample the detector's box on each labelled face or None (None when off
        or for Choices), ...}``.
    Raises: ValueError when the train split has no labelled face.
    """
    from facemodels.classifier import fine_tune as fine_tune_classifier
    from facemodels.classifier import stage2_settings
    from facemodels.two_stage import write_bundle
    from ml_worker.dataset import write_face_dataset

    seed = settings.seed if seed is None else seed
    det_init, clf_init = _parts(init, settings)
    # stage 2 starts from the bundle's classifier_init for classes the served classifier does not know
    # (the shipped default: the original face-api.js port, not the expression fine-tune; docs/classifier.md)
    from facemodels.two_stage import classifier_init_path, classifier_recipe

    parent = _parent_bundle(init, settings)
    clf_init = Path(classifier_init_path(parent, list(schema.labels)))
    # classes known before the project's first label (expression projects): a gentler fine-tune
    recipe = classifier_recipe(parent, list(schema.labels))
    if not any(s.boxes for s in ds.samples if s.split == "train"):
        raise ValueError("the train split has no labelled face (Choices projects: no face found in its images): "
                         "nothing to learn from")
    det_boxes = None  # the retrained detector's box on each labelled face (CLASSIFIER_DETECTOR_CROPS)
    det_epochs, clf_epochs = settings.detector_epochs, classifier_epochs(settings)

    def report(**f):
        if progress:
            progress(f)

    t0 = time.time()
    if getattr(ds, "kind", "boxes") == "choices":
        # image-level choices have no boxes: the detector (and its face threshold) stays as it is,
        # only the classifier learns, from the crops of the faces the detector found
        det_epochs = 0
        best_det = det_init
        face_thr, thr_fit = parent.get("face_threshold"), None
        report(stage="train classifier", epoch=0, message=f"image-level choices: the face detector is kept; "
                                                          f"classifier on {len(face_crops(ds.samples, ('train',)))} face crops")
    else:
        face_yaml = write_face_dataset(ds, work / "faces")
        report(stage="train detector", epoch=0, message=f"stage 1: face detector on {len(ds.train_ids)} images")
        best_det = fine_tune(det_init, face_yaml, work / "detector", settings, epochs=det_epochs, seed=seed,
                             on_epoch=lambda i: report(stage="train detector", epoch=i["epoch"],
                                                       stage_epoch=i["epoch"], stage_epochs=i["epochs"],
                                                       message=f"stage 1 (face detector): epoch {i['epoch']}/{i['epochs']}"))
        from facemodels.detector import FaceModel

        t_pred = time.time()
        dets = FaceModel(best_det, settings.device).detect([s.image for s in ds.samples], conf=0.01,
                                                           imgsz=settings.imgsz)
        pred_s = time.time() - t_pred  # the status page's evaluate time on a first job (backend.jobprogress)
        face_thr, thr_fit = tune_face_threshold(None, ds.samples, settings.imgsz, dets=dets)
        face_thr, thr_fit = _shrunk_face_threshold(face_thr, thr_fit, init, settings, ds.samples, dets)
        if settings.classifier_detector_crops:
            det_boxes = detector_boxes(dets, ds.samples, face_thr)
        del dets
        report(stage="train detector", message=f"face threshold {face_thr:.2f} (F1 {thr_fit['f1']:.2f} on the "
                                               f"{len(ds.samples)} labelled images)",
               predict_seconds=round(pred_s, 3), predict_images=len(ds.samples))
    det_s = time.time() - t0
    if getattr(ds, "kind", "boxes") != "choices":  # stage 2 starts here: its crops are cut in it (status page's times)
        report(stage="train classifier", message=f"stage 2 (face classifier): {clf_epochs} epochs on the labelled faces"
                                                 + ("; the classifier knows the project's classes: fine-tuned gently"
                                                    if recipe == "known" else ""))

    crops = face_crops(ds.samples, ("train",), det_boxes)
    clf = _init_classifier(clf_init, schema)
    overrides = stage2_settings(recipe, clf)
    t1 = time.time()

    def on_clf_epoch(epoch, epochs, loss):
        report(stage="train classifier", epoch=det_epochs + epoch, epochs=det_epochs + epochs,
               stage_epoch=epoch, stage_epochs=epochs,
               message=f"stage 2 (face classifier): epoch {epoch}/{epochs}, loss {loss:.3f}")

    tuned, cm = fine_tune_classifier(clf, crops, list(schema.labels), epochs=clf_epochs, seed=seed,
                                     on_epoch=on_clf_epoch, **overrides)
    clf_s = time.time() - t1
    tuned.save(work / "classifier.pt")
    cand_dir = work / "candidate"
    if cand_dir.exists():
        shutil.rmtree(cand_dir)
    nms_iou = parent.get("nms_iou")
    bundle = write_bundle(cand_dir, best_det, work / "classifier.pt", list(schema.labels), imgsz=settings.imgsz,
                          face_threshold=face_thr, face_threshold_fit=thr_fit, nms_iou=nms_iou,
                          classifier_recipe=recipe)
    return {"bundle": bundle, "detector_seconds": round(det_s, 1), "classifier_seconds": round(clf_s, 1),
            "seed": seed, "classifier_init": str(clf_init), "classifier_recipe": recipe, "detector_boxes": det_boxes,
            "face_threshold": face_thr, "face_threshold_fit": thr_fit, "nms_iou": nms_iou,
            "classifier": {k: v for k, v in cm.items() if k in ("loss", "train_seconds", "n_train", "recipe",
                                                                   "kept_classes")}}


#: The classifier a refit version had when its gate passed, kept in its version folder.
GATED_CLASSIFIER = "classifier_gated.pt"


def gate_view(path: str | Path, work: Path) -> Path:
    """The model a gate should evaluate for the version at ``path`` (a bundle ``.json``).

    A version whose classifier was refit after its gate (:func:`refine_classifier`) has trained
    on the validation faces that the next gate uses (the split is fixed by task id), so it would
    score too well there and keep better candidates out. For such a version (its folder holds
    :data:`GATED_CLASSIFIER`) this writes, under ``work``, a bundle of its detector with the
    classifier it had when its own gate passed, and returns that; otherwise ``path`` itself.
    """
    from facemodels.two_stage import is_bundle, read_bundle, write_bundle

    p = Path(path)
    gated = p.parent / GATED_CLASSIFIER
    if not is_bundle(p) or not gated.is_file():
        return p
    b = read_bundle(p)
    if work.exists():
        shutil.rmtree(work)
    return write_bundle(work, Path(b["detector_path"]), gated, list(b["classes"]), onnx=False,
                        imgsz=b.get("imgsz"), face_threshold=b.get("face_threshold"),
                        face_threshold_fit=b.get("face_threshold_fit"), nms_iou=b.get("nms_iou"))


def refine_enabled(settings: Settings) -> bool:
    """True when :func:`refine_classifier` has something to do (``CLASSIFIER_REFIT_EPOCHS`` > 0)."""
    return int(settings.classifier_refit_epochs or 0) > 0


def refine_classifier(trained: dict, ds, schema, settings: Settings, progress: ProgressFn | None = None) -> dict | None:
    """Second pass of stage 2, for the version that will serve: more epochs on every labelled face.

    The classifier of :func:`train_two_stage` learnt from the train split only (the validation
    split is held out for the gate); with 40 labels that is ~32 images. This continues
    fine-tuning the candidate's classifier for ``CLASSIFIER_REFIT_EPOCHS`` epochs (the recipe's
    settings, a fresh cosine schedule) on the face crops of **both** splits. With
    ``CLASSIFIER_REFIT_FROM=parent`` it instead runs the recipe again, for that many epochs, from
    the classifier the retrain started from. The candidate's ``classifier.pt`` and ``bundle.json``
    are rewritten (same detector, face threshold and NMS; the new folder is written beside the
    old one and swapped in). Call it after the gate, so that the gate's figures stay those of a
    model that never saw the validation images. Measured in docs/training.md.

    Args:
        trained: :func:`train_two_stage`'s result (its ``bundle`` is rewritten in place).
        ds: the :class:`ml_worker.dataset.DatasetInfo` the candidate was trained from.
        progress: called with ``{"stage": "refine classifier", "message"}``, then after each epoch
            with ``{"stage", "stage_epoch", "stage_epochs"}``.
    Returns: ``{"epochs", "from" ("candidate" | "parent"), "n_faces", "n_crops" (with detector crops), "seconds"}``, or None when
        off (``CLASSIFIER_REFIT_EPOCHS`` = 0) or when the dataset has no labelled face.
    Raises: ValueError for an unknown ``CLASSIFIER_REFIT_FROM`` (before any work), and from
        ``fine_tune`` for bad crops; FileNotFoundError when the candidate bundle is gone.
    """
    from facemodels.classifier import FaceClassifier
    from facemodels.classifier import fine_tune as fine_tune_classifier
    from facemodels.classifier import stage2_settings
    from facemodels.two_stage import read_bundle, write_bundle

    epochs = int(settings.classifier_refit_epochs or 0)
    if epochs <= 0:
        return None
    start = settings.classifier_refit_from
    if start not in ("candidate", "parent"):
        raise ValueError(f"CLASSIFIER_REFIT_FROM must be 'candidate' or 'parent', got {start!r}")
    t0 = time.time()
    crops = face_crops(ds.samples, ("train", "val"), trained.get("detector_boxes"))
    if not crops:
        return None
    bundle_path = Path(trained["bundle"])
    b = read_bundle(bundle_path)
    n_faces = sum(len(s.boxes) for s in ds.samples)
    if progress:
        progress({"stage": "refine classifier",
                  "message": f"stage 2 (face classifier): {epochs} more epochs on all {n_faces} labelled faces"})
    cand = FaceClassifier.load(b["classifier_path"])
    if start == "parent" and trained.get("classifier_init"):
        # the same recipe from the same start as the candidate, on every face: a full second fine-tune
        clf = _init_classifier(trained["classifier_init"], schema)
    else:  # "candidate": continue from the gated classifier, a fresh cosine schedule
        clf, start = cand, "candidate"
    recipe = b.get("classifier_recipe", "new")
    tuned, _ = fine_tune_classifier(clf, crops, list(cand.classes), epochs=epochs,
                                    seed=int(trained.get("seed", settings.seed)),
                                    **stage2_settings(recipe, clf),
                                    on_epoch=(lambda e, n, _loss: progress({"stage": "refine classifier", "stage_epoch": e,
                                                                           "stage_epochs": n})) if progress else None)
    work = bundle_path.parent.parent
    tuned.save(work / "classifier.pt")
    # the new candidate is written beside the old one, then swapped in: a failure keeps the old one
    tmp = work / "candidate_refit"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_bundle(tmp, Path(b["detector_path"]), work / "classifier.pt", list(b["classes"]),
                 imgsz=b.get("imgsz", settings.imgsz), face_threshold=b.get("face_threshold"),
                 face_threshold_fit=b.get("face_threshold_fit"), nms_iou=b.get("nms_iou"), classifier_recipe=recipe)
    shutil.rmtree(bundle_path.parent)
    tmp.rename(bundle_path.parent)
    out = {"epochs": epochs, "from": start, "n_faces": n_faces, "n_crops": len(crops),
           "seconds": round(time.time() - t0, 1)}
    trained["refined"] = out
    return out


def _val_samples(ds, schema) -> list:
    from ml_worker.evaluation import GTFace

    return [(s.image, [GTFace(tuple(b[:4]), schema.labels[int(b[4])]) for b in s.boxes])
            for s in ds.samples if s.split == "val"]


def run_training(settings: Settings, job_id: int, progress: ProgressFn | None = None) -> TrainOutcome:
    """Run one training job end to end (the job must be ``running``; see ``ml_worker.tasks``).

    Steps: snapshot the annotations (latest non-cancelled per task), build the dataset with the
    deterministic split (val holds every class the labels allow), fine-tune both stages from the
    promoted version (:func:`train_two_stage`), evaluate candidate and current version on the same
    validation images through the product's prediction path
    (:func:`ml_worker.evaluation.evaluate_model`), store the version's files in the database with its
    row (:mod:`modelstore`; one transaction), register,
    promote by :func:`gate`.

    A Choices project (image-level classes, no boxes): the current version's detector finds each
    labelled image's face (:func:`ml_worker.dataset.build_choice_dataset`), only the classifier
    is fine-tuned, and versions are compared by image-level accuracy on the validation images
    (:func:`ml_worker.evaluation.evaluate_choices`, :func:`gate_choices`).

    Raises: ValueError when there are too few usable annotated tasks (message says how many).
    """

    import modelstore
    from backend import registry
    from backend.db import session_scope
    from backend.images import ls_client
    from backend.labels import ProjectSchema
    from backend.models import ModelVersion, Project, TrainingJob
    from facemodels.detector import ModelCache
    from ml_worker.evaluation import evaluate_choices, evaluate_model
    from ml_worker.tasks import take_snapshot

    from backend import jobprogress

    def update(**fields):
        with session_scope(settings.database_url) as s:
            j = s.get(TrainingJob, job_id)
            for k, v in jobprogress.record(j, fields).items():  # per-stage epochs and times (status page)
                setattr(j, k, v)
        if progress:
            progress(fields)

    with session_scope(settings.database_url) as s:
        job = s.get(TrainingJob, job_id)
        pid = job.project_id
        proj = s.get(Project, pid)
        ls_url = proj.ls_url or settings.label_studio_url
        current = registry.promoted_version(s, pid, settings)
    # the promoted version comes from the database's model store (another machine may have trained it)
    current_info = (current.id, current.version, str(modelstore.model_path(settings, current)), current.classes)
    update(stage="snapshot", message="reading annotations from Label Studio")
    client = ls_client(settings, ls_url)
    project = client.projects.get(id=pid)
    schema = ProjectSchema.parse(project.label_config)
    with session_scope(settings.database_url) as s:
        registry.upsert_project(s, pid, label_config=project.label_config, title=project.title)
    # labelled tasks; a job asked for during a run on the same labels is skipped here (JobSkipped)
    tasks = take_snapshot(settings, job_id, client, pid, project.label_config)
    if len(tasks) < 2:
        raise ValueError(f"need at least 2 annotated tasks to train, project {pid} has {len(tasks)}")

    job_dir = Path(settings.var_dir) / "jobs" / f"job_{job_id}"
    if job_dir.exists():
        shutil.rmtree(job_dir)
    update(stage="dataset", message=f"building dataset from {len(tasks)} annotated tasks")
    from ml_worker.dataset import build_dataset

    cache = ModelCache(settings.device)
    # a Choices project's faces are found by the current version's detector (ml_worker.dataset)
    ds = build_dataset(tasks, schema, job_dir / "dataset", settings, ls_url,
                       model=cache.get(current_info[2]) if schema.is_choices else None)
    if ds.no_face:
        log.warning("job %s: no face found in %d labelled images (e.g. task %s): they count in validation only",
                    job_id, len(ds.no_face), ds.no_face[0])
    for tid, msg in ds.problems:
        log.warning("job %s: task %s left out: %s", job_id, tid, msg)
    if len(ds.train_ids) < 1 or len(ds.val_ids) < 1:
        raise ValueError(f"need at least 2 usable annotated tasks, have {len(ds.train_ids) + len(ds.val_ids)} "
                         f"(left out: {ds.problems[:5]})")
    total = (0 if schema.is_choices else settings.detector_epochs) + classifier_epochs(settings)
    plan = ([] if schema.is_choices else [{"stage": "train detector", "epochs": settings.detector_epochs}]) + [
        {"stage": "train classifier", "epochs": classifier_epochs(settings)}, {"stage": "evaluate", "epochs": 0}] + (
        [{"stage": "refine classifier", "epochs": int(settings.classifier_refit_epochs), "if": "promoted"}]
        if refine_enabled(settings) and not schema.is_choices else [])
    update(stage="train", n_train=len(ds.train_ids), n_val=len(ds.val_ids), epochs=total, plan=plan,
           message=f"fine-tuning on {len(ds.train_ids)} images, validating on {len(ds.val_ids)}")

    def on_progress(f):
        update(**{k: v for k, v in f.items() if k in ("stage", "epoch", "epochs", "message", "stage_epoch",
                                                      "stage_epochs", "predict_seconds", "predict_images")})

    t0 = time.time()
    trained = train_two_stage(ds, schema, current_info[2], settings, job_dir, on_progress)
    train_s = time.time() - t0
    update(stage="evaluate", message="evaluating candidate and current version on the validation split")
    if schema.is_choices:
        val = [(s.image, schema.labels[s.label]) for s in ds.samples if s.split == "val" and s.label is not None]
        evaluate = evaluate_choices
    else:
        val = _val_samples(ds, schema)
        evaluate = evaluate_model
    cand = evaluate(cache.get(trained["bundle"]), val, schema, settings)
    try:
        # a version refit after its gate trained on these validation faces: judge it by its gated classifier
        cur = evaluate(cache.get(gate_view(current_info[2], job_dir / "current_gated")), val, schema, settings)
    except (FileNotFoundError, ValueError) as e:
        log.warning("job %s: current version %s not evaluated: %s", job_id, current_info[1], e)
        cur = None
    if schema.is_choices:
        promote_it, reason = gate_choices(cand, cur, ds.val_labels())
    else:
        promote_it, reason = gate(cand, cur, ds.val_boxes())

    refined = None
    if promote_it and not schema.is_choices and refine_enabled(settings):
        # the gate judged a classifier that never saw the validation split; the version that serves
        # learns from every labelled face (docs/training.md: +0.03 accepted at 40 labels)
        t1 = time.time()
        try:
            shutil.copyfile(Path(trained["bundle"]).parent / "classifier.pt", job_dir / GATED_CLASSIFIER)
            refined = refine_classifier(trained, ds, schema, settings, progress=on_progress)
        except Exception as e:  # noqa: BLE001 - the gated candidate stays as it is
            log.warning("job %s: classifier refit failed, the gated candidate is kept: %s: %s", job_id,
                        e.__class__.__name__, e)
            refined = {"error": f"{e.__class__.__name__}: {str(e)[:300]}"}
        train_s += time.time() - t1

    with session_scope(settings.database_url) as s:
        name = registry.next_version_name(s, pid)
    from facemodels.two_stage import write_bundle

    b = trained["bundle"]
    # the version folder is built in the job folder, stored in the database with the version row,
    # then copied from there into this machine's model folder (modelstore.materialise)
    folder = job_dir / "version" / name
    if folder.exists():
        shutil.rmtree(folder)
    bundle = write_bundle(folder, b.parent / "detector.pt", b.parent / "classifier.pt", list(schema.labels),
                          imgsz=settings.imgsz, trained_by_job=job_id, face_threshold=trained["face_threshold"],
                          face_threshold_fit=trained["face_threshold_fit"], nms_iou=trained["nms_iou"],
                          classifier_recipe=trained.get("classifier_recipe", "new"))
    if refined and "error" not in refined:
        # kept beside the served classifier, for the next retrain's gate (gate_view)
        shutil.copyfile(job_dir / GATED_CLASSIFIER, folder / GATED_CLASSIFIER)
    from backend.hashing import file_sha256

    sha = file_sha256(bundle)
    plots = {}
    for src in [job_dir / "detector" / "train" / n for n in ("results.png", "results.csv",
                                                               "confusion_matrix_normalized.png")]:
        if src.exists():
            dst = folder / f"detector_{src.name}"
            shutil.copyfile(src, dst)
            plots[f"detector {src.name}"] = dst.name  # a file of the stored version (backend.status)
    metrics = {"candidate": cand, "current": cur, "current_version": current_info[1], "n_train": len(ds.train_ids),
               "n_val": len(ds.val_ids), "val_faces": ds.val_boxes(), "val_task_ids": ds.val_ids,
               "moved_to_val": ds.moved_to_val, "train_seconds": round(train_s, 1),
               "detector_seconds": trained["detector_seconds"], "classifier_seconds": trained["classifier_seconds"],
               "face_threshold": trained["face_threshold"], "face_threshold_fit": trained["face_threshold_fit"],
               "classifier_training": trained["classifier"], "classifier_refit": refined,
               "plots": plots, "left_out": ds.problems,
               "kind": schema.kind}
    if schema.is_choices:
        metrics.update(val_images=ds.val_labels(), no_face=ds.no_face, detector_retrained=False)
    with session_scope(settings.database_url) as s:
        modelstore.store_folder(s, pid, name, folder)  # one transaction with the version row
        v = ModelVersion(project_id=pid, version=name, path=str(modelstore.version_dir(settings, pid, name) / bundle.name),
                         sha256=sha,
                         classes_json=json.dumps(schema.labels), parent_id=current_info[0],
                         metrics_json=json.dumps(metrics, default=str), training_job_id=job_id,
                         status="candidate", gate_reason=reason)
        s.add(v)
        s.flush()
        if promote_it:
            registry.promote(s, v, reason)
        else:
            v.status = "rejected"
        vid = v.id
    modelstore.materialise(settings, pid, name)
    shutil.rmtree(folder.parent, ignore_errors=True)
    left = f"; {len(ds.problems)} annotated tasks left out (e.g. task {ds.problems[0][0]}: {ds.problems[0][1]})" \
        if ds.problems else ""
    figures = (f"image accuracy={cand['accuracy']:.3f}" if schema.is_choices
               else f"mAP50={cand['mAP50']:.3f} acceptance={cand['acceptance_rate']:.2f}")
    update(version_id=vid, stage="registered",
           message=f"{name}: {'promoted' if promote_it else 'rejected'} ({reason}); {figures}{left}")
    return TrainOutcome(name, promote_it, reason, metrics)
