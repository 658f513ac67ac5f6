"""Pre-annotations: tasks in, Label Studio predictions out (serve station, also used by scoring).

One box per face (class-agnostic NMS), labelled with a class of the project's config, in
percent coordinates, with a region score (box confidence 0-1) and a task score
``1 - uncertainty`` (see :mod:`backend.uncertainty`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from backend.config import Settings
from backend.images import ImageError, LoadedImage, load_image
from backend.labels import Box, ProjectSchema
from backend.uncertainty import ImageUncertainty, image_uncertainty, normalise

log = logging.getLogger(__name__)

#: Images fetched, decoded and detected together in :func:`predict_tasks`.
LOAD_CHUNK = 8


@dataclass
class TaskPrediction:
    """What faceloop predicts for one task.

    Attributes:
        task_id: Label Studio task id (None when the task had none).
        boxes: pre-annotation boxes in pixels (``label`` None = face of a not-yet-known class).
        width, height: image size in pixels.
        uncertainty: measures of the image (None on error).
        embedding: backbone embedding (for diversity), when asked for.
        error: why the task got no prediction (bad image, bad URL, ...), else None.
    """

    task_id: int | None
    boxes: list[Box] = field(default_factory=list)
    width: int = 0
    height: int = 0
    uncertainty: ImageUncertainty | None = None
    embedding: np.ndarray | None = None
    error: str | None = None


def analyse(det, schema: ProjectSchema, model_names: list[str], threshold: float, aggregation: str) -> tuple[list[Box], ImageUncertainty]:
    """Boxes and uncertainty of one image's detections (``facemodels.detector.ImageDetections``).

    Class scores are restricted to the model classes that map to the project's labels, so a
    class the config lacks is never predicted; when none map, faces are still returned as
    unlabelled boxes (``label`` None) scored by their face-ness, the noisy-OR
    ``1 - prod_k (1 - s_k)`` of the model's independent class scores ``s_k`` (0-1).
    """
    lmap = schema.label_map(model_names)
    idx = sorted(lmap)
    # several model classes may map to one label: their scores merge by max before normalising
    labels_order = sorted(set(lmap.values()), key=schema.labels.index)
    groups = [[i for i in idx if lmap[i] == lab] for lab in labels_order]
    boxes: list[Box] = []
    probs, confs = [], []
    for d in det.detections:
        if d.face_conf is not None:
            # two stages: the detector says whether it is a face, the classifier which class.
            # The threshold applies to the face confidence, so a face whose class is unsure is
            # still boxed; the region score is P(face) * P(class | face).
            if idx:
                merged = np.array([d.class_scores[g].sum() for g in groups])
                p_cls = merged / merged.sum() if merged.sum() > 0 else np.full(len(groups), 1 / len(groups))
                probs.append(p_cls)
                label = labels_order[int(p_cls.argmax())]
                score = d.face_conf * float(p_cls.max())
            else:
                label, score = None, d.face_conf
                probs.append(np.array([1.0]))
            confs.append(d.face_conf)
            if d.face_conf >= threshold:
                boxes.append(Box(*d.box, label=label, score=score))
            continue
        if idx:
            sub = d.class_scores[idx]
            conf = float(sub.max())
            label = lmap[idx[int(sub.argmax())]]
            merged = np.array([d.class_scores[g].max() for g in groups])
            probs.append(normalise(merged[None])[0])
        else:
            # face-ness when no class maps: noisy-OR of the independent class sigmoids,
            # P(some class) = 1 - prod_k (1 - s_k); the max alone understates a face whose
            # expression the model is unsure of (scores spread over several classes)
            conf = float(1.0 - np.prod(1.0 - np.clip(d.class_scores, 0.0, 1.0)))
            label = None
            probs.append(np.array([1.0]))
        confs.append(conf)
        if conf >= threshold:
            boxes.append(Box(*d.box, label=label, score=conf))
    order = np.argsort(-np.asarray(confs)) if confs else np.zeros(0, int)
    p = np.stack([probs[i] for i in order]) if confs else np.zeros((0, 1))
    unc = image_uncertainty(p, np.asarray(confs)[order] if confs else np.zeros(0), threshold, aggregation,
                            known_classes=bool(idx))
    boxes.sort(key=lambda b: -(b.score or 0))
    return boxes, unc


def pre_annotation_threshold(schema: ProjectSchema, settings: Settings, model=None) -> float:
    """The confidence (0-1) at which a face becomes a pre-annotation.

    A two-stage model version carries a face threshold tuned on the project's labelled images
    when it was trained (``face_threshold`` in its bundle; :func:`ml_worker.training.tune_face_threshold`):
    it wins, since it was measured on this project's faces. Otherwise the label config's
    ``model_score_threshold``, else ``SCORE_THRESHOLD``.
    """
    tuned = getattr(model, "face_threshold", None)
    if tuned is not None:
        return float(tuned)
    return schema.score_threshold if schema.score_threshold is not None else settings.score_threshold


def load_images(urls: list[str], settings: Settings, ls_url: str | None = None, workers: int = 4) -> list[LoadedImage | ImageError]:
    """Fetch and decode images concurrently; each entry is the image or an ImageError.

    A returned ImageError is a fresh one holding only its message (no traceback, no cause): a
    raised exception keeps the frames that held the fetched bytes alive (issue 9: 0.8 MB an error).
    """

    def one(u):
        try:
            return load_image(u, settings, ls_url)
        except ImageError as e:
            return ImageError(str(e)[:500])
        except Exception as e:  # never let one task fail the batch
            log.error("unexpected error loading an image: %s", e.__class__.__name__)
            return ImageError(f"could not load the image: {e.__class__.__name__}: {str(e)[:200]}")

    if len(urls) <= 1:
        return [one(u) for u in urls]
    with ThreadPoolExecutor(max_workers=min(workers, len(urls))) as ex:
        return list(ex.map(one, urls))


def predict_tasks(tasks: list[dict], schema: ProjectSchema, model, settings: Settings,
                  ls_url: str | None = None, embed: bool = False) -> list[TaskPrediction]:
    """Predict every task; a bad task gets ``error`` set and never fails the others.

    Args:
        tasks: Label Studio tasks (``{"id":…, "data":{schema.value_key: url}}``).
        schema: the project's parsed label config.
        model: a ``facemodels.detector.FaceModel``.
        ls_url: Label Studio base URL for relative image URLs.
        embed: also return image embeddings.
    Returns: one :class:`TaskPrediction` per task, in order.
    """
    threshold = pre_annotation_threshold(schema, settings, model)
    out: list[TaskPrediction] = []
    urls = []
    for t in tasks:
        tid = t.get("id") if isinstance(t, dict) else None
        valid_id = isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < 2**63
        out.append(TaskPrediction(task_id=tid if valid_id else None))
        data = t.get("data") if isinstance(t, dict) else None
        url = data.get(schema.value_key) if isinstance(data, dict) else None
        if not isinstance(data, dict) or schema.value_key not in data:
            out[-1].error = f"task has no data.{schema.value_key} (the label config's image field)"
            urls.append(None)
        elif not isinstance(url, str) or not url.strip():
            shown = "null" if url is None else type(url).__name__ if not isinstance(url, str) else "an empty string"
            out[-1].error = f"task data.{schema.value_key} is {shown}, not an image URL"
            urls.append(None)
        else:
            urls.append(url)
    todo = [i for i, u in enumerate(urls) if u is not None]
    # images are decoded and detected LOAD_CHUNK at a time: a request of many large images never
    # holds more than 2 * LOAD_CHUNK decoded arrays (issue 9: memory); the next chunk is fetched and
    # decoded in a background thread while the model runs on this one (issue 12: speed)
    chunks = [todo[c0 : c0 + LOAD_CHUNK] for c0 in range(0, len(todo), LOAD_CHUNK)]
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if len(chunks) > 1 else None
    pending = None
    for k, chunk in enumerate(chunks):
        loaded = pending.result() if pending is not None else load_images([urls[i] for i in chunk], settings, ls_url)
        if prefetch is not None:
            pending = prefetch.submit(load_images, [urls[i] for i in chunks[k + 1]], settings, ls_url) \
                if k + 1 < len(chunks) else None
        ok = []
        for i, img in zip(chunk, loaded):
            if isinstance(img, ImageError):
                out[i].error = str(img)
            else:
                out[i].width, out[i].height = img.width, img.height
                ok.append((i, img))
        del loaded
        if ok:
            # a two-stage model classifies only the faces the result uses (shown ones, the best candidate)
            more = {"classify_min_conf": threshold} if getattr(model, "classifies_faces", False) else {}
            dets = model.detect([img.array for _, img in ok], conf=min(settings.candidate_threshold, threshold),
                                imgsz=settings.imgsz, embed=embed, **more)
            for (i, _), det in zip(ok, dets):
                out[i].boxes, out[i].uncertainty = analyse(det, schema, model.names, threshold, settings.aggregation)
                out[i].embedding = det.embedding
        del ok
    if prefetch is not None:
        prefetch.shutdown(wait=False)
    return out


def to_ls_prediction(p: TaskPrediction, schema: ProjectSchema, model_version: str, measure: str) -> dict:
    """Label Studio prediction dict for a :class:`TaskPrediction`.

    ``score`` = 1 - uncertainty (configured measure), so Label Studio's ascending sort by
    prediction score serves the most uncertain task first. A failed task gets no ``result`` key
    (Label Studio skips such items and stores nothing) and an ``error`` message instead.
    """
    if p.error is not None:
        return {"model_version": model_version, "error": p.error}
    return {
        "model_version": model_version,
        "score": round(1.0 - p.uncertainty.get(measure), 6),
        "result": [schema.region(b, p.width, p.height) for b in p.boxes],
    }
