"""Evaluate pre-annotations the way a person meets them: what they accept, fix, draw or delete.

Pure functions over boxes in pixels and class *names* (never class indices), so two models with
other class lists or another class order are compared on the same labels by name. Used by the
train station's promotion gate, ``faceloop evaluate`` and ``faceloop bench-accept``.

Per image, predictions are matched one-to-one to ground-truth faces, greedily by predicted score
(highest first) to the free ground-truth face of highest IoU, class-agnostic:

- IoU >= 0.5 and the right class: **accepted** as is;
- IoU >= 0.5, wrong class (or no class: an unlabelled face box): **class fixed**;
- 0.1 <= IoU < 0.5: **box fixed** (moved or resized; its class may need a fix too, counted in
  ``box_and_class_fixed``);
- a ground-truth face no prediction overlaps: **missed**, drawn by hand;
- a prediction matched to no face: a **false box**, deleted.

The acceptance rate is ``accepted / faces``; edits per image count every fix, drawing and deletion.
mAP50 is the COCO-style AP at IoU 0.5 (ultralytics' ``ap_per_class``, 101-point interpolation),
class-aware by name over the classes that occur in the ground truth; face mAP50 ignores classes.
For the class-aware AP curves every candidate box is one hypothesis per class, scored by that
class's score (``face confidence × P(class)`` for a two-stage model), as ultralytics' detection
validator counts them (``non_max_suppression(..., multi_label=True)`` in ``DetectionValidator``);
``mAP50_top1`` is the same AP with only each box's top class (one label per box, capped at the
class's recall among found faces).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: IoU at or above which a predicted box is the face as drawn (COCO's AP50 threshold).
MATCH_IOU = 0.5
#: IoU at or above which a predicted box is on the face but needs moving/resizing.
TOUCH_IOU = 0.1


@dataclass
class GTFace:
    """A labelled face: corners in pixels and its class name (None when the class is unknown)."""

    box: tuple[float, float, float, float]
    label: str | None


@dataclass
class PredFace:
    """A pre-annotation box: corners in pixels, class name (None = unlabelled face) and score 0-1."""

    box: tuple[float, float, float, float]
    label: str | None
    score: float


@dataclass
class AcceptanceCounts:
    """What a person does with one or many images' pre-annotations (see module docstring)."""

    images: int = 0
    faces: int = 0
    predicted: int = 0
    accepted: int = 0
    class_fixed: int = 0
    box_fixed: int = 0
    box_and_class_fixed: int = 0
    missed: int = 0
    false_boxes: int = 0
    found_iou30: int = 0

    def add(self, other: "AcceptanceCounts") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def acceptance_rate(self) -> float:
        """Accepted faces / ground-truth faces (0-1); 0 when there are no faces."""
        return self.accepted / self.faces if self.faces else 0.0

    @property
    def edits_per_image(self) -> float:
        """(class fixes + box fixes + faces drawn + false boxes deleted) / images."""
        edits = self.class_fixed + self.box_fixed + self.missed + self.false_boxes
        return edits / self.images if self.images else 0.0

    @property
    def class_accuracy(self) -> float:
        """Right class among faces found at IoU >= 0.5 (0-1)."""
        found = self.accepted + self.class_fixed
        return self.accepted / found if found else 0.0

    @property
    def boxes_per_face(self) -> float:
        return self.predicted / self.faces if self.faces else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(acceptance_rate=self.acceptance_rate, edits_per_image=self.edits_per_image,
                 class_accuracy=self.class_accuracy, boxes_per_face=self.boxes_per_face,
                 recall_iou30=self.found_iou30 / self.faces if self.faces else 0.0,
                 false_boxes_per_image=self.false_boxes / self.images if self.images else 0.0)
        return d


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` ``(n, 4)`` with every box in ``b`` ``(m, 4)``, corners ``x1 y1 x2 y2``
    in the same units; returns ``(n, m)`` in 0-1."""
    a = np.asarray(a, float).reshape(-1, 4)
    b = np.asarray(b, float).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.lower() == b.lower()


def acceptance(preds: list[PredFace], gts: list[GTFace]) -> AcceptanceCounts:
    """What a person does with one image's pre-annotations (see the module docstring)."""
    c = AcceptanceCounts(images=1, faces=len(gts), predicted=len(preds))
    order = sorted(range(len(preds)), key=lambda i: -preds[i].score)
    ious = iou_matrix([preds[i].box for i in order], [g.box for g in gts])
    free = set(range(len(gts)))
    if len(gts):
        c.found_iou30 = int((ious >= 0.3).any(axis=0).sum()) if len(preds) else 0
    for r, i in enumerate(order):
        if not free:
            c.false_boxes += 1
            continue
        cand = sorted(free, key=lambda j: -ious[r, j])
        j = cand[0]
        v = ious[r, j]
        if v >= MATCH_IOU:
            if _same(preds[i].label, gts[j].label):
                c.accepted += 1
            else:
                c.class_fixed += 1
        elif v >= TOUCH_IOU:
            c.box_fixed += 1
            if not _same(preds[i].label, gts[j].label):
                c.box_and_class_fixed += 1
        else:
            c.false_boxes += 1
            continue
        free.discard(j)
    c.missed = len(free)
    return c


def _tp_matrix(preds: list[PredFace], gts: list[GTFace], class_aware: bool, thresholds: np.ndarray) -> np.ndarray:
    """``(n_pred, n_thresholds)`` true positives: greedy by score, one GT per prediction."""
    tp = np.zeros((len(preds), len(thresholds)), bool)
    if not preds or not gts:
        return tp
    ious = iou_matrix([p.box for p in preds], [g.box for g in gts])
    if class_aware:
        same = np.array([[_same(p.label, g.label) for g in gts] for p in preds])
        ious = np.where(same, ious, 0.0)
    order = np.argsort([-p.score for p in preds], kind="stable")
    for k, t in enumerate(thresholds):
        used = np.zeros(len(gts), bool)
        for i in order:
            cand = np.where(~used & (ious[i] >= t))[0]
            if len(cand):
                j = cand[np.argmax(ious[i, cand])]
                used[j] = True
                tp[i, k] = True
    return tp


def map50(images: list[tuple[list[PredFace], list[GTFace]]], class_aware: bool = True) -> dict:
    """mAP at IoU 0.5 and 0.5:0.95 over ``(predictions, ground truth)`` per image.

    Class-aware by name over the classes present in the ground truth (a predicted class the ground
    truth lacks counts as a false positive of no class, so it lowers nothing but precision of none);
    ``class_aware=False`` treats every box as one class "face".
    Returns: ``{"mAP50", "mAP50-95", "per_class": {name: mAP50}}`` (0-1); 0.0 when there are no
    ground-truth boxes.
    """
    from ultralytics.utils.metrics import ap_per_class

    thresholds = np.linspace(0.5, 0.95, 10)
    tps, confs, pcls, tcls = [], [], [], []
    names: list[str] = []

    def cid(label: str | None) -> int:
        key = "face" if not class_aware else (label or "").lower()
        if key not in names:
            names.append(key)
        return names.index(key)

    for preds, gts in images:
        tps.append(_tp_matrix(preds, gts, class_aware, thresholds))
        confs.extend(p.score for p in preds)
        pcls.extend(cid(p.label) for p in preds)
        tcls.extend(cid(g.label) for g in gts)
    if not tcls:
        return {"mAP50": 0.0, "mAP50-95": 0.0, "per_class": {}}
    tp = np.concatenate(tps, 0) if tps else np.zeros((0, 10), bool)
    res = ap_per_class(tp, np.asarray(confs, float), np.asarray(pcls, int), np.asarray(tcls, int))
    ap, unique = res[5], res[6]
    per = {names[int(c)]: float(ap[k, 0]) for k, c in enumerate(unique)}
    return {"mAP50": float(ap[:, 0].mean()) if len(ap) else 0.0,
            "mAP50-95": float(ap.mean()) if len(ap) else 0.0, "per_class": per}


@dataclass
class Evaluation:
    """Everything :func:`evaluate_predictions` measured; see :meth:`as_dict` for the figures."""

    counts: AcceptanceCounts = field(default_factory=AcceptanceCounts)
    classes: dict = field(default_factory=dict)
    faces: dict = field(default_factory=dict)
    classes_top1: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"mAP50": self.classes.get("mAP50", 0.0), "mAP50-95": self.classes.get("mAP50-95", 0.0),
                "mAP50_top1": self.classes_top1.get("mAP50", self.classes.get("mAP50", 0.0)),
                "per_class_mAP50": self.classes.get("per_class", {}), "face_mAP50": self.faces.get("mAP50", 0.0),
                **self.counts.as_dict()}


def evaluate_predictions(images: list[tuple[list[PredFace], list[GTFace]]],
                         candidates: list[list[PredFace]] | None = None,
                         class_candidates: list[list[PredFace]] | None = None) -> Evaluation:
    """Acceptance counts, class-aware and face mAP50 over ``(predictions, ground truth)`` per image.

    Args:
        images: per image, the pre-annotations a person sees (above the score threshold) and the
            ground-truth faces.
        candidates: per image, every box down to a low score with its top class, for the face AP
            curve and ``mAP50_top1`` (default: the pre-annotations themselves, which caps recall at
            the threshold).
        class_candidates: per image, the class hypotheses of those boxes (a box once per class, see
            :func:`class_hypotheses`) for the class-aware AP curves (default: ``candidates``, one
            class per box).
    """
    ev = Evaluation()
    for preds, gts in images:
        ev.counts.add(acceptance(preds, gts))
    ap_images = images if candidates is None else [(c, g) for c, (_, g) in zip(candidates, images)]
    ev.faces = map50(ap_images, class_aware=False)
    ev.classes_top1 = map50(ap_images, class_aware=True)
    if class_candidates is None:
        ev.classes = ev.classes_top1
    else:
        ev.classes = map50([(c, g) for c, (_, g) in zip(class_candidates, images)], class_aware=True)
    return ev


def class_hypotheses(faces, labels: list[str], low: float) -> list[PredFace]:
    """Every class hypothesis of candidate faces, for the class-aware AP curves.

    A face at or above ``low`` (face confidence) gives its top class at its score, as a
    pre-annotation would, and each other label whose score reaches ``low``: the score of label
    ``j`` is ``face.score * probs[j] / max(probs)``, that is ``face confidence × P(j)`` for a
    two-stage detection and the model's own score of ``j`` for a single-stage one
    (:func:`backend.predict.faces_of`). This is how ultralytics' detection validator counts a box
    (``multi_label=True``): a face whose top class is wrong can still be found, lower in the
    ranking, under its right class.

    Args:
        faces: :class:`backend.predict.Face` objects (``box`` pixels, ``conf``, ``label``, ``score``
            0-1, ``probs`` over ``labels``).
        labels: the labels ``probs`` indexes (the project's labels the model knows, in label
            order: the order :func:`backend.predict.faces_of` uses).
        low: the candidate threshold (0-1).
    """
    out: list[PredFace] = []
    for f in faces:
        if f.conf < low:
            continue
        score = float(f.score or 0.0)
        out.append(PredFace(tuple(f.box), f.label, score))
        probs = np.asarray(f.probs, float)
        if f.label is None or len(probs) != len(labels) or len(labels) < 2 or probs.max() <= 0:
            continue
        top = int(probs.argmax())
        for j, lab in enumerate(labels):
            s_j = score * float(probs[j]) / float(probs[top])
            if j != top and s_j >= low:
                out.append(PredFace(tuple(f.box), lab, s_j))
    return out


def predict_faces(model, images: list[np.ndarray], schema, settings, batch: int = 16
                  ) -> tuple[list[list[PredFace]], list[list[PredFace]], list[list[PredFace]]]:
    """Pre-annotations of ``images`` through the product's prediction path
    (``model.detect`` + :func:`backend.predict.analyse`).

    Args:
        model: :class:`facemodels.detector.FaceModel` or :class:`facemodels.two_stage.TwoStageModel`.
        images: ``(H, W, 3)`` uint8 RGB arrays.
        schema: the project's :class:`backend.labels.ProjectSchema` (labels, threshold).
    Returns: ``(shown, candidates, class_candidates)`` per image: the boxes a person sees (at the
        project's score threshold), every candidate down to ``settings.candidate_threshold`` with
        its top class, and those candidates' class hypotheses (:func:`class_hypotheses`; for the
        class-aware AP curves).
    """
    from backend.predict import analyse, drop_uniform, faces_of, pre_annotation_threshold

    thr = pre_annotation_threshold(schema, settings, model)
    low = min(settings.candidate_threshold, thr)
    lmap = schema.label_map(list(model.names))
    labels = sorted(set(lmap.values()), key=schema.labels.index)  # faces_of's order of Face.probs
    shown, cands, hyps = [], [], []
    for start in range(0, len(images), batch):
        dets = model.detect(images[start : start + batch], conf=low, imgsz=settings.imgsz, batch=batch)
        for image, det in zip(images[start : start + batch], dets):
            det = drop_uniform(det, image)  # as predict_tasks does
            for out, t in ((shown, thr), (cands, low)):
                boxes, _ = analyse(det, schema, model.names, t, settings.aggregation)
                out.append([PredFace(b.xyxy, b.label, float(b.score or 0.0)) for b in boxes])
            hyps.append(class_hypotheses(faces_of(det, schema, model.names)[0], labels, low))
    return shown, cands, hyps


def evaluate_model(model, samples: list[tuple[np.ndarray, list[GTFace]]], schema, settings) -> dict:
    """Evaluate a model on labelled images through the product's prediction path.

    Args:
        samples: ``(image RGB uint8, ground-truth faces with class names)`` per image.
    Returns: :meth:`Evaluation.as_dict` plus ``"images"`` and ``"confusion"`` (:func:`confusion`).
    """
    shown, cands, hyps = predict_faces(model, [im for im, _ in samples], schema, settings)
    pairs = [(p, g) for p, (_, g) in zip(shown, samples)]
    ev = evaluate_predictions(pairs, candidates=cands, class_candidates=hyps)
    return {**ev.as_dict(), "images": len(samples), "confusion": confusion(pairs)}


def confusion(images: list[tuple[list[PredFace], list[GTFace]]]) -> dict:
    """Class confusion of pre-annotations against ground truth, over faces found at IoU >= 0.5.

    Matching is :func:`acceptance`'s (one-to-one, greedy by predicted score, class-agnostic).
    Returns: ``{"labels": [class names..., "(no class)"], "matrix": rows = true class, columns =
    predicted class (counts), "missed": {true class: faces with no box at IoU >= 0.5},
    "false_boxes": {predicted class: boxes on no face}}``; class names as written in the ground
    truth (case-insensitive match), a box without a class is ``"(no class)"``.
    """
    none = "(no class)"
    names: dict[str, str] = {}

    def key(label: str | None) -> str:
        if label is None:
            return none
        return names.setdefault(label.lower(), label)

    pairs, missed, false = [], {}, {}
    for preds, gts in images:
        for g in gts:
            key(g.label)
        order = sorted(range(len(preds)), key=lambda i: -preds[i].score)
        ious = iou_matrix([preds[i].box for i in order], [g.box for g in gts])
        free = set(range(len(gts)))
        for r, i in enumerate(order):
            j = max(free, key=lambda j: ious[r, j]) if free else None
            if j is None or ious[r, j] < MATCH_IOU:
                k = key(preds[i].label)
                false[k] = false.get(k, 0) + 1
                continue
            free.discard(j)
            pairs.append((key(gts[j].label), key(preds[i].label)))
        for j in free:
            k = key(gts[j].label)
            missed[k] = missed.get(k, 0) + 1
    labels = sorted(set(names.values())) + [none]
    idx = {n: k for k, n in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in pairs:
        matrix[idx[t]][idx[p]] += 1
    return {"labels": labels, "matrix": matrix, "missed": missed, "false_boxes": false}


def evaluate_choices(model, samples: list[tuple[np.ndarray, str]], schema, settings, batch: int = 16) -> dict:
    """Image-level accuracy of a Choices project's predictions, through the product's prediction
    path (``model.detect`` + :func:`backend.predict.analyse_choice`, the project's face threshold).

    Args:
        model: :class:`facemodels.two_stage.TwoStageModel` or :class:`facemodels.detector.FaceModel`.
        samples: ``(image RGB uint8 (H, W, 3), the person's choice)`` per labelled image.
        schema: the project's :class:`backend.labels.ProjectSchema` (``kind == "choices"``).
    Returns: ``{"accuracy": right choices / images, "class_accuracy": right choices / images that
        got a choice, "images", "correct", "no_choice": images that got no choice (no face at the
        threshold, or a model that knows none of the classes), "confusion"}`` (0-1 for the rates;
        ``confusion`` as :func:`confusion`: rows true class, columns the predicted class, an
        image without a choice under ``"(no class)"``; ``missed`` and ``false_boxes`` empty).
    """
    from backend.predict import analyse_choice, pre_annotation_threshold

    thr = pre_annotation_threshold(schema, settings, model)
    low = min(settings.candidate_threshold, thr)
    predicted: list[str | None] = []
    for start in range(0, len(samples), batch):
        dets = model.detect([im for im, _ in samples[start : start + batch]], conf=low, imgsz=settings.imgsz,
                            batch=batch)
        for det in dets:
            _, face, _ = analyse_choice(det, schema, model.names, thr)
            predicted.append(face.label if face is not None else None)
    none = "(no class)"
    truth = [lab for _, lab in samples]
    correct = sum(_same(p, t) for p, t in zip(predicted, truth))
    chosen = sum(p is not None for p in predicted)
    names: dict[str, str] = {}
    for lab in [*truth, *(p for p in predicted if p is not None)]:
        names.setdefault(lab.lower(), lab)
    labels = sorted(names.values(), key=str.lower) + [none]
    idx = {lab.lower(): k for k, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for p, t in zip(predicted, truth):
        matrix[idx[t.lower()]][idx[(p or none).lower()]] += 1
    n = len(samples)
    return {"accuracy": correct / n if n else 0.0, "class_accuracy": correct / chosen if chosen else 0.0,
            "images": n, "correct": correct, "no_choice": n - chosen,
            "confusion": {"labels": labels, "matrix": matrix, "missed": {}, "false_boxes": {}}}
