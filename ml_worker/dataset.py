"""Build a YOLO dataset from Label Studio annotations, with a deterministic validation split.

Layout written (ultralytics detection format): ``images/{train,val}/<task>.jpg``,
``labels/{train,val}/<task>.txt`` with lines ``class cx cy w h`` normalised 0-1, and
``data.yaml`` naming the project's labels in config order.

An image-level Choices project (``ProjectSchema.kind == "choices"``) has no boxes: each labelled
image's class is the person's choice, and the face it belongs to is the one the current model
version's detector finds and serving would use (:func:`backend.predict.main_face`: the largest
face at the face threshold). That face, with the chosen class, is the image's one box; the
face-crop classifier learns from these crops, the detector is not retrained from choices
(:func:`build_choice_dataset`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from backend.config import Settings
from backend.images import ImageError
from backend.labels import ProjectSchema
from backend.predict import load_images


def is_val(task_id: int, val_fraction: float) -> bool:
    """Deterministic split by task id: ``sha1(str(id)) mod 1000 < val_fraction * 1000``.

    The same task stays in the same split across retrains, so versions are compared on the
    same validation images.
    """
    h = int(hashlib.sha1(str(task_id).encode()).hexdigest(), 16) % 1000
    return h < val_fraction * 1000


def split_ids(task_ids: list[int], val_fraction: float) -> tuple[list[int], list[int]]:
    """Split task ids into ``(train, val)`` by :func:`is_val`, keeping both non-empty when there
    are at least 2 tasks (the task with the smallest hash moves to val, or the largest to train)."""
    ids = sorted(set(task_ids))
    val = [i for i in ids if is_val(i, val_fraction)]
    train = [i for i in ids if i not in set(val)]
    key = lambda i: int(hashlib.sha1(str(i).encode()).hexdigest(), 16) % 1000  # noqa: E731
    if len(ids) >= 2 and not val:
        m = min(train, key=key)
        train.remove(m)
        val.append(m)
    if len(ids) >= 2 and not train:
        m = max(val, key=key)
        val.remove(m)
        train.append(m)
    return train, val


@dataclass
class Sample:
    """One annotated image of a dataset, decoded.

    Attributes:
        task_id: Label Studio task id.
        split: ``"train"`` or ``"val"``.
        image: ``(H, W, 3)`` uint8 RGB (EXIF orientation applied).
        boxes: ``(x1, y1, x2, y2, class_index)`` in pixels; class index into the schema's labels.
            Choices projects: the face the image's class belongs to, or none when no face was found.
        path: the image file written into the dataset folder.
        label: Choices projects: the image's class index (the person's choice); else None.
    """

    task_id: int
    split: str
    image: np.ndarray
    boxes: list[tuple[float, float, float, float, int]]
    path: Path | None = None
    label: int | None = None


@dataclass
class DatasetInfo:
    """What :func:`build_dataset` wrote.

    Attributes:
        yaml_path: the ``data.yaml`` to train on.
        train_ids, val_ids: task ids per split.
        boxes: number of boxes written.
        problems: ``(task_id, message)`` for tasks left out (bad image, unlabelled region, ...).
        samples: the decoded images and their boxes (for the face-crop classifier and evaluation).
        moved_to_val: task ids moved from train to val so that val holds every class it can.
        kind: the schema's kind (``"boxes"`` or ``"choices"``).
        no_face: Choices projects: labelled tasks where the detector found no face (they count in
            validation accuracy, as a missing choice, but give the classifier no crop).
    """

    yaml_path: Path
    train_ids: list[int]
    val_ids: list[int]
    boxes: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    moved_to_val: list[int] = field(default_factory=list)
    kind: str = "boxes"
    no_face: list[int] = field(default_factory=list)

    def val_boxes(self) -> int:
        """Labelled faces in the validation split."""
        return sum(len(s.boxes) for s in self.samples if s.split == "val")

    def val_labels(self) -> int:
        """Choices projects: labelled images in the validation split."""
        return sum(1 for s in self.samples if s.split == "val" and s.label is not None)


def _hash(task_id: int) -> int:
    return int(hashlib.sha1(str(task_id).encode()).hexdigest(), 16) % 1000


def cover_classes(train: list[int], val: list[int], classes_of: dict[int, set[int]]) -> tuple[list[int], list[int], list[int]]:
    """Move train tasks into val until val holds a box of every class that at least two tasks have.

    Deterministic: for each missing class (in index order) the train task with that class and the
    smallest id hash moves, and only while train keeps at least one task with the class.
    Returns: ``(train, val, moved)``.
    """
    train, val, moved = list(train), list(val), []
    all_classes = sorted(set().union(*classes_of.values())) if classes_of else []
    for c in all_classes:
        if any(c in classes_of.get(t, ()) for t in val):
            continue
        having = sorted((t for t in train if c in classes_of.get(t, ())), key=_hash)
        if len(having) >= 2:
            t = having[0]
            train.remove(t)
            val.append(t)
            moved.append(t)
    return train, val, moved


def write_yolo_dataset(out_dir: Path, names: list[str], items: list[tuple[str, str, Image.Image | Path, list]]) -> Path:
    """Write images and labels in YOLO layout and return ``data.yaml``.

    Args:
        out_dir: dataset folder (created).
        names: class names in index order.
        items: ``(split, stem, image, boxes)``; ``image`` a PIL image (saved as JPEG) or a path
            (symlinked); ``boxes`` ``(cx, cy, w, h, cls)`` normalised 0-1.
    """
    out_dir = Path(out_dir)
    for split in ("train", "val"):
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        (out_dir / "labels" / split).mkdir(parents=True, exist_ok=True)
    for split, stem, image, boxes in items:
        img_path = out_dir / "images" / split / f"{stem}.jpg"
        if isinstance(image, Image.Image):
            image.save(img_path, quality=95)
        else:
            if img_path.exists() or img_path.is_symlink():
                img_path.unlink()
            img_path.symlink_to(Path(image).resolve())
        lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for cx, cy, w, h, c in boxes]
        (out_dir / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    data = {"path": str(out_dir.resolve()), "train": "images/train", "val": "images/val",
            "names": {i: n for i, n in enumerate(names)}}
    y = out_dir / "data.yaml"
    y.write_text(yaml.safe_dump(data, sort_keys=False))
    return y


def build_dataset(tasks: list, schema: ProjectSchema, out_dir: Path, settings: Settings,
                  ls_url: str | None = None, model=None) -> DatasetInfo:
    """Fetch the annotated tasks' images and write a YOLO dataset of the project's classes.

    Args:
        tasks: :class:`backend.lsapi.SnapshotTask` with ``result`` not None (an empty result is
            a background image: no face).
        schema: the project's label config.
        out_dir: dataset folder.
        model: Choices projects only (required there): the current model version
            (``facemodels.two_stage.TwoStageModel`` or ``FaceModel``) whose detector finds the
            face of each labelled image (:func:`build_choice_dataset`).
    Returns: :class:`DatasetInfo`. Tasks with an unreadable image or a region without a known
        label are left out and listed in ``problems``.
    Raises: ValueError for a Choices schema without ``model``.
    """
    if schema.is_choices:
        if model is None:
            raise ValueError("a Choices project's dataset needs the current model version to find the faces")
        return build_choice_dataset(tasks, schema, out_dir, settings, model, ls_url)
    problems: list[tuple[int, str]] = []
    usable = []
    for t in tasks:
        boxes, probs = schema.boxes_from_result(t.result or [])
        if probs:
            problems.append((t.id, "; ".join(probs)))
            continue
        url = t.data.get(schema.value_key)
        usable.append((t, boxes, url))
    images = load_images([u for _, _, u in usable], settings, ls_url)
    ok = []
    for (t, boxes, _), img in zip(usable, images):
        if isinstance(img, ImageError):
            problems.append((t.id, str(img)))
        else:
            ok.append((t, boxes, img))
    train_ids, val_ids = split_ids([t.id for t, _, _ in ok], settings.val_fraction)
    train_ids, val_ids, moved = cover_classes(train_ids, val_ids, {t.id: {b[4] for b in boxes} for t, boxes, _ in ok})
    val_set = set(val_ids)
    items = [("val" if t.id in val_set else "train", f"task_{t.id}", Image.fromarray(img.array), boxes)
             for t, boxes, img in ok]
    y = write_yolo_dataset(out_dir, schema.labels, items)
    samples = []
    for (t, boxes, img), (split, stem, _, _) in zip(ok, items):
        w, h = img.width, img.height
        px = [((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h, c) for cx, cy, bw, bh, c in boxes]
        samples.append(Sample(t.id, split, img.array, px, Path(out_dir) / "images" / split / f"{stem}.jpg"))
    return DatasetInfo(y, sorted(train_ids), sorted(val_ids), sum(len(b) for _, b, _ in ok), problems, samples,
                       moved)


def write_face_dataset(ds: DatasetInfo, out_dir: Path) -> Path:
    """The same images as ``ds`` (symlinked) with every box of class 0 ``face``: the detector's
    dataset. Returns its ``data.yaml``."""
    items = []
    for s in ds.samples:
        h, w = s.image.shape[:2]
        boxes = [((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h, 0) for x1, y1, x2, y2, _ in s.boxes]
        items.append((s.split, f"task_{s.task_id}", s.path, boxes))
    return write_yolo_dataset(out_dir, ["face"], items)


#: Images detected together while building a Choices dataset.
DETECT_CHUNK = 16


def build_choice_dataset(tasks: list, schema: ProjectSchema, out_dir: Path, settings: Settings, model,
                         ls_url: str | None = None) -> DatasetInfo:
    """A Choices project's dataset: each labelled image's class, on the face serving would use.

    Per task: the class is the annotation's choice (:meth:`backend.labels.ProjectSchema.choice_from_result`);
    ``model`` detects the faces exactly as ``/predict`` does (same face threshold:
    :func:`backend.predict.pre_annotation_threshold`) and :func:`backend.predict.main_face`
    picks the largest. That face gets the class as its one box (the classifier's crop). The
    split is :func:`split_ids` + :func:`cover_classes` over the image classes, so validation holds
    every class that two images have. The YOLO folder written holds those boxes (for inspection;
    the detector is not trained from choices).

    Returns: :class:`DatasetInfo` with ``kind="choices"``; every sample has ``label``; tasks whose
        image has no face at the threshold are kept (for validation accuracy) and listed in
        ``no_face``; tasks without a usable choice or with an unreadable image are left out and
        listed in ``problems``.
    """
    from backend.predict import faces_of, main_face, pre_annotation_threshold

    problems: list[tuple[int, str]] = []
    usable = []
    for t in tasks:
        cls, probs = schema.choice_from_result(t.result or [])
        if cls is None:
            problems.append((t.id, "; ".join(probs)))
            continue
        usable.append((t, cls, t.data.get(schema.value_key)))
    images = load_images([u for _, _, u in usable], settings, ls_url)
    ok = []
    for (t, cls, _), img in zip(usable, images):
        if isinstance(img, ImageError):
            problems.append((t.id, str(img)))
        else:
            ok.append((t, cls, img))
    thr = pre_annotation_threshold(schema, settings, model)
    faces = []
    for c0 in range(0, len(ok), DETECT_CHUNK):
        chunk = ok[c0 : c0 + DETECT_CHUNK]
        dets = model.detect([img.array for _, _, img in chunk], conf=min(settings.candidate_threshold, thr),
                            imgsz=settings.imgsz)
        faces.extend(main_face(faces_of(d, schema, model.names)[0], thr) for d in dets)
    train_ids, val_ids = split_ids([t.id for t, _, _ in ok], settings.val_fraction)
    train_ids, val_ids, moved = cover_classes(train_ids, val_ids, {t.id: {cls} for t, cls, _ in ok})
    val_set = set(val_ids)
    items, samples, no_face = [], [], []
    for (t, cls, img), face in zip(ok, faces):
        split = "val" if t.id in val_set else "train"
        px = [(*face.box, cls)] if face is not None else []
        if face is None:
            no_face.append(t.id)
        w, h = img.width, img.height
        yolo = [((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h, c) for x1, y1, x2, y2, c in px]
        items.append((split, f"task_{t.id}", Image.fromarray(img.array), yolo))
        samples.append(Sample(t.id, split, img.array, px, Path(out_dir) / "images" / split / f"task_{t.id}.jpg",
                              label=cls))
    y = write_yolo_dataset(out_dir, schema.labels, items)
    return DatasetInfo(y, sorted(train_ids), sorted(val_ids), sum(len(s.boxes) for s in samples), problems, samples,
                       moved, kind="choices", no_face=no_face)
