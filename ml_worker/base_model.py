"""Train faceloop's default model (the one every new project starts from).

``faceloop train-base`` calls :func:`train_base`. The recipe: ultralytics ``yolov5nu`` built from
its yaml (no downloaded weights), trained on ``../shared/data/expressions`` (YOLO layout, 8
expression classes), image size 320 px, fixed seed. Everything the run used is written to
``<out>/train_args.json`` beside the weights so that the model card can quote it.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import yaml

from backend.config import REPO_ROOT, configure_ultralytics
from backend.hashing import file_sha256

SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()
EXPRESSION_CLASSES = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt"]


def dataset_yaml(folder: Path, out: Path, splits: dict[str, str] | None = None) -> Path:
    """Write a copy of ``folder/data.yaml`` with an absolute ``path:`` so ultralytics finds images.

    Args:
        folder: a ``../shared/data/<set>`` folder (``images/{train,val}``, ``labels/...``, ``data.yaml``).
        out: where to write the yaml.
        splits: optional override of the ``train``/``val`` entries (paths relative to ``folder``).
    Returns: ``out``.
    Raises: FileNotFoundError if ``folder/data.yaml`` is missing.
    """
    src = yaml.safe_load((folder / "data.yaml").read_text())
    src["path"] = str(folder.resolve())
    if splits:
        src.update(splits)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(src, sort_keys=False))
    return out


def train_base(
    out_dir: Path,
    data_dir: Path = SHARED_DATA / "expressions",
    epochs: int = 60,
    hours: float | None = None,
    imgsz: int = 320,
    batch: int = 32,
    seed: int = 0,
    device: str = "",
    workers: int = 2,
    init: Path | None = None,
    scale: float = 0.5,
) -> Path:
    """Train ``yolov5nu`` from its yaml on an expression set and copy ``best.pt`` to ``out_dir``.

    Args:
        out_dir: folder for ``faceloop-base.pt``, ``train_args.json`` and the ultralytics run.
        data_dir: dataset in YOLO layout (default ``../shared/data/expressions``).
        epochs: epochs (ultralytics recomputes them when ``hours`` is given).
        hours: optional wall-clock budget in hours (ultralytics ``time=``).
        imgsz: training size in pixels (square letterbox).
        batch, seed, device, workers: passed to ultralytics.
        init: continue from these weights (a second stage after a run from the yaml) instead of
            building ``yolov5nu.yaml``; the learning-rate schedule starts afresh.
        scale: ultralytics' random scale gain ``1 +- scale``; 0.9 shrinks crops down to 10% so
            that mosaics show faces as small as in room and car scenes.
    Returns: path of the copied weights.
    Raises: FileNotFoundError when the data folder is absent.
    """
    configure_ultralytics()
    from ultralytics import YOLO

    out_dir = Path(out_dir).resolve()
    if not (data_dir / "data.yaml").exists():
        raise FileNotFoundError(f"no dataset at {data_dir} (expected data.yaml); is ../shared/data there?")
    data = dataset_yaml(data_dir, out_dir / "data.yaml")
    args = dict(
        data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, seed=seed, deterministic=True,
        workers=workers, device=device or None, project=str(out_dir), name="run", exist_ok=True,
        cache="ram", amp=False, plots=True, patience=0, verbose=True, scale=scale,
    )
    if hours:
        args["time"] = hours
    t0 = time.time()
    start = str(init) if init else "yolov5nu.yaml"
    init_sha = file_sha256(Path(init)) if init else None
    model = YOLO(start, task="detect")
    model.train(**args)
    elapsed = time.time() - t0
    best = out_dir / "run" / "weights" / "best.pt"
    target = out_dir / "faceloop-base.pt"
    shutil.copyfile(best, target)
    import torch

    record = {
        "model": "yolov5nu.yaml", "init": str(init) if init else None,
        "init_sha256": init_sha, "data": str(data_dir), "train_args": {k: v for k, v in args.items() if k != "project"},
        "seconds": round(elapsed, 1), "hardware": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    (out_dir / "train_args.json").write_text(json.dumps(record, indent=2))
    return target


def install_base(weights: Path, target: Path | None = None) -> Path:
    """Copy trained weights to ``models/faceloop-base.pt`` (the single-stage model) with a ``.json``
    sidecar of class names and the weights' sha256."""
    from backend.config import SINGLE_STAGE_BASE_PATH

    return _install(weights, Path(target or SINGLE_STAGE_BASE_PATH))


