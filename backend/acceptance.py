"""Pre-label acceptance per model version, from the annotations people actually saved.

Label Studio records, on each annotation a person started from a prediction, the id of that
prediction (``Annotation.parent_prediction``, LS 1.23 ``tasks/models.py``; the editor sets it
when it copies a prediction into a new annotation, ``web/dist/apps/labelstudio/358.js``
``addAnnotationFromPrediction``/``createAnnotation``). The editor keeps each copied region's id,
only rewriting a ``#<annotation>`` suffix (``"abc#12"`` -> ``"abc#34"``; ids without ``#`` stay as
they are), so a predicted box is found in the saved annotation by its region id (``id`` up to
the ``#``). Boxes whose ids match nothing (an annotation made through the API with other ids)
are paired by IoU as in :mod:`ml_worker.evaluation` (greedy, highest IoU first, at least
``TOUCH_IOU`` = 0.1), except regions the editor marks ``"origin": "manual"`` (drawn in the editor;
it also writes ``"prediction"`` and ``"prediction-changed"``, same file), which are always drawn.

For each box of the parent prediction (regions with ``x, y, width, height``; their labels are
the ``rectanglelabels``/``labels``/``choices`` values of the result items sharing the region id):

- **accepted**: still there, same box (every side within :data:`BOX_TOLERANCE_PCT`) and labels;
- **relabelled**: same box, other labels; **class picked** counts those whose predicted box had
  no label (a face found without a class, shown grey: the box was right, the class was added);
- **moved**: moved or resized (its labels may have changed too; ``moved_relabelled`` counts those);
- **deleted**: not in the annotation.

Regions of the annotation that come from no predicted box are **drawn** by hand.

A project with an image-level ``<Choices>`` control (``backend.labels.ProjectSchema.kind ==
"choices"``; docs/label_configs.md) gets one ``choices`` result per prediction, with no box. Its
pre-label is counted per control (``from_name``): the prediction's set of chosen values against
the annotation's set for the same control:

- **choice accepted**: the same values;
- **choice changed**: other values;
- **choice removed**: no value of that control in the annotation;
- **chosen by hand**: the annotation has a value of a counted control that the prediction left
  empty (no face found: faceloop sends an empty ``result``).

Which controls count is the project's Choices control (read from its label config by
:func:`refresh`); image-level choices of other controls, and of any control in a boxes project,
are left out. Choices inside a region (``perRegion``; they carry the region's box) are region
labels, as above. Cancelled
(skipped) annotations and annotations without a parent prediction are not counted; the latter are
reported as ``without_prelabel`` per project.

The counts are computed by a pass over the project's tasks through the SDK (:func:`refresh`),
so edits and deletions in Label Studio are always reflected, and stored per model version in
:class:`PrelabelAcceptance` (its own table: no columns are added to existing tables).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel, select

log = logging.getLogger("faceloop.acceptance")

#: Largest change, in percent of the image side (Label Studio's region units, 0-100), of any of
#: ``x, y, width, height`` for a box to count as unchanged (absorbs float round trips of the editor).
BOX_TOLERANCE_PCT = 0.1
#: Degrees of rotation change still counted as unchanged.
ROTATION_TOLERANCE_DEG = 0.5
#: Seconds a stored count is fresh for :func:`refresh_if_stale`.
REFRESH_INTERVAL_S = 30.0


class Counts(SQLModel):
    """Counts of one or many annotations (see the module docstring for each field).

    ``predicted`` boxes = accepted + relabelled + moved + deleted (``moved_relabelled`` is the part
    of ``moved`` whose label changed too; ``class_picked`` the part of ``relabelled`` predicted
    without a label: revision ``0004_class_picked``); ``drawn``: boxes drawn by hand. ``choices_predicted``:
    image-level choices in predictions (one per prediction and Choices control) =
    ``choices_accepted + choices_changed + choices_removed``; ``choices_by_hand``: choices made
    where the prediction had none. The stored table :class:`PrelabelAcceptance` has these columns
    (the ``choices_*`` ones added by revision ``0003_choice_acceptance``, hence their server default).
    """

    annotations: int = 0
    predicted: int = 0
    accepted: int = 0
    relabelled: int = 0
    class_picked: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    moved: int = 0
    moved_relabelled: int = 0
    deleted: int = 0
    drawn: int = 0
    choices_predicted: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    choices_accepted: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    choices_changed: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    choices_removed: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    choices_by_hand: int = Field(default=0, sa_column_kwargs={"server_default": "0"})

    def add(self, other: "Counts") -> None:
        """Add ``other``'s counts to these, field by field."""
        for name in Counts.model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def counts(self) -> "Counts":
        """The counts alone (a stored row without its key columns)."""
        return Counts(**{name: getattr(self, name) for name in Counts.model_fields})

    @property
    def acceptance_rate(self) -> float:
        """Accepted / predicted boxes (0-1); 0 when none were predicted."""
        return self.accepted / self.predicted if self.predicted else 0.0

    @property
    def box_kept_rate(self) -> float:
        """Boxes kept where they were (accepted + relabelled) / predicted boxes (0-1): the share
        of boxes a person did not move, delete or redraw; 0 when none were predicted."""
        return (self.accepted + self.relabelled) / self.predicted if self.predicted else 0.0

    @property
    def choice_acceptance_rate(self) -> float:
        """Choices accepted unchanged / choices predicted (0-1); 0 when none were predicted."""
        return self.choices_accepted / self.choices_predicted if self.choices_predicted else 0.0


