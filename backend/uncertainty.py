"""Uncertainty measures (pure functions) and how box scores make an image's score.

Each measure maps class probabilities ``p`` of shape ``(n, K)`` (rows sum to 1) to scores of
shape ``(n,)`` in 0-1, higher = more uncertain (Settles, *Active Learning Literature Survey*,
2009, §3.1; *Active Learning*, 2012, eqs. 2.1-2.3):

- least-confidence ``(1 - max_k p_k) * K / (K - 1)`` (normalised to 0-1 like the other two, so
  a uniform distribution scores 1 whatever ``K``; Settles 2012, sec. 2.3)
- margin ``1 - (p_(1) - p_(2))`` (the two largest probabilities)
- entropy ``-sum_k p_k log p_k / log K`` (normalised by ``log K`` to 0-1)

YOLO's class scores are independent sigmoids, not a distribution: :func:`normalise` divides them
by their sum over the project's classes first. That division throws away how sure the detector is
that there is a face at all: a box scored ``(0.05, 0.04)`` and one scored ``(0.9, 0.72)`` both
normalise to about ``(0.55, 0.45)``. So a box's uncertainty joins the two (:func:`joint`):

    u_box = 1 - c * (1 - u_class)

with ``c`` the box confidence (its highest class sigmoid; ultralytics trains the class scores
against IoU-aware targets, so ``c`` also reflects localisation) and ``u_class`` one of the measures
above: the chance that the pre-annotation is wrong, if "the face is found" (``c``) and "its class
is right" (``1 - u_class``) are taken as independent. ``1 - u_box`` is the task score Label Studio
shows. ``benchmarks/uncertainty_auroc.py`` measures how well each measure ranks a model's errors
on the awake/sleep pool: the joint measures beat the class entropy alone at every round, where
that entropy ranked errors *backwards* early on (AUROC 0.34-0.36 after 20 labels: the new
awake/sleep head starts at about 50/50 for every face); figures in ``docs/active_learning.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-12
MEASURES = ("least_confidence", "margin", "entropy")
AGGREGATIONS = ("max", "mean", "sum")


def normalise(scores: np.ndarray) -> np.ndarray:
    """Sigmoid class scores ``(n, K)`` (0-1 each) -> probabilities whose rows sum to 1.

    A row of zeros becomes uniform.
    """
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None)
    s = np.atleast_2d(s)
    tot = s.sum(axis=1, keepdims=True)
    k = s.shape[1]
    return np.where(tot > EPS, s / np.maximum(tot, EPS), 1.0 / max(k, 1))


def least_confidence(p: np.ndarray) -> np.ndarray:
    """Normalised least confidence ``(1 - max p) * K / (K - 1)`` per row (``1 - max p`` with one
    class); ``p`` is ``(n, K)`` probabilities. Returns ``(n,)`` in 0-1, 1 for a uniform row.

    Without the ``K / (K - 1)`` factor least confidence tops out at ``1 - 1/K`` (0.5 with two
    classes), so it could never rank an ambiguous face above an image with no confident face
    (scored ``1 - conf``, up to 1) and its values would not compare with margin's and entropy's.
    """
    p = np.atleast_2d(p)
    k = p.shape[1]
    lc = 1.0 - p.max(axis=1)
    return np.clip(lc * k / (k - 1), 0.0, 1.0) if k > 1 else lc


def margin(p: np.ndarray) -> np.ndarray:
    """``1 - (p_(1) - p_(2))`` per row; with one class, ``1 - p_(1)``. Returns ``(n,)`` in 0-1."""
    p = np.atleast_2d(p)
    if p.shape[1] < 2:
        return 1.0 - p[:, 0]
    top2 = -np.sort(-p, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def entropy(p: np.ndarray) -> np.ndarray:
    """Entropy normalised by ``log K`` per row (0 with one class). Returns ``(n,)`` in 0-1."""
    p = np.atleast_2d(p)
    k = p.shape[1]
    if k < 2:
        return np.zeros(p.shape[0])
    h = -(p * np.log(np.clip(p, EPS, 1.0))).sum(axis=1)
    return np.clip(h / np.log(k), 0.0, 1.0)


MEASURE_FUNCS = {"least_confidence": least_confidence, "margin": margin, "entropy": entropy}


def joint(measure_values: np.ndarray, confs: np.ndarray) -> np.ndarray:
    """Box uncertainty from a class measure and the box confidence: ``1 - c * (1 - u)``.

    Args:
        measure_values: ``(n,)`` class uncertainty 0-1 (a :data:`MEASURES` function's output).
        confs: ``(n,)`` box confidences 0-1.
    Returns: ``(n,)`` in 0-1; at least ``1 - c`` (an unsure detection is uncertain whatever its
        class scores) and at least ``u`` (an unsure class is uncertain however sure the box).
    """
    u = np.clip(np.asarray(measure_values, dtype=np.float64), 0.0, 1.0)
    c = np.clip(np.asarray(confs, dtype=np.float64), 0.0, 1.0)
    return 1.0 - c * (1.0 - u)


def aggregate(values: np.ndarray, how: str = "max") -> float:
    """One image's uncertainty from its boxes' ``(n,)`` values: ``max``, ``mean`` or ``sum``
    (sum is capped at 1). Raises ValueError for another ``how`` or no values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no box values to aggregate")
    if how == "max":
        return float(v.max())
    if how == "mean":
        return float(v.mean())
    if how == "sum":
        return float(min(1.0, v.sum()))
    raise ValueError(f"unknown aggregation {how!r}; use one of {AGGREGATIONS}")


@dataclass
class ImageUncertainty:
    """All measures of one image (0-1, higher = more uncertain) plus how they were obtained.

    Attributes:
        least_confidence, margin, entropy: aggregated over the image's boxes.
        n_boxes: boxes at or above the threshold.
        basis: ``boxes`` (confident boxes), ``candidate`` (no confident face: best low-score
            candidate), ``none`` (no candidate at all: maximally uncertain), or ``unknown_classes``
            (the model knows none of the project's classes).
    """

    least_confidence: float
    margin: float
    entropy: float
    n_boxes: int
    basis: str

    def get(self, measure: str) -> float:
        """The value of ``measure`` (one of :data:`MEASURES`). Raises ValueError otherwise."""
        if measure not in MEASURES:
            raise ValueError(f"unknown uncertainty measure {measure!r}; use one of {MEASURES}")
        return float(getattr(self, measure))


def image_uncertainty(class_probs: np.ndarray, confs: np.ndarray, threshold: float,
                      how: str = "max", known_classes: bool = True) -> ImageUncertainty:
    """Uncertainty of one image from its candidate boxes.

    Args:
        class_probs: ``(n, K)`` normalised probabilities over the project's classes, one row per
            candidate box (all candidates, confident or not), sorted by ``confs`` descending.
        confs: ``(n,)`` box confidences 0-1.
        threshold: confidence at which a box is shown as a pre-annotation.
        how: aggregation over confident boxes (see :func:`aggregate`).
        known_classes: False when the model knows none of the project's classes.
    Returns: :class:`ImageUncertainty`: each measure is :func:`joint` per box (class measure
        and box confidence), aggregated over the confident boxes. An image with no confident
        face is *not* certain: its best candidate is scored the same way (so at least
        ``1 - conf``, above ``1 - threshold``); an image with no candidate at all scores 1.
    """
    confs = np.asarray(confs, dtype=np.float64)
    keep = confs >= threshold
    n = int(keep.sum())
    if not known_classes:
        return ImageUncertainty(1.0, 1.0, 1.0, n, "unknown_classes")
    if len(confs) == 0:
        return ImageUncertainty(1.0, 1.0, 1.0, 0, "none")
    p = np.atleast_2d(class_probs)
    if n:
        vals = {m: aggregate(joint(MEASURE_FUNCS[m](p[keep]), confs[keep]), how) for m in MEASURES}
        return ImageUncertainty(**vals, n_boxes=n, basis="boxes")
    best = int(np.argmax(confs))
    vals = {m: float(joint(MEASURE_FUNCS[m](p[best : best + 1]), confs[best : best + 1])[0]) for m in MEASURES}
    return ImageUncertainty(**vals, n_boxes=0, basis="candidate")
