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


if __name__ == "__main__":  # pragma: no cover - use `faceloop train-base`
    import sys

    train_base(Path(sys.argv[1]), hours=float(sys.argv[2]) if len(sys.argv) > 2 else None, imgsz=int(sys.argv[3]) if len(sys.argv) > 3 else 320)


def install_base(weights: Path, target: Path | None = None) -> Path:
    """Copy trained weights to ``models/faceloop-base.pt`` with a ``.json`` sidecar of class names."""
    from backend.config import DEFAULT_MODEL_PATH
    from backend.yolo_meta import read_class_names

    target = Path(target or DEFAULT_MODEL_PATH)
    names = read_class_names(Path(weights))
    tmp = target.with_suffix(".pt.tmp")
    shutil.copyfile(weights, tmp)
    tmp.replace(target)
    side = target.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.exists() else {}
    meta["names"] = names
    side.write_text(json.dumps(meta, indent=2))
    return target