class PrelabelAcceptance(Counts, table=True):
    """What people did with one model version's pre-labels in one project: the :class:`Counts`
    of the annotations started from its predictions. ``project_id`` = Label Studio project id.
    """

    __table_args__ = (UniqueConstraint("project_id", "model_version"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    project_id: int = Field(index=True)
    model_version: str
    updated_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


# --- pure comparison ---------------------------------------------------------------------------
def _get(obj, key, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _as_dict(obj) -> dict:
    if isinstance(obj, dict):
        return obj
    for m in ("model_dump", "dict"):
        if hasattr(obj, m):
            return getattr(obj, m)()
    return dict(vars(obj))


def base_id(region_id) -> str:
    """A region id without the editor's ``#<annotation>`` suffix."""
    return str(region_id or "").split("#", 1)[0]


_BOX_KEYS = ("x", "y", "width", "height")
_LABEL_KEYS = ("rectanglelabels", "labels", "choices")


def regions(result: Iterable[Any] | None) -> dict[str, dict]:
    """Boxes of a Label Studio ``result`` list by base region id.

    Returns: ``{id: {"box": (x, y, w, h) in percent 0-100, "rotation": degrees, "labels": frozenset}}``;
    result items without a box (image-level choices, text areas...) only add labels to the region
    of the same id, if there is one. Items without an id get a positional id.
    """
    boxes: dict[str, dict] = {}
    labels: dict[str, set] = {}
    for k, item in enumerate(result or []):
        item = _as_dict(item)
        value = item.get("value") or {}
        rid = base_id(item.get("id")) or f"#pos{k}"
        for key in _LABEL_KEYS:
            if isinstance(value.get(key), list):
                labels.setdefault(rid, set()).update(str(v) for v in value[key])
        if all(isinstance(value.get(c), (int, float)) for c in _BOX_KEYS):
            boxes[rid] = {"box": tuple(float(value[c]) for c in _BOX_KEYS),
                          "rotation": float(value.get("rotation") or 0.0), "origin": item.get("origin")}
    for rid, r in boxes.items():
        r["labels"] = frozenset(labels.get(rid, ()))
    return boxes


def image_choices(result: Iterable[Any] | None, controls: Iterable[str] | None = None) -> dict[str, frozenset]:
    """Image-level choices of a Label Studio ``result``: ``{from_name: frozenset of chosen values}``.

    Items of ``type`` ``choices`` whose ``value`` has no box (``x, y, width, height``: those are
    per-region choices) count; several items of one control are joined. A control with an empty
    ``choices`` list is left out. Args: ``controls``: only these ``from_name`` values (None: all).
    """
    wanted = None if controls is None else set(controls)
    out: dict[str, set] = {}
    for item in result or []:
        item = _as_dict(item)
        value = item.get("value") or {}
        if str(item.get("type", "")).lower() != "choices" or not isinstance(value.get("choices"), list):
            continue
        if all(isinstance(value.get(c), (int, float)) for c in _BOX_KEYS):
            continue  # a region's choice: counted with the region
        name = str(item.get("from_name") or "")
        if wanted is not None and name not in wanted:
            continue
        vals = {str(v) for v in value["choices"]}
        if vals:
            out.setdefault(name, set()).update(vals)
    return {k: frozenset(v) for k, v in out.items()}


def _count_choices(c: "Counts", prediction_result, annotation_result, controls) -> None:
    pred, ann = image_choices(prediction_result, controls), image_choices(annotation_result, controls)
    for name, vals in pred.items():
        c.choices_predicted += 1
        got = ann.get(name)
        if got is None:
            c.choices_removed += 1
        elif got == vals:
            c.choices_accepted += 1
        else:
            c.choices_changed += 1
    c.choices_by_hand += sum(1 for name in ann if name not in pred)


def _same_box(a: dict, b: dict) -> bool:
    return (max(abs(p - q) for p, q in zip(a["box"], b["box"])) <= BOX_TOLERANCE_PCT
            and abs(a["rotation"] - b["rotation"]) <= ROTATION_TOLERANCE_DEG)


def _corners(r: dict) -> tuple[float, float, float, float]:
    x, y, w, h = r["box"]
    return (x, y, x + w, y + h)


def compare(prediction_result: list | None, annotation_result: list | None,
            choice_controls: Iterable[str] | None = None) -> Counts:
    """What a person did with one prediction's boxes and image-level choices in the annotation
    started from it.

    Args:
        prediction_result: the parent prediction's ``result`` (Label Studio regions, percent units).
        annotation_result: the saved annotation's ``result``.
        choice_controls: names of the image-level Choices controls whose choices count (the
            project's Choices control); None: every image-level choice; empty: none.
    Returns: :class:`Counts` with ``annotations=1``.
    """
    from ml_worker.evaluation import TOUCH_IOU, iou_matrix

    pred, ann = regions(prediction_result), regions(annotation_result)
    c = Counts(annotations=1, predicted=len(pred))
    pairs = [(pid, pid) for pid in pred if pid in ann]
    free_p = [p for p in pred if p not in ann]
    drawn = [a for a in ann if a not in pred and ann[a]["origin"] == "manual"]  # the editor says so
    free_a = [a for a in ann if a not in pred and ann[a]["origin"] != "manual"]
    if free_p and free_a:  # ids do not match (annotation made outside the editor): pair by IoU
        ious = iou_matrix([_corners(pred[p]) for p in free_p], [_corners(ann[a]) for a in free_a])
        order = sorted(((ious[i, j], i, j) for i in range(len(free_p)) for j in range(len(free_a))), reverse=True)
        used_p, used_a = set(), set()
        for v, i, j in order:
            if v < TOUCH_IOU:
                break
            if i in used_p or j in used_a:
                continue
            used_p.add(i)
            used_a.add(j)
            pairs.append((free_p[i], free_a[j]))
        free_p = [p for i, p in enumerate(free_p) if i not in used_p]
        free_a = [a for j, a in enumerate(free_a) if j not in used_a]
    for p, a in pairs:
        same_labels = pred[p]["labels"] == ann[a]["labels"]
        if _same_box(pred[p], ann[a]):
            if same_labels:
                c.accepted += 1
            else:
                c.relabelled += 1
                if not pred[p]["labels"]:  # a grey box (face without a class) kept, class picked
                    c.class_picked += 1
        else:
            c.moved += 1
            if not same_labels:
                c.moved_relabelled += 1
    c.deleted = len(free_p)
    c.drawn = len(free_a) + len(drawn)
    _count_choices(c, prediction_result, annotation_result, choice_controls)
    return c


def task_counts(task, choice_controls: Iterable[str] | None = None) -> tuple[dict[str, Counts], int]:
    """Counts by model version for one Label Studio task (dict or SDK object with ``annotations``
    and ``predictions``, as ``tasks.list(fields="all")`` returns it); ``choice_controls`` as in
    :func:`compare`.

    Returns: ``({model_version: Counts}, annotations without a parent prediction)``; cancelled
    annotations are left out; an annotation whose parent prediction is gone from the task
    (deleted) is left out too.
    """
    preds = {_get(p, "id"): p for p in (_get(task, "predictions") or [])}
    out: dict[str, Counts] = {}
    without = 0
    for a in _get(task, "annotations") or []:
        if _get(a, "was_cancelled", False):
            continue
        parent = _get(a, "parent_prediction")
        if parent is None:
            without += 1
            continue
        p = preds.get(parent)
        if p is None:
            continue
        version = str(_get(p, "model_version") or "")
        out.setdefault(version, Counts()).add(compare(_get(p, "result"), _get(a, "result"), choice_controls))
    return out, without


def project_counts(tasks: Iterable[Any], choice_controls: Iterable[str] | None = None
                   ) -> tuple[dict[str, Counts], int]:
    """:func:`task_counts` summed over tasks: ``({model_version: Counts}, without_prelabel)``."""
    total: dict[str, Counts] = {}
    without = 0
    controls = None if choice_controls is None else tuple(choice_controls)
    for t in tasks:
        per, w = task_counts(t, controls)
        without += w
        for v, c in per.items():
            total.setdefault(v, Counts()).add(c)
    return total, without


# --- storage -----------------------------------------------------------------------------------
_tables_ready: set[str] = set()
_without: dict[int, int] = {}
_refreshing: set[int] = set()
_dirty: set[int] = set()
_lock = threading.Lock()


def ensure_table(url: str):
    """The engine for ``url`` with the acceptance table created (once per process)."""
    from backend.db import get_engine

    eng = get_engine(url)
    if url not in _tables_ready:
        PrelabelAcceptance.__table__.create(eng, checkfirst=True)
        _tables_ready.add(url)
    return eng


def store(settings, project_id: int, counts: dict[str, Counts]) -> None:
    """Replace the project's stored counts by ``counts`` (one transaction)."""
    ensure_table(settings.database_url)
    from backend.db import session_scope

    with session_scope(settings.database_url) as s:
        for row in s.exec(select(PrelabelAcceptance).where(PrelabelAcceptance.project_id == project_id)).all():
            s.delete(row)
        s.flush()
        now = datetime.now(timezone.utc)
        for version, c in sorted(counts.items()):
            s.add(PrelabelAcceptance(project_id=project_id, model_version=version, updated_at=now, **c.counts().model_dump()))


def stored(settings, project_id: int | None = None) -> list[PrelabelAcceptance]:
    """Stored counts (all projects when ``project_id`` is None), by project then version."""
    ensure_table(settings.database_url)
    from backend.db import session_scope

    with session_scope(settings.database_url) as s:
        q = select(PrelabelAcceptance).order_by(PrelabelAcceptance.project_id, PrelabelAcceptance.model_version)
        if project_id is not None:
            q = q.where(PrelabelAcceptance.project_id == project_id)
        return list(s.exec(q).all())


def refresh(settings, project_id: int, client=None) -> dict[str, Counts]:
    """Recount a project's pre-label acceptance from Label Studio and store it.

    Reads the project's label config (which Choices control counts: :func:`choice_controls`) and
    every task with its annotations and predictions (``tasks.list(fields="all")``, 100 a page).
    Raises: backend.images.ImageError when no LABEL_STUDIO_API_KEY is set; the SDK's ApiError /
    httpx errors when Label Studio cannot be read (nothing stored then).
    """
    if client is None:
        from backend.images import ls_client

        client = ls_client(settings)
    from backend.lsapi import all_pages

    controls = choice_controls(_get(client.projects.get(id=project_id), "label_config") or "")
    counts, without = project_counts(all_pages(client.tasks.list, project=project_id, fields="all"), controls)
    store(settings, project_id, counts)
    _without[project_id] = without
    return counts


def choice_controls(label_config: str) -> tuple[str, ...]:
    """The image-level Choices control whose pre-labels count: ``(name,)`` for a Choices project
    (``ProjectSchema.kind == "choices"``), ``()`` for a boxes project or a config faceloop does
    not serve (its image-level choices are the person's own)."""
    from backend.labels import LabelConfigError, ProjectSchema

    try:
        schema = ProjectSchema.parse(label_config)
    except (LabelConfigError, ValueError):
        return ()
    return (schema.from_name,) if schema.is_choices else ()


def is_stale(settings, project_id: int, max_age_s: float = REFRESH_INTERVAL_S) -> bool:
    """True when the project's counts are older than ``max_age_s``, were never computed, or an
    annotation changed since (:func:`request_recount`)."""
    if project_id in _dirty:
        return True
    rows = stored(settings, project_id)
    if not rows:
        return project_id not in _without
    t = max(r.updated_at for r in rows)
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - t).total_seconds() > max_age_s


def refresh_in_background(settings, project_id: int, max_age_s: float = REFRESH_INTERVAL_S
                          ) -> threading.Thread | None:
    """Start :func:`refresh` in a daemon thread when the counts are stale (:func:`is_stale`).

    Never blocks; one recount per project at a time: a request while one runs (see
    :func:`request_recount`) makes it count once more when it ends. Errors are logged.
    Returns: the thread started (join it to wait), or None when none was needed or possible
    (no LABEL_STUDIO_API_KEY, counts fresh, one already running).
    """
    if not settings.label_studio_api_key:
        return None
    with _lock:
        if project_id in _refreshing:
            return None
        _refreshing.add(project_id)
    try:
        stale = is_stale(settings, project_id, max_age_s)
    except Exception:
        with _lock:
            _refreshing.discard(project_id)
        raise
    if not stale:
        with _lock:
            _refreshing.discard(project_id)
        return None

    def run():
        try:
            for _ in range(5):  # bounded: annotations saved during a recount get one more
                _dirty.discard(project_id)
                t0 = time.monotonic()
                try:
                    refresh(settings, project_id)
                    log.info("pre-label acceptance of project %s recounted in %.1f s", project_id,
                             time.monotonic() - t0)
                except Exception as e:
                    log.warning("pre-label acceptance of project %s not recounted: %s", project_id, e)
                    break
                if project_id not in _dirty:
                    break
        finally:
            with _lock:
                _refreshing.discard(project_id)

    t = threading.Thread(target=run, daemon=True, name=f"acceptance-{project_id}")
    t.start()
    return t


def request_recount(settings, project_id: int) -> threading.Thread | None:
    """An annotation of the project was created, updated or deleted: recount now, in the background
    (for the ``ANNOTATION_CREATED``/``ANNOTATION_UPDATED``/``ANNOTATIONS_CREATED``/``ANNOTATIONS_DELETED``
    webhooks; returns at once). Returns: the thread started, or None (see :func:`refresh_in_background`).
    Without LABEL_STUDIO_API_KEY nothing can recount, so nothing is marked (a mark left behind would
    make the counts read stale for good)."""
    if not settings.label_studio_api_key:
        return None
    _dirty.add(project_id)
    return refresh_in_background(settings, project_id, 0.0)


def without_prelabel(project_id: int) -> int | None:
    """Annotations of the project made without a pre-label at the last recount in this process."""
    return _without.get(project_id)


# --- rows for the CLI --------------------------------------------------------------------------
COLUMNS = ("version", "annotations", "predicted", "accepted", "relabelled", "moved", "deleted", "drawn",
           "accepted %")
#: Columns of a Choices project's versions (image-level choices; see the module docstring).
CHOICE_COLUMNS = ("version", "annotations", "choices predicted", "choice accepted", "choice changed",
                  "choice removed", "chosen by hand", "choices accepted %")


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}" if d else ""


def acceptance_rows(settings, project_id: int, refresh_now: bool = True) -> list[dict]:
    """One row per model version for ``faceloop versions``: keys :data:`COLUMNS` and :data:`CHOICE_COLUMNS`.

    Args:
        refresh_now: recount from Label Studio first (:func:`refresh`); on failure the stored
            counts are returned and the error is logged.
    Returns: rows ordered by version name; ``"accepted %"`` is accepted / predicted boxes and
        ``"choices accepted %"`` choices accepted / choices predicted, in percent (0-100, one
        decimal), ``""`` when none was predicted.
    """
    if refresh_now:
        try:
            refresh(settings, project_id)
        except Exception as e:
            log.warning("pre-label acceptance not recounted from Label Studio (stored counts shown): %s", e)
    out = []
    for r in stored(settings, project_id):
        out.append({"version": r.model_version, "annotations": r.annotations, "predicted": r.predicted,
                    "accepted": r.accepted, "relabelled": r.relabelled, "moved": r.moved, "deleted": r.deleted,
                    "drawn": r.drawn, "accepted %": _pct(r.accepted, r.predicted),
                    "choices predicted": r.choices_predicted, "choice accepted": r.choices_accepted,
                    "choice changed": r.choices_changed, "choice removed": r.choices_removed,
                    "chosen by hand": r.choices_by_hand,
                    "choices accepted %": _pct(r.choices_accepted, r.choices_predicted)})
    return out


def acceptance_tables(rows: list[dict], title: str = "pre-label acceptance") -> list:
    """``rich.table.Table`` objects of :func:`acceptance_rows` (for ``faceloop versions``): one of
    boxes (:data:`COLUMNS`) when any version has boxes predicted or drawn, or no choice counted;
    one of image-level choices (:data:`CHOICE_COLUMNS`) when any version has choices counted."""
    from rich.table import Table

    has_choices = any(r.get("choices predicted") or r.get("chosen by hand") for r in rows)
    has_boxes = any(r.get("predicted") or r.get("drawn") for r in rows) or not has_choices
    out = []
    for cols, what, wanted in ((COLUMNS, "boxes", has_boxes), (CHOICE_COLUMNS, "image-level choices", has_choices)):
        if not wanted:
            continue
        t = Table(title=f"{title} ({what})")
        for c in cols:
            t.add_column(c, justify="left" if c == "version" else "right")
        for r in rows:
            t.add_row(*(str(r.get(c, "")) for c in cols))
        out.append(t)
    return out


def acceptance_table(rows: list[dict], title: str = "pre-label acceptance"):
    """The tables of :func:`acceptance_tables` as one printable (``rich.console.Group``)."""
    from rich.console import Group

    return Group(*acceptance_tables(rows, title))


# --- /metrics ------------------------------------------------------------------------------------
class AcceptanceCollector:
    """Prometheus collector of the stored counts (read at each scrape, one small query).

    Gauges (counts can go down when annotations are deleted or edited), labelled by
    ``project`` and ``model_version``:
    ``faceloop_prelabel_boxes{outcome=predicted|accepted|relabelled|class_picked|moved|deleted|drawn}``,
    ``faceloop_prelabel_choices{outcome=predicted|accepted|changed|removed|by_hand}`` (image-level
    choices of Choices projects) and ``faceloop_prelabel_annotations`` (annotations started from a
    prediction).
    """

    def __init__(self, settings):
        self.settings = settings

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        boxes = GaugeMetricFamily("faceloop_prelabel_boxes", "Pre-labelled boxes by what people did with them "
                                  "(drawn = boxes drawn by hand)", labels=["project", "model_version", "outcome"])
        choices = GaugeMetricFamily("faceloop_prelabel_choices", "Pre-labelled image-level choices by what people "
                                    "did with them (by_hand = chosen where the prediction had none)",
                                    labels=["project", "model_version", "outcome"])
        anns = GaugeMetricFamily("faceloop_prelabel_annotations", "Annotations started from a prediction",
                                 labels=["project", "model_version"])
        try:
            rows = stored(self.settings)
        except Exception as e:  # a scrape must not fail because of the database
            log.warning("acceptance metrics not read: %s", e)
            rows = []
        for r in rows:
            for outcome in ("predicted", "accepted", "relabelled", "class_picked", "moved", "deleted", "drawn"):
                boxes.add_metric([str(r.project_id), r.model_version, outcome], getattr(r, outcome))
            for outcome in ("predicted", "accepted", "changed", "removed", "by_hand"):
                choices.add_metric([str(r.project_id), r.model_version, outcome], getattr(r, f"choices_{outcome}"))
            anns.add_metric([str(r.project_id), r.model_version], r.annotations)
        yield boxes
        yield choices
        yield anns
