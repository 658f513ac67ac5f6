"""The face threshold a retrain stores: the labelled images' choice, shrunk toward the parent version's.

:func:`ml_worker.training.tune_face_threshold` picks, on the retrain's labelled images, the lowest
threshold within 0.02 F1 of the best. With few labelled faces that choice is noise: one face moves
F1 by about 1/n, and the labelled images show almost no background a false box could land on, so
the F1 curve is flat and the lowest threshold wins (0.05-0.15 after 20-40 labels, where the parent
had 0.5). On unseen images of those retrains the low thresholds cost 10-37 false boxes per 238
images for 0-3 more faces found (docs/training.md, "Face threshold on few labels").

Principle: the parent version's threshold is a prior worth :data:`PRIOR_FACES` labelled faces.
With ``n`` labelled faces the stored threshold is

    t = t_parent + (t_fit - t_parent) * n / (n + PRIOR_FACES)

(a precision-weighted mean, each side's weight its number of faces), rounded DOWN to the tuning
grid: between two grid points the lower one shows more boxes, and a missed face costs a person a
drawing, a false box one deletion. With 20 faces the choice moves halfway toward the parent's, with
80 faces a fifth of the way; a parent without a threshold (a legacy ``.pt``) leaves the fit as is.

**In a chain of retrains** the prior is the threshold of the version the chain started from (the
shipped default's 0.5, or any version not fitted on the project's labels), not the last retrain's:
each retrain fits on every labelled face so far, so the last retrain's threshold already holds
the earlier faces' pull, and shrinking toward it would count them twice. Measured in a new
user's trial (awake_sleep, fits 0.15 / 0.15 / 0.35 / 0.40 on 24 / 29 / 40 / 49 faces): toward the
last retrain the chain stored 0.30 / 0.20 / 0.30 / 0.35; toward the start it stores 0.30 / 0.25 /
0.40 / 0.40 (:func:`prior_threshold`; docs/training.md, "In a chain of retrains").
"""

from __future__ import annotations

import math

#: Labelled faces the parent version's threshold counts for (measured on awake_sleep,
#: docs/training.md: 10-60 all lowered false boxes; 20 is the smallest that kept most of the gain).
PRIOR_FACES = 20
#: Step of the tuning grid (``tune_face_threshold``'s default grid: 0.05 ... 0.5 by 0.05).
GRID_STEP = 0.05


def shrink_face_threshold(fit: float, parent: float | None, n_faces: int,
                          prior_faces: int = PRIOR_FACES, step: float = GRID_STEP) -> float:
    """The threshold to store: ``fit`` shrunk toward ``parent`` by the number of labelled faces.

    Args:
        fit: the threshold chosen on the labelled images (0-1 confidence).
        parent: the parent version's face threshold (0-1), or None when it has none.
        n_faces: labelled faces ``fit`` was chosen on (>= 0).
        prior_faces: faces the parent's threshold counts for (>= 0; 0 returns ``fit``).
        step: grid the result is rounded down to (> 0); never below ``step`` (the grid's lowest point).
    Returns: the threshold (0-1), on the grid ``step, 2*step, ...``.
    Raises: ValueError for a negative ``n_faces`` / ``prior_faces``, a non-positive ``step``, or a
        threshold outside 0-1.
    """
    if n_faces < 0 or prior_faces < 0:
        raise ValueError(f"n_faces ({n_faces}) and prior_faces ({prior_faces}) must be >= 0")
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    for name, v in (("fit", fit), ("parent", parent)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} threshold must be in 0-1, got {v}")
    if parent is None or n_faces + prior_faces == 0:
        return fit
    t = parent + (fit - parent) * n_faces / (n_faces + prior_faces)
    # round down to the grid (1e-9: 0.3 / 0.05 is 5.999... in floating point)
    return round(max(step, math.floor(t / step + 1e-9) * step), 4)


def prior_threshold(parent_bundle: dict) -> float | None:
    """The prior of the next retrain's threshold: the threshold of the version the chain started from.

    Args:
        parent_bundle: the bundle the retrain continues from (:func:`facemodels.two_stage.read_bundle`).
    Returns: the parent's recorded ``face_threshold_fit["prior_threshold"]`` when the parent is a
        retrain that recorded one; else the parent's ``face_threshold_fit["parent_threshold"]`` (a
        retrain stored before priors were recorded: its parent's threshold, exact for a first
        retrain); else the parent's own ``face_threshold`` (a version not fitted on labels, e.g. the
        shipped default); None when there is none (a legacy ``.pt``).
    """
    fit = parent_bundle.get("face_threshold_fit") or {}
    for key in ("prior_threshold", "parent_threshold"):
        if fit.get(key) is not None:
            return float(fit[key])
    t = parent_bundle.get("face_threshold")
    return None if t is None else float(t)