def _install(weights: Path, target: Path, expect_names: list[str] | None = None, **meta_extra) -> Path:
    """Copy weights to ``target`` atomically and update its ``.json`` sidecar (``names``,
    ``sha256``, ``meta_extra``). Raises: ValueError when the class names are not ``expect_names``."""
    from facemodels.detector_meta import read_class_names

    names = read_class_names(Path(weights))
    if expect_names is not None and names != expect_names:
        raise ValueError(f"{weights} has classes {names}, expected {expect_names}")
    tmp = target.with_suffix(".pt.tmp")
    shutil.copyfile(weights, tmp)
    tmp.replace(target)
    side = target.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.exists() else {}
    meta["names"] = names
    meta["sha256"] = file_sha256(target)
    meta.update(meta_extra)
    side.write_text(json.dumps(meta, indent=2))
    return target


# --------------------------------------------------------------------------------------------
# Stage 1 of the two-stage pre-labels (issue 10): a one-class YOLO face detector.
# --------------------------------------------------------------------------------------------

FACE_NAMES = {0: "face"}
FACE_SOURCES = ("awake_sleep", "expressions", "synthetic")


def _read_boxes(label: Path) -> list[list[float]]:
    """Rows ``[cls, cx, cy, w, h]`` (0-1, image-relative) of a YOLO label file; [] if empty/absent."""
    if not label.exists():
        return []
    rows = []
    for line in label.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5:
            rows.append([float(v) for v in parts[:5]])
    return rows


def _write_face_labels(rows: list[list[float]], out: Path) -> None:
    out.write_text("".join(f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for _c, cx, cy, w, h in rows))


def _link_split(src_dir: Path, split: str, names: list[str], img_out: Path, lab_out: Path, prefix: str) -> int:
    """Symlink images of ``src_dir/images/split`` and write one-class labels; returns image count."""
    n = 0
    for name in names:
        img = src_dir / "images" / split / name
        dst = img_out / f"{prefix}{name}"
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(img.resolve())
        _write_face_labels(_read_boxes(src_dir / "labels" / split / (Path(name).stem + ".txt")),
                           lab_out / (Path(dst.name).stem + ".txt"))
        n += 1
    return n


