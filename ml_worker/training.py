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


def gate(candidate: dict, current: dict | None, reason_if_no_current: str) -> tuple[bool, str]:
    """Promotion rule: promote when there is nothing comparable to beat (first model for the
    project's classes, or new classes), else when the candidate's mAP50-95 on the same
    validation split is at least the current version's (ties go to the newer data).

    Returns: ``(promote, reason)``.
    """
    if current is None:
        return True, reason_if_no_current
    c, o = candidate["mAP50-95"], current["mAP50-95"]
    if c >= o:
        return True, f"mAP50-95 {c:.3f} >= current {o:.3f} on the same validation split"
    return False, f"mAP50-95 {c:.3f} < current {o:.3f} on the same validation split"


@dataclass
class TrainOutcome:
    """Result of :func:`run_training`: the registered version name, whether it was promoted, why."""

    version: str
    promoted: bool
    reason: str
    metrics: dict


def run_training(settings: Settings, job_id: int, progress: ProgressFn | None = None) -> TrainOutcome:
    """Run one training job end to end (the job must be ``running``; see ``ml_worker.tasks``).

    Steps: snapshot the annotations (latest non-cancelled per task), build the dataset with the
    deterministic split, fine-tune from the promoted version, evaluate candidate and current
    version on the same split, store weights atomically, register, promote by :func:`gate`.

    Raises: ValueError when there are too few usable annotated tasks (message says how many).
    """

    from backend import registry
    from backend.db import session_scope
    from backend.images import ls_client
    from backend.labels import ProjectSchema
    from backend.lsapi import snapshot
    from backend.models import ModelVersion, Project, TrainingJob

    def update(**fields):
        with session_scope(settings.database_url) as s:
            j = s.get(TrainingJob, job_id)
            for k, v in fields.items():
                setattr(j, k, v)
        if progress:
            progress(fields)

    with session_scope(settings.database_url) as s:
        job = s.get(TrainingJob, job_id)
        pid = job.project_id
        proj = s.get(Project, pid)
        ls_url = proj.ls_url or settings.label_studio_url
        current = registry.promoted_version(s, pid, settings)
        current_info = (current.id, current.version, current.path, current.classes)
    update(stage="snapshot", message="reading annotations from Label Studio")
    client = ls_client(settings, ls_url)
    project = client.projects.get(id=pid)
    schema = ProjectSchema.parse(project.label_config)
    with session_scope(settings.database_url) as s:
        registry.upsert_project(s, pid, label_config=project.label_config, title=project.title)
    tasks = [t for t in snapshot(client, pid) if t.result is not None]
    if len(tasks) < 2:
        raise ValueError(f"need at least 2 annotated tasks to train, project {pid} has {len(tasks)}")

    job_dir = Path(settings.var_dir) / "jobs" / f"job_{job_id}"
    if job_dir.exists():
        shutil.rmtree(job_dir)
    update(stage="dataset", message=f"building dataset from {len(tasks)} annotated tasks")
    from ml_worker.dataset import build_dataset

    ds = build_dataset(tasks, schema, job_dir / "dataset", settings, ls_url)
    for tid, msg in ds.problems:
        log.warning("job %s: task %s left out: %s", job_id, tid, msg)
    if len(ds.train_ids) < 1 or len(ds.val_ids) < 1:
        raise ValueError(f"need at least 2 usable annotated tasks, have {len(ds.train_ids) + len(ds.val_ids)} "
                         f"(left out: {ds.problems[:5]})")
    update(stage="train", n_train=len(ds.train_ids), n_val=len(ds.val_ids), epochs=settings.train_epochs,
           message=f"fine-tuning on {len(ds.train_ids)} images, validating on {len(ds.val_ids)}")

    init = current_info[2] if Path(current_info[2]).exists() else BASE_YAML

    def on_epoch(info):
        m = info["metrics"]
        update(epoch=info["epoch"], epochs=info["epochs"],
               message=f"epoch {info['epoch']}/{info['epochs']} mAP50={m.get('metrics/mAP50(B)', 0):.3f}")

    t0 = time.time()
    best = fine_tune(init, ds.yaml_path, job_dir, settings, on_epoch=on_epoch)
    train_s = time.time() - t0
    update(stage="evaluate", message="evaluating candidate and current version on the validation split")
    cand = evaluate(best, ds.yaml_path, job_dir, settings, name="val_candidate")
    same_classes = [c.lower() for c in current_info[3]] == [c.lower() for c in schema.labels]
    cur = evaluate(current_info[2], ds.yaml_path, job_dir, settings, name="val_current") if (
        same_classes and Path(current_info[2]).exists()) else None
    promote_it, reason = gate(cand, cur, "first model trained for this project's classes" if not same_classes
                              else "no comparable current version")

    with session_scope(settings.database_url) as s:
        name = registry.next_version_name(s, pid)
    path, sha = registry.store_weights(best, settings.model_dir, pid, name)
    plots = {}
    for src in [job_dir / "train" / "results.png", Path(cand["save_dir"]) / "confusion_matrix.png",
                job_dir / "train" / "results.csv"]:
        if src.exists():
            dst = path.with_name(f"{name}.{src.name}")
            shutil.copyfile(src, dst)
            plots[src.name] = str(dst)
    metrics = {"candidate": cand, "current": cur, "current_version": current_info[1], "n_train": len(ds.train_ids),
               "n_val": len(ds.val_ids), "val_task_ids": ds.val_ids, "train_seconds": round(train_s, 1),
               "plots": plots, "left_out": ds.problems}
    with session_scope(settings.database_url) as s:
        v = ModelVersion(project_id=pid, version=name, path=str(path), sha256=sha,
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
    left = f"; {len(ds.problems)} annotated tasks left out (e.g. task {ds.problems[0][0]}: {ds.problems[0][1]})" \
        if ds.problems else ""
    update(version_id=vid, stage="registered",
           message=f"{name}: {'promoted' if promote_it else 'rejected'} ({reason}); "
                   f"mAP50={cand['mAP50']:.3f} mAP50-95={cand['mAP50-95']:.3f}{left}")
    return TrainOutcome(name, promote_it, reason, metrics)
