"""Pre-annotations: tasks in, Label Studio predictions out (serve station, also used by scoring).

One box per face (class-agnostic NMS), labelled with a class of the project's config, in
percent coordinates, with a region score (box confidence 0-1) and a task score
``1 - uncertainty`` (see :mod:`backend.uncertainty`).

For an image-level Choices config (``ProjectSchema.kind == "choices"``) the prediction is one
Choices result instead of boxes: the class of the image's largest face (:func:`main_face`), with
the region score ``P(face) * P(class | face)``; an image with no face at the threshold (or a model
that knows none of the project's classes) gets an empty result and task score 0 (most uncertain),
so that the person chooses it first.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from backend.config import Settings
from backend.images import ImageError, LoadedImage, drop_transparent, load_image
from backend.labels import Box, ProjectSchema
from backend.uncertainty import MEASURE_FUNCS, MEASURES, ImageUncertainty, image_uncertainty, joint, normalise

log = logging.getLogger(__name__)

#: Images fetched, decoded and detected together in :func:`predict_tasks`.
LOAD_CHUNK = 8

#: A detection is dropped when at least this share (0-1) of its box's pixels lie within
#: :data:`FLAT_LEVELS` grey levels of the box's median grey level. See :func:`drop_uniform`.
MAX_FLAT_SHARE = 0.9
#: Grey levels (0-255) either side of the box's median that count as flat (JPEG noise on a plain band).
FLAT_LEVELS = 4
#: Most sample points a side :func:`flat_share` reads in a box.
FLAT_GRID = 64


def flat_share(image: np.ndarray, box, levels: float = FLAT_LEVELS) -> float:
    """Share (0-1) of the pixels of ``box`` (``x1, y1, x2, y2`` pixels, clipped to the image; at
    least one pixel) whose grey level (mean of R, G, B) is within ``levels`` (0-255) of the box's
    median. The box is read on a grid of at most :data:`FLAT_GRID` points a side (every
    ``ceil(side / FLAT_GRID)``-th pixel): the share is a count, so a sample estimates it (within
    about 0.01 at 64 x 64 points), and a whole 400 px box cost 1.3 ms a detection, +15% of a
    single-task ``/predict``."""
    h, w = image.shape[:2]
    x1, y1 = min(w - 1, max(0, int(box[0]))), min(h - 1, max(0, int(box[1])))
    x2, y2 = min(w, max(x1 + 1, int(np.ceil(box[2])))), min(h, max(y1 + 1, int(np.ceil(box[3]))))
    step = max(1, -(-max(y2 - y1, x2 - x1) // FLAT_GRID))
    patch = image[y1:y2:step, x1:x2:step]
    grey = patch.mean(axis=2, dtype=np.float32) if patch.ndim == 3 else patch.astype(np.float32)
    return float((np.abs(grey - np.median(grey)) <= levels).mean())


def drop_uniform(det, image: np.ndarray, max_flat: float = MAX_FLAT_SHARE):
    """``det`` (``facemodels.detector.ImageDetections``, boxes in pixels of ``image``) without the
    detections whose box is almost all one flat grey level: an opaque plain band, no face.

    The shipped detector boxes a plain band beside a face (letterbox bars, a flat wall): 60
    awake_sleep val faces, each beside a band of its size (3 sides x white, grey 114, black; JPEG),
    got 328 band boxes at the project threshold in 540 images, 1 with this filter, and the same 469
    faces found (docs/detector.md, "Plain bands"). Such a box is flat
    (:func:`flat_share` about 1; a box over the band and a sliver of the face too, which a standard
    deviation threshold would keep). The 8,059 labelled faces of ../shared/data (awake_sleep,
    expressions, faces_cropped_muxspace, train + val) have a flat share of at most 0.40 as
    :func:`flat_share` reads them (99th percentiles 0.22-0.25; 0.51 read whole), and a box matching
    a face at IoU >= 0.5 is at most twice its area, so at most about 0.7 flat. A detection is kept when its flat share is below ``max_flat`` (0-1).
    Transparent areas are dropped before this by :func:`backend.images.drop_transparent`.

    Args:
        image: ``(H, W, 3)`` uint8 RGB (or ``(H, W)`` grey), the array the detector saw.
    Returns: a new ``ImageDetections`` (``det`` itself when nothing is dropped).
    """
    if not det.detections:
        return det
    kept = [d for d in det.detections if flat_share(image, d.box) < max_flat]
    return det if len(kept) == len(det.detections) else replace(det, detections=kept)


@dataclass
class TaskPrediction:
    """What faceloop predicts for one task.

    Attributes:
        task_id: Label Studio task id (None when the task had none).
        boxes: pre-annotation boxes in pixels of the true image size (``label`` None = face of a
            not-yet-known class); an image decoded smaller (``MAX_IMAGE_SIDE``) has its boxes scaled back.
        width, height: true image size in pixels as displayed (Label Studio's ``original_width/height``).
        uncertainty: measures of the image (None on error).
        embedding: backbone embedding (for diversity), when asked for.
        error: why the task got no prediction (bad image, bad URL, ...), else None.
        choice: image-level class (Choices configs only; None: no choice), from the face ``choice_face``.
        choice_score: its score 0-1 (``P(face) * P(class | face)``).
    """

    task_id: int | None
    boxes: list[Box] = field(default_factory=list)
    width: int = 0
    height: int = 0
    uncertainty: ImageUncertainty | None = None
    embedding: np.ndarray | None = None
    error: str | None = None
    choice: str | None = None
    choice_score: float | None = None
    choice_face: Box | None = None


@dataclass
class Face:
    """One candidate face of an image, as the serve station sees it.

    Attributes:
        box: corners ``(x1, y1, x2, y2)`` in pixels.
        conf: face confidence 0-1 (two stages: the detector's; one stage: the top mapped class
            score, or the noisy-OR face-ness when no class maps).
        label: the project label of the most probable class, or None (no model class maps).
        score: the region score 0-1 (two stages: ``P(face) * P(class | face)``; one stage: ``conf``).
        probs: ``(K,)`` probabilities over the project labels the model knows (``[1.0]`` when none).
    """

    box: tuple[float, float, float, float]
    conf: float
    label: str | None
    score: float
    probs: np.ndarray


def faces_of(det, schema: ProjectSchema, model_names: list[str]) -> tuple[list[Face], bool]:
    """Every candidate face of one image's detections (``facemodels.detector.ImageDetections``).

    Class scores are restricted to the model classes that map to the project's labels, so a
    class the config lacks is never predicted; when none map, faces are still returned as
    unlabelled (``label`` None) scored by their face-ness, the noisy-OR ``1 - prod_k (1 - s_k)``
    of the model's independent class scores ``s_k`` (0-1).

    Returns: ``(faces, known_classes)`` in detection order; ``known_classes`` False when no model
        class maps to a project label.
    """
    lmap = schema.label_map(model_names)
    idx = sorted(lmap)
    # several model classes may map to one label: their scores merge by max before normalising
    labels_order = sorted(set(lmap.values()), key=schema.labels.index)
    groups = [[i for i in idx if lmap[i] == lab] for lab in labels_order]
    faces: list[Face] = []
    for d in det.detections:
        if d.face_conf is not None:
            # two stages: the detector says whether it is a face, the classifier which class.
            # The threshold applies to the face confidence, so a face whose class is unsure is
            # still boxed; the region score is P(face) * P(class | face).
            if idx:
                merged = np.array([d.class_scores[g].sum() for g in groups])
                p_cls = merged / merged.sum() if merged.sum() > 0 else np.full(len(groups), 1 / len(groups))
                faces.append(Face(tuple(d.box), float(d.face_conf), labels_order[int(p_cls.argmax())],
                                  float(d.face_conf) * float(p_cls.max()), p_cls))
            else:
                faces.append(Face(tuple(d.box), float(d.face_conf), None, float(d.face_conf), np.array([1.0])))
            continue
        if idx:
            sub = d.class_scores[idx]
            conf = float(sub.max())
            merged = np.array([d.class_scores[g].max() for g in groups])
            faces.append(Face(tuple(d.box), conf, lmap[idx[int(sub.argmax())]], conf, normalise(merged[None])[0]))
        else:
            # face-ness when no class maps: noisy-OR of the independent class sigmoids,
            # P(some class) = 1 - prod_k (1 - s_k); the max alone understates a face whose
            # expression the model is unsure of (scores spread over several classes)
            conf = float(1.0 - np.prod(1.0 - np.clip(d.class_scores, 0.0, 1.0)))
            faces.append(Face(tuple(d.box), conf, None, conf, np.array([1.0])))
    return faces, bool(idx)


def analyse(det, schema: ProjectSchema, model_names: list[str], threshold: float, aggregation: str) -> tuple[list[Box], ImageUncertainty]:
    """Boxes and uncertainty of one image's detections (``facemodels.detector.ImageDetections``).

    Boxes are the faces of :func:`faces_of` at or above ``threshold`` (face confidence), highest
    score first; the uncertainty joins every candidate's class probabilities and confidence
    (:func:`backend.uncertainty.image_uncertainty`).
    """
    faces, known = faces_of(det, schema, model_names)
    boxes = [Box(*f.box, label=f.label, score=f.score) for f in faces if f.conf >= threshold]
    confs = [f.conf for f in faces]
    order = np.argsort(-np.asarray(confs)) if confs else np.zeros(0, int)
    p = np.stack([faces[i].probs for i in order]) if confs else np.zeros((0, 1))
    unc = image_uncertainty(p, np.asarray(confs)[order] if confs else np.zeros(0), threshold, aggregation,
                            known_classes=known)
    boxes.sort(key=lambda b: -(b.score or 0))
    return boxes, unc


def main_face(faces: list, threshold: float):
    """The face an image-level class comes from: the **largest** face at or above ``threshold``
    (box area in pixels; ties: the higher confidence), or None when no face reaches it.

    The largest face is the image's subject in a photo of a person (a passer-by or a poster in
    the background is smaller); it does not depend on the classifier, so the same face is used
    when serving and when learning from a person's choice (:mod:`ml_worker.dataset`).

    Args:
        faces: objects with ``box`` ``(x1, y1, x2, y2)`` pixels and a face confidence 0-1:
            :class:`Face` (``conf``) or ``facemodels.detector.Detection`` (``face_conf`` when it has
            one, else ``conf``).
    """
    def face_conf(f) -> float:
        fc = getattr(f, "face_conf", None)
        return float(f.conf if fc is None else fc)

    shown = [f for f in faces if face_conf(f) >= threshold]
    if not shown:
        return None
    return max(shown, key=lambda f: ((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), face_conf(f)))


def analyse_choice(det, schema: ProjectSchema, model_names: list[str], threshold: float
                   ) -> tuple[list[Box], Face | None, ImageUncertainty]:
    """The image-level class of one image's detections (``schema.kind == "choices"``).

    The class is the one of :func:`main_face`; its uncertainty is that face's, the class measure
    of its probabilities joined with its face confidence (:func:`backend.uncertainty.joint`), so
    the task score ``1 - uncertainty`` ranks images by how sure the choice is.

    Returns: ``(boxes, face, uncertainty)``: the faces at or above ``threshold`` as boxes, the
        chosen face (None: no face reaches the threshold, or the model knows none of the
        project's classes: no choice is sent) and the image's uncertainty (1 for every measure
        without a choice; basis ``none`` or ``unknown_classes``).
    """
    faces, known = faces_of(det, schema, model_names)
    boxes = sorted((Box(*f.box, label=f.label, score=f.score) for f in faces if f.conf >= threshold),
                   key=lambda b: -(b.score or 0))
    face = main_face(faces, threshold)
    if not known:
        return boxes, None, ImageUncertainty(1.0, 1.0, 1.0, len(boxes), "unknown_classes")
    if face is None:
        return boxes, None, ImageUncertainty(1.0, 1.0, 1.0, 0, "none")
    vals = {m: float(joint(MEASURE_FUNCS[m](face.probs[None]), np.array([face.conf]))[0]) for m in MEASURES}
    return boxes, face, ImageUncertainty(**vals, n_boxes=len(boxes), basis="boxes")


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
                # the true size: Label Studio's original_width/height (the array may be reduced)
                out[i].width, out[i].height = img.original_width, img.original_height
                ok.append((i, img))
        del loaded
        if ok:
            # a two-stage model classifies only the faces the result uses (shown ones, the best candidate)
            more = {"classify_min_conf": threshold} if getattr(model, "classifies_faces", False) else {}
            dets = model.detect([img.array for _, img in ok], conf=min(settings.candidate_threshold, threshold),
                                imgsz=settings.imgsz, embed=embed, **more)
            for (i, img), det in zip(ok, dets):
                det = drop_transparent(det, img.alpha)  # no face on transparent pixels (None: no work)
                det = drop_uniform(det, img.array)  # nor on an opaque plain band
                if schema.is_choices:
                    out[i].boxes, face, out[i].uncertainty = analyse_choice(det, schema, model.names, threshold)
                    if face is not None:
                        out[i].choice, out[i].choice_score = face.label, face.score
                        out[i].choice_face = Box(*face.box, label=face.label, score=face.score)
                else:
                    out[i].boxes, out[i].uncertainty = analyse(det, schema, model.names, threshold,
                                                               settings.aggregation)
                sx, sy = img.original_width / img.width, img.original_height / img.height
                if (sx, sy) != (1.0, 1.0):  # array pixels -> pixels of the true size
                    out[i].boxes = [replace(b, x1=b.x1 * sx, y1=b.y1 * sy, x2=b.x2 * sx, y2=b.y2 * sy)
                                    for b in out[i].boxes]
                    if out[i].choice_face is not None:
                        b = out[i].choice_face
                        out[i].choice_face = replace(b, x1=b.x1 * sx, y1=b.y1 * sy, x2=b.x2 * sx, y2=b.y2 * sy)
                out[i].embedding = det.embedding
        del ok
    if prefetch is not None:
        prefetch.shutdown(wait=False)
    return out


def to_ls_prediction(p: TaskPrediction, schema: ProjectSchema, model_version: str, measure: str) -> dict:
    """Label Studio prediction dict for a :class:`TaskPrediction`.

    ``score`` = 1 - uncertainty (configured measure), so Label Studio's ascending sort by
    prediction score serves the most uncertain task first. A Choices config gets one ``choices``
    result item (or none, see the module docstring). A failed task gets no ``result`` key
    (Label Studio skips such items and stores nothing) and an ``error`` message instead.
    """
    if p.error is not None:
        return {"model_version": model_version, "error": p.error}
    if schema.is_choices:
        result = [schema.choice_region(p.choice, p.choice_score)] if p.choice is not None else []
    else:
        result = [schema.region(b, p.width, p.height) for b in p.boxes]
    return {"model_version": model_version, "score": round(1.0 - p.uncertainty.get(measure), 6), "result": result}