def _paste_faces(
    scene_dir: Path, crop_dir: Path, n: int, img_out: Path, lab_out: Path, seed: int, split: str = "train",
    skip_prefix: str | None = None,
) -> int:
    """Synthesise ``n`` scene images with extra small faces pasted in (small-face augmentation).

    Each image: one ``scene_dir`` train image (its own labelled face kept) plus 1-3 tight face
    crops from ``crop_dir`` (images whose single box covers >= 80% of the picture), resized to
    5-20% of the scene width, pasted with a feathered (Gaussian-blurred) alpha edge where they
    overlap no other box. Written as JPEG q90 under ``img_out`` with one-class labels.
    """
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    scenes = sorted(p for p in (scene_dir / "images" / split).glob("*.jpg")
                    if not (skip_prefix and p.name.startswith(skip_prefix)))
    crops = []
    for lab in sorted((crop_dir / "labels" / split).glob("*.txt")):
        rows = _read_boxes(lab)
        if len(rows) == 1 and rows[0][3] * rows[0][4] >= 0.8:
            crops.append(crop_dir / "images" / split / (lab.stem + ".jpg"))
    crops = [c for c in crops if c.exists()]
    if not scenes or not crops:
        return 0
    made = 0
    for k in range(n):
        scene_path = scenes[int(rng.integers(len(scenes)))]
        scene = Image.open(scene_path).convert("RGB")
        W, H = scene.size
        boxes = [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
                 for _c, cx, cy, w, h in _read_boxes(scene_dir / "labels" / split / (scene_path.stem + ".txt"))]
        rows = [[0, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]] for b in boxes]
        for _ in range(int(rng.integers(1, 4))):
            crop = Image.open(crops[int(rng.integers(len(crops)))]).convert("RGB")
            fw = float(rng.uniform(0.05, 0.20)) * W
            fh = fw * crop.height / max(crop.width, 1)
            if fh >= H * 0.5:
                continue
            for _try in range(20):
                x0, y0 = float(rng.uniform(0, W - fw)), float(rng.uniform(0, H - fh))
                nb = [x0 / W, y0 / H, (x0 + fw) / W, (y0 + fh) / H]
                if all(nb[2] <= b[0] or nb[0] >= b[2] or nb[3] <= b[1] or nb[1] >= b[3] for b in boxes):
                    break
            else:
                continue
            small = crop.resize((max(int(fw), 2), max(int(fh), 2)), Image.BILINEAR)
            mask = Image.new("L", small.size, 0)
            edge = max(1, min(small.size) // 10)
            mask.paste(255, (edge, edge, small.size[0] - edge, small.size[1] - edge))
            mask = mask.filter(ImageFilter.GaussianBlur(edge / 2))
            scene.paste(small, (int(x0), int(y0)), mask)
            boxes.append(nb)
            rows.append([0, (nb[0] + nb[2]) / 2, (nb[1] + nb[3]) / 2, nb[2] - nb[0], nb[3] - nb[1]])
        name = f"synth_{k:04d}"
        scene.save(img_out / f"{name}.jpg", quality=90)
        _write_face_labels(rows, lab_out / f"{name}.txt")
        made += 1
    return made


def build_face_dataset(
    out: Path,
    data_root: Path = SHARED_DATA,
    n_expressions: int = 600,
    n_synthetic: int = 200,
    n_val_expressions: int = 150,
    seed: int = 0,
    holdout: str | None = None,
) -> Path:
    """Build a one-class ("face") YOLO dataset folder under ``out`` from ``../shared/data``, read in place.

    Train: every ``awake_sleep`` train image (scenes: webcam, car, phone; 725 images), a seeded
    random ``n_expressions`` of the ``expressions`` train images (crops and composites), and
    ``n_synthetic`` awake_sleep train scenes with small expression crops pasted in
    (:func:`_paste_faces`). Val (monitoring only; the awake_sleep *val* people stay unseen): the
    80 ``knockcat`` awake_sleep train frames (also in train) and ``n_val_expressions`` expressions val images.
    Images are symlinks (synthetic ones are written); labels are rewritten with class 0.
    ``holdout`` (a file-name prefix such as ``knockcat``): leave that awake_sleep train source (one
    person) out of train and synthetic scenes, and validate on it instead, so that a threshold can be
    tuned on a person the detector has not seen.

    Returns: path of ``out/data.yaml`` (``names: {0: face}``).
    Raises: FileNotFoundError when a source folder lacks ``data.yaml``.
    """
    import random

    out = Path(out).resolve()
    for name in ("awake_sleep", "expressions"):
        if not (data_root / name / "data.yaml").exists():
            raise FileNotFoundError(f"no dataset at {data_root / name} (expected data.yaml); is ../shared/data there?")
    if out.exists():
        shutil.rmtree(out)
    dirs = {s: (out / "images" / s, out / "labels" / s) for s in ("train", "val")}
    for a, b in dirs.values():
        a.mkdir(parents=True)
        b.mkdir(parents=True)
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    aw, ex = data_root / "awake_sleep", data_root / "expressions"
    aw_all = sorted(p.name for p in (aw / "images" / "train").iterdir())
    aw_train = [n for n in aw_all if not (holdout and n.startswith(holdout))]
    counts["awake_sleep_train"] = _link_split(aw, "train", aw_train, *dirs["train"], "as_")
    ex_train = sorted(p.name for p in (ex / "images" / "train").iterdir())
    counts["expressions_train"] = _link_split(ex, "train", sorted(rng.sample(ex_train, min(n_expressions, len(ex_train)))),
                                              *dirs["train"], "ex_")
    counts["synthetic_train"] = _paste_faces(aw, ex, n_synthetic, *dirs["train"], seed=seed, skip_prefix=holdout)
    knock = [n for n in aw_all if n.startswith(holdout or "knockcat")]
    counts[f"val_awake_sleep_train_{holdout or 'knockcat'}"] = _link_split(aw, "train", knock, *dirs["val"], "as_")
    ex_val = sorted(p.name for p in (ex / "images" / "val").iterdir())
    counts["val_expressions"] = _link_split(ex, "val", sorted(rng.sample(ex_val, min(n_val_expressions, len(ex_val)))),
                                            *dirs["val"], "ex_")
    data = {"path": str(out), "train": "images/train", "val": "images/val", "nc": 1, "names": dict(FACE_NAMES)}
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (out / "counts.json").write_text(json.dumps(counts, indent=2))
    return out / "data.yaml"


def train_face(
    out_dir: Path,
    init: Path | None = None,
    hours: float | None = 1.0,
    epochs: int = 30,
    imgsz: int = 256,
    batch: int = 16,
    seed: int = 0,
    device: str = "",
    workers: int = 0,
    n_expressions: int = 600,
    n_synthetic: int = 200,
    resume: bool = False,
    holdout: str | None = None,
) -> Path:
    """Train the one-class face detector (stage 1) and copy ``last.pt`` to ``out_dir/faceloop-face.pt``.

    Starts from ``init`` (default ``models/faceloop-base.pt``): ultralytics rebuilds
    ``yolov5nu`` with ``nc=1`` and transfers every tensor whose shape fits (backbone, neck and
    the box branch of the head; the class branch's last conv is new). Data: :func:`build_face_dataset`
    under ``out_dir/data``. AdamW (ultralytics' ``auto`` choice for short runs), 1 warm-up
    epoch, mosaic off for the last 3 epochs, ``amp=False``, RAM cache, ``time=hours`` when
    given (ultralytics fits the epochs and anneals the learning rate to the budget).
    ``last.pt`` is shipped, not ``best.pt``: the monitoring val split overlaps train.

    Args:
        out_dir: run folder (``data/``, ``run/`` with weights and curves, ``train_args.json``).
        resume: continue an interrupted run from ``out_dir/run/weights/last.pt`` (same data).
        holdout: leave one awake_sleep train source out (see :func:`build_face_dataset`).
    Returns: path of ``out_dir/faceloop-face.pt``.
    Raises: FileNotFoundError when the data or ``init`` weights are missing.
    """
    configure_ultralytics()
    from ultralytics import YOLO

    from backend.config import DEFAULT_MODEL_PATH

    out_dir = Path(out_dir).resolve()
    init = Path(init or DEFAULT_MODEL_PATH)
    t0 = time.time()
    if resume:
        last = out_dir / "run" / "weights" / "last.pt"
        if not last.exists():
            raise FileNotFoundError(f"nothing to resume: {last}")
        YOLO(str(last)).train(resume=True)
        args = json.loads((out_dir / "train_args.json").read_text())["train_args"] if (out_dir / "train_args.json").exists() else {}
    else:
        if not init.exists():
            raise FileNotFoundError(f"no initial weights at {init}")
        data = build_face_dataset(out_dir / "data", n_expressions=n_expressions, n_synthetic=n_synthetic, seed=seed,
                                  holdout=holdout)
        args = dict(
            data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, seed=seed, deterministic=True,
            workers=workers, device=device or None, project=str(out_dir), name="run", exist_ok=True,
            cache="ram", amp=False, plots=True, patience=0, verbose=True, single_cls=True,
            warmup_epochs=1, close_mosaic=3, scale=0.5,
        )
        if hours:
            args["time"] = hours
        record = {"model": "yolov5nu (nc=1) from init", "init": str(init), "init_sha256": file_sha256(init),
                  "data": json.loads((out_dir / "data" / "counts.json").read_text()),
                  "train_args": {k: v for k, v in args.items() if k != "project"}}
        (out_dir / "train_args.json").write_text(json.dumps(record, indent=2))
        YOLO(str(init), task="detect").train(**args)
    elapsed = time.time() - t0
    last = out_dir / "run" / "weights" / "last.pt"
    target = out_dir / "faceloop-face.pt"
    shutil.copyfile(last, target)
    set_face_names(target)
    import torch

    rec = json.loads((out_dir / "train_args.json").read_text()) if (out_dir / "train_args.json").exists() else {}
    rec.setdefault("segments_seconds", []).append(round(elapsed, 1))
    rec["seconds"] = round(sum(rec["segments_seconds"]), 1)
    rec.update({"hardware": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
    (out_dir / "train_args.json").write_text(json.dumps(rec, indent=2))
    return target


def set_face_names(weights: Path) -> None:
    """Name the one class of ``weights`` ``face`` in place.

    ultralytics' ``single_cls=True`` stores its class as ``{0: 'item'}`` whatever ``data.yaml``
    says (``ultralytics/engine/trainer.py``); the product maps classes by name, so the shipped
    detector must say ``face``. Also clears ``single_cls`` in the stored ``train_args``: ultralytics
    carries ``single_cls`` of a checkpoint into every later ``train()`` from it
    (``Model._reset_ckpt_args`` keeps imgsz, data, task, single_cls), which would fold a project's
    classes into one ``item`` class when the worker fine-tunes from these weights.
    """
    import torch

    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    for key in ("model", "ema"):
        if ckpt.get(key) is not None:
            ckpt[key].names = dict(FACE_NAMES)
    if isinstance(ckpt.get("train_args"), dict):
        ckpt["train_args"]["single_cls"] = False
    tmp = Path(weights).with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(weights)


def install_face(weights: Path, target: Path | None = None, **meta_extra) -> Path:
    """Copy trained face-detector weights to ``models/faceloop-face.pt`` with a ``.json`` sidecar.

    The sidecar gets ``names`` (``["face"]``), ``sha256`` of the weights, and ``meta_extra``
    (e.g. ``conf``, ``nms_iou``, ``imgsz``: the operating point chosen by
    ``benchmarks/detector_day0.py`` on awake_sleep train).
    Raises: ValueError when the weights do not have exactly one class named ``face``.
    """
    from backend.config import REPO_ROOT as root

    return _install(weights, Path(target or root / "models" / "faceloop-face.pt"), ["face"], **meta_extra)


def main(argv: list[str] | None = None) -> None:
    """``python -m ml_worker.base_model face OUT [--hours H] [--imgsz N] [--resume] [--install]``,
    or the older ``python -m ml_worker.base_model OUT [HOURS [IMGSZ]]`` (expression base model)."""
    import argparse
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "face":
        train_base(Path(argv[0]), hours=float(argv[1]) if len(argv) > 1 else None,
                   imgsz=int(argv[2]) if len(argv) > 2 else 320)
        return
    ap = argparse.ArgumentParser(prog="python -m ml_worker.base_model face", description=train_face.__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--init", type=Path, default=None)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-expressions", type=int, default=600)
    ap.add_argument("--n-synthetic", type=int, default=200)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--holdout", default=None, help="leave this awake_sleep train source (file-name prefix) out")
    ap.add_argument("--install", action="store_true", help="copy the result to models/faceloop-face.pt (+ .json)")
    a = ap.parse_args(argv[1:])
    w = train_face(a.out, init=a.init, hours=a.hours or None, epochs=a.epochs, imgsz=a.imgsz, batch=a.batch,
                   seed=a.seed, n_expressions=a.n_expressions, n_synthetic=a.n_synthetic, resume=a.resume, holdout=a.holdout)
    print(f"weights: {w}")
    if a.install:
        print(f"installed: {install_face(w)}")


if __name__ == "__main__":  # pragma: no cover - use `faceloop train-base` or the face subcommand
    main()
