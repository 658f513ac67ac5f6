"""The status page: what the loop is doing, per project, as server-rendered HTML (Jinja2).

Routes (all behind the backend's auth: basic auth, or loopback-only without it; see
docs/security.md):

- ``GET /status``: the projects faceloop serves, with their served version and running job.
- ``GET /status/{project_id}``: the running training job (stage, the stage's epoch k of n named by
  stage, e.g. "detector epoch 3 of 10": :func:`backend.jobprogress.epoch_text`; estimated time
  left per stage: :mod:`backend.jobprogress`), finished jobs, every model version with its metrics, gate decision and reason, its plots,
  pre-label acceptance per version (:mod:`backend.acceptance`), per-task errors and the head of the
  review queue with thumbnails. The page reloads itself (meta refresh: 5 s while a job is queued
  or running, 30 s otherwise).
- ``GET /status/{project_id}/versions/{version_id}/plots/{k}``: the k-th file of the version's
  ``metrics["plots"]``, read from the database's model store (:mod:`modelstore`) into this
  machine's ``MODEL_DIR``; served only when it lies inside ``MODEL_DIR`` and is a PNG/JPEG (inline)
  or CSV (download).
- ``GET /status/{project_id}/tasks/{task_id}/thumb.jpg``: a thumbnail (at most
  :data:`THUMB_SIDE` pixels a side, JPEG) of the task's image, read through
  :func:`backend.images.load_image` (same credential and SSRF rules as /predict).
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlmodel import select

import modelstore
from backend import acceptance, jobprogress
from backend.config import Settings
from backend.db import session_scope
from backend.models import ModelVersion, Project, TaskScore, TrainingJob, WebhookEvent
from backend.registry import ANNOTATION_ACTIONS

log = logging.getLogger("faceloop.status")

#: A Label Studio / database id in a URL: 1..2^63-1 (else 422, never a database overflow).
Id = Annotated[int, PathParam(ge=1, le=2**63 - 1)]
#: A plot index in a URL.
Index = Annotated[int, PathParam(ge=0, le=10_000)]

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: Longest side of a review-queue thumbnail, pixels.
THUMB_SIDE = 160
#: Thumbnails kept in memory (LRU), about 5-10 kB each.
THUMB_CACHE = 256
#: Seconds the page waits for a pre-label acceptance recount before it shows the stored counts.
ACCEPTANCE_WAIT_S = 2.0
#: Review-queue entries shown.
QUEUE_HEAD = 12
#: Finished jobs shown.
FINISHED_JOBS = 15
#: Per-task errors shown.
ERRORS_SHOWN = 50
#: Plot files served inline; others of ``PLOT_DOWNLOADS`` as a download; anything else 404.
PLOT_IMAGES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
PLOT_DOWNLOADS = {".csv": "text/csv"}

#: Candidate figures shown per version: (metrics key, column title, kind).
FIGURES = [("accuracy", "image acc.", "pct"),  # Choices projects (image-level accuracy; docs/label_configs.md)
           ("mAP50", "mAP50", "f3"), ("face_mAP50", "face mAP50", "f3"), ("acceptance_rate", "accepted %", "pct"),
           ("class_accuracy", "class acc.", "pct"), ("accepted", "faces accepted", "int"),
           ("class_fixed", "class fix", "int"), ("box_fixed", "box fix", "int"), ("missed", "missed", "int"),
           ("false_boxes", "false boxes", "int"),
           ("boxes_per_face", "boxes/face", "f2")]

_env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                   trim_blocks=True, lstrip_blocks=True)


def _fmt(value, kind: str) -> str:
    if value is None or value == "":
        return "–"
    try:
        if kind == "pct":
            return f"{100 * float(value):.1f}%"
        if kind == "f3":
            return f"{float(value):.3f}"
        if kind == "f2":
            return f"{float(value):.2f}"
        if kind == "int":
            return str(int(value))
    except (TypeError, ValueError):
        return str(value)
    return str(value)


def _aware(t: datetime | None) -> datetime | None:
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=timezone.utc)
    return t


#: "49 s", "2 min 05 s", "1 h 03 min"; "–" for None.
_duration = jobprogress.duration


def eta_seconds(job: TrainingJob, now: datetime | None = None, previous: TrainingJob | None = None) -> float | None:
    """Estimated seconds left of a running job's stages that will run (the refit after a passing
    gate not counted), per stage (:func:`backend.jobprogress.estimate`); None when it cannot tell
    (not running, no stage record, or a later stage with no earlier job to time it by)."""
    est = jobprogress.estimate(job, previous, now)
    return est.total if est is not None else None


def _previous_job(jobs: list[TrainingJob], j: TrainingJob) -> TrainingJob | None:
    """The latest succeeded job of the project before ``j`` that has stage records."""
    return next((p for p in jobs if p.id is not None and j.id is not None and p.id < j.id
                 and p.state == "succeeded" and p.stages), None)


def _job_view(j: TrainingJob, now: datetime, previous: TrainingJob | None = None) -> dict:
    start, end = _aware(j.started_at), _aware(j.finished_at)
    ran = ((end or now) - start).total_seconds() if start else None
    est = jobprogress.estimate(j, previous, now) if j.state == "running" else None
    se = jobprogress.stage_epochs(j)  # the running stage's own epochs, named (one scale on the page)
    return {"id": j.id, "state": j.state, "stage": j.stage or "–", "epoch_text": jobprogress.epoch_text(j),
            "pct": int(100 * se[1] / se[2]) if se else 0, "trigger": j.trigger,
            "message": j.message, "error": j.error, "n_train": j.n_train, "n_val": j.n_val,
            "created": j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else "",
            "ran": _duration(ran), "eta": _duration(est.total) if est is not None and est.total is not None else None,
            # no open stage of a recorded job: it is registering its version (no line); no record at
            # all: a worker from before per-stage records (no number rather than a wrong one)
            "time_left": (est.text() if est is not None else None if j.stages
                          else "time left not known (no per-stage progress recorded)") if j.state == "running" else None,
            "version_id": j.version_id}


def _plots(settings: Settings, v: ModelVersion) -> list[dict]:
    """The version's plots that :func:`plot_path` serves: ``[{"k", "name", "image"}]``."""
    out = []
    plots = sorted((v.metrics.get("plots") or {}).items())
    if not plots:
        return out
    with session_scope(settings.database_url) as s:  # one query per version, not per plot
        stored = {n for n, _sha, _size in modelstore.listing(s, v.project_id, v.version)}
    for k, (name, path) in enumerate(plots):
        try:
            plot_path(settings, v, k, fetch=False, stored=stored)
        except HTTPException:
            continue
        out.append({"k": k, "name": name, "image": Path(str(path)).suffix.lower() in PLOT_IMAGES})
    return out


def plot_path(settings: Settings, v: ModelVersion, k: int, fetch: bool = True, stored: set | None = None) -> Path:
    """The k-th plot file of a version (plots sorted by name), when it may be served.

    A version whose files are in the database's model store (:mod:`modelstore`) serves the stored
    file of that name, copied (``fetch``) into this machine's ``MODEL_DIR``; ``fetch=False`` only
    checks that the file is stored. A version from before the store serves the file at its path.
    ``stored``: the version's stored file names when the caller has them (else read here).

    Raises: HTTPException 404 when there is no such plot, the file is missing, is not a PNG/JPEG/CSV,
    or resolves (links followed) outside ``MODEL_DIR``.
    """
    plots = sorted((v.metrics.get("plots") or {}).items())
    if not 0 <= k < len(plots):
        raise HTTPException(404, f"version {v.version} has no plot {k}")
    if stored is None:
        with session_scope(settings.database_url) as s:
            stored = {name for name, _sha, _size in modelstore.listing(s, v.project_id, v.version)}
    if stored:
        name = Path(str(plots[k][1])).name
        if name not in stored:
            raise HTTPException(404, f"plot {name!r} is not a stored file of version {v.version}")
        if Path(name).suffix.lower() not in PLOT_IMAGES and Path(name).suffix.lower() not in PLOT_DOWNLOADS:
            raise HTTPException(404, "only PNG, JPEG and CSV plots are served")
        if not fetch:
            return modelstore.version_dir(settings, v.project_id, v.version) / name
        try:
            folder = modelstore.materialise(settings, v.project_id, v.version)
        except modelstore.ArtifactError as e:
            raise HTTPException(404, str(e))
        path = (folder / name).resolve()
    else:
        path = Path(str(plots[k][1])).resolve()
    store = Path(settings.model_dir).resolve()
    if not path.is_relative_to(store):
        raise HTTPException(404, "plot is not in the model store")
    if path.suffix.lower() not in PLOT_IMAGES and path.suffix.lower() not in PLOT_DOWNLOADS:
        raise HTTPException(404, "only PNG, JPEG and CSV plots are served")
    if not path.is_file():
        raise HTTPException(404, f"plot file of version {v.version} is missing")
    return path


#: Size of a learning-curve sparkline, pixels (inline SVG: no script, no extra request).
CURVE_W, CURVE_H, CURVE_PAD = 260, 80, 6
#: Columns of ultralytics' ``results.csv`` drawn as learning curves: (column, title).
DETECTOR_CURVES = [("train/box_loss", "detector box loss (train)"), ("metrics/mAP50(B)", "detector mAP50 (validation)")]


def curve(name: str, values) -> dict | None:
    """A learning curve as an SVG polyline: ``{"name", "points", "n", "first", "last", "lo", "hi"}``.

    Args:
        values: one number per epoch (non-numbers and NaN are left out).
    Returns: ``points`` in a ``CURVE_W`` x ``CURVE_H`` box (x: epoch, y: value, higher value up,
        scaled to the curve's own min and max), or None with fewer than 2 values.
    """
    import math

    ys = []
    for x in values or []:
        try:
            f = float(x)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            ys.append(f)
    if len(ys) < 2:
        return None
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    w, h = CURVE_W - 2 * CURVE_PAD, CURVE_H - 2 * CURVE_PAD
    pts = " ".join(f"{CURVE_PAD + w * i / (len(ys) - 1):.1f},{CURVE_PAD + h * (1 - (y - lo) / span):.1f}"
                   for i, y in enumerate(ys))
    return {"name": name, "points": pts, "n": len(ys), "first": f"{ys[0]:.3g}", "last": f"{ys[-1]:.3g}",
            "lo": f"{lo:.3g}", "hi": f"{hi:.3g}"}


def _curves(settings: Settings, v: ModelVersion) -> list[dict]:
    """Learning curves of a version's training: the detector's per-epoch box loss and validation
    mAP50 (ultralytics' ``results.csv``, one of the version's plots, read only from inside
    ``MODEL_DIR``) and the face classifier's per-epoch training loss
    (``metrics["classifier_training"]["loss"]``)."""
    import csv

    out = []
    for k, (name, _) in enumerate(sorted((v.metrics.get("plots") or {}).items())):
        if not name.endswith("results.csv"):
            continue
        try:
            with open(plot_path(settings, v, k), newline="") as f:
                rows = [{(key or "").strip(): val for key, val in r.items()} for r in csv.DictReader(f)]
        except (HTTPException, OSError, csv.Error, UnicodeDecodeError):
            continue
        for col, title in DETECTOR_CURVES:
            c = curve(title, [r.get(col) for r in rows])
            if c:
                out.append(c)
    clf = v.metrics.get("classifier_training") or {}
    c = curve("face classifier loss (train)", clf.get("loss") if isinstance(clf, dict) else None)
    if c:
        out.append(c)
    return out


#: Longest error text kept per task (characters).
ERROR_CHARS = 2000


def record_predict_errors(settings: Settings, project_id: int, model_version: str, failed: dict[int, str],
                          ok: list[int] = ()) -> None:
    """Keep the per-task errors of a ``/predict`` answer where the status page lists them.

    Label Studio drops a prediction without ``result`` and shows the person nothing (its Data
    Manager action answers "Retrieved N predictions" for N selected tasks whatever the backend
    said; docs/label_configs.md, "Per-task errors of /predict"), so the error is stored as the
    task's :class:`TaskScore` error for ``model_version`` (the row the scoring worker writes for
    the same error; no review-queue rank), and cleared when ``/predict`` later succeeds for that
    task (the next scoring pass writes its score).

    Args:
        failed: ``{task id: error message}``; ok: ids of tasks predicted without error.
    Raises: SQLAlchemy errors when the database cannot be written (the caller logs them).
    """
    from backend.db import insert_missing
    from backend.models import utcnow

    if not failed and not ok:
        return
    with session_scope(settings.database_url) as s:
        for tid, err in failed.items():
            insert_missing(s, TaskScore(project_id=project_id, task_id=tid, model_version=model_version,
                                        uncertainty=1.0, least_confidence=1.0, margin=1.0, entropy=1.0,
                                        error=err[:ERROR_CHARS]))
            row = s.exec(select(TaskScore).where(TaskScore.project_id == project_id, TaskScore.task_id == tid,
                                                 TaskScore.model_version == model_version)).first()
            if row is not None:
                row.error, row.scored_at = err[:ERROR_CHARS], utcnow()
        if ok:
            for row in s.exec(select(TaskScore).where(TaskScore.project_id == project_id,
                                                      TaskScore.model_version == model_version,
                                                      TaskScore.error != "", TaskScore.task_id.in_(list(ok)))).all():
                s.delete(row)


def shown_figures(versions: list[ModelVersion]) -> list[tuple[str, str, str]]:
    """The columns of :data:`FIGURES` that some version's candidate figures fill (all of them when no
    version has figures yet): a boxes project gets no image accuracy column of dashes, a Choices
    project no box columns, as in ``faceloop versions``."""
    cands = [v.metrics.get("candidate") or {} for v in versions]
    shown = [f for f in FIGURES if any(c.get(f[0]) not in (None, "") for c in cands)]
    return shown or list(FIGURES)


def _version_view(settings: Settings, v: ModelVersion, served_id: int | None, acc: dict,
                  figure_cols: list | None = None) -> dict:
    m = v.metrics
    cand, cur = m.get("candidate") or {}, m.get("current") or {}
    figures = [{"title": t, "value": _fmt(cand.get(k), kind), "current": _fmt(cur.get(k), kind) if cur else ""}
               for k, t, kind in (figure_cols or FIGURES)]
    a = acc.get(v.version)
    return {"id": v.id, "version": v.version, "status": v.status, "served": v.id == served_id,
            "gate_reason": v.gate_reason, "created": v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "",
            "current_version": m.get("current_version") or "", "has_metrics": bool(cand),
            "figures": figures, "n_train": m.get("n_train"), "n_val": m.get("n_val"),
            "train_seconds": m.get("train_seconds"), "plots": _plots(settings, v), "acceptance": a,
            "job": v.training_job_id, "confusion": _confusion_view(cand.get("confusion")),
            "curves": _curves(settings, v)}


def _confusion_view(c) -> dict | None:
    """The candidate's class confusion (``ml_worker.evaluation.confusion``) as table rows, or None."""
    if not isinstance(c, dict) or not c.get("labels") or not isinstance(c.get("matrix"), list):
        return None
    labels = [str(x) for x in c["labels"]]
    missed, false = c.get("missed") or {}, c.get("false_boxes") or {}
    rows = [{"label": lab, "cells": [int(x) for x in row], "missed": int(missed.get(lab, 0))}
            for lab, row in zip(labels, c["matrix"]) if any(row) or missed.get(lab)]
    return {"labels": labels, "rows": rows, "false": [int(false.get(lab, 0)) for lab in labels]}


def _acc_view(r: acceptance.PrelabelAcceptance) -> dict:
    return {"version": r.model_version, "annotations": r.annotations, "predicted": r.predicted,
            "accepted": r.accepted, "relabelled": r.relabelled, "moved": r.moved, "deleted": r.deleted,
            "drawn": r.drawn, "rate": _fmt(r.accepted / r.predicted, "pct") if r.predicted else "–",
            "class_picked": r.class_picked,
            "kept_rate": _fmt(r.box_kept_rate, "pct") if r.predicted else "–",
            "boxes": bool(r.predicted or r.drawn), "choices": bool(r.choices_predicted or r.choices_by_hand),
            "choices_predicted": r.choices_predicted, "choices_accepted": r.choices_accepted,
            "choices_changed": r.choices_changed, "choices_removed": r.choices_removed,
            "choices_by_hand": r.choices_by_hand,
            "choices_rate": _fmt(r.choices_accepted / r.choices_predicted, "pct") if r.choices_predicted else "–",
            "updated": _aware(r.updated_at).strftime("%H:%M:%S")}


#: A ``faceloop up`` folder link's name in the document root (``backend.cli._media_link``):
#: ``<folder name>-<8 hex>``.
_MEDIA_LINK = re.compile(r"^[A-Za-z0-9._-]*-[0-9a-f]{8}$")
#: Seconds the project page spends at most asking Label Studio for the file names of error rows.
FILE_NAMES_BUDGET_S = 3.0


def image_file_name(url: str) -> str:
    """The file a task's image URL names, for a person: for Label Studio's Local Files URL
    ``/data/local-files/?d=<link>/<file>`` the path after ``faceloop up``'s folder link
    (``<folder name>-<8 hex>``; the whole ``d`` path when it starts otherwise); for any other URL
    the last path segment (an uploaded file keeps Label Studio's ``<8 hex>-`` prefix). "" for no URL."""
    from urllib.parse import parse_qs, unquote, urlsplit

    if not isinstance(url, str) or not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    if parts.path.rstrip("/").endswith("/data/local-files"):
        segs = [x for x in (parse_qs(parts.query).get("d") or [""])[0].split("/") if x]
        if len(segs) > 1 and _MEDIA_LINK.match(segs[0]):
            segs = segs[1:]
        return "/".join(segs)
    return unquote(parts.path.rstrip("/").rsplit("/", 1)[-1])


def _image_url(task, config: str) -> str | None:
    """The image URL of a Label Studio task: its data's value under the project's Image ``value``
    key, else its first string value."""
    from backend.labels import LabelConfigError, ProjectSchema

    data = dict(getattr(task, "data", None) or {})
    url = None
    try:
        url = data.get(ProjectSchema.parse(config).value_key)
    except LabelConfigError:
        pass
    if not isinstance(url, str):
        url = next((v for v in data.values() if isinstance(v, str)), None)
    return url or None


def task_file_names(settings: Settings, pid: int, task_ids: list[int], config: str,
                    ls_url: str | None = None) -> dict[int, str]:
    """``{task id: image file name}`` (:func:`image_file_name`) of project ``pid``'s tasks, read
    from Label Studio (``tasks.get``, 2 s each, :data:`FILE_NAMES_BUDGET_S` in all) and kept in
    memory (a task's image does not change). Tasks that cannot be read (no API key, Label Studio
    down, another project's task) are left out; never raises."""
    import time

    from backend.images import ls_client

    out, todo = {}, []
    for tid in task_ids:
        name = _file_names.get((pid, tid))
        if name is None:
            todo.append(tid)
        else:
            out[tid] = name
    if not todo or not settings.label_studio_api_key:
        return out
    end = time.monotonic() + FILE_NAMES_BUDGET_S
    try:
        client = ls_client(settings, ls_url)
        for tid in todo:
            if time.monotonic() > end:
                break
            task = client.tasks.get(id=tid, request_options={"timeout_in_seconds": 2})
            if int(getattr(task, "project", None) or 0) != pid:
                continue
            out[tid] = image_file_name(_image_url(task, config) or "")
            _file_names.put((pid, tid), out[tid])
    except Exception as e:  # noqa: BLE001 - the page shows the rows without names
        log.info("file names of project %s's error rows not read from Label Studio: %s", pid, e.__class__.__name__)
    return out


def project_context(settings: Settings, pid: int) -> dict:
    """Everything the project page shows, as plain values (for the template and tests).

    Raises: HTTPException 404 when faceloop does not serve project ``pid``.
    """
    now = datetime.now(timezone.utc)
    with session_scope(settings.database_url) as s:
        proj = s.get(Project, pid)
        if proj is None:
            raise HTTPException(404, f"project {pid} is not set up in faceloop (connect the ML backend in Label Studio)")
        jobs = s.exec(select(TrainingJob).where(TrainingJob.project_id == pid)
                      .order_by(TrainingJob.id.desc())).all()
        active = [_job_view(j, now, _previous_job(jobs, j)) for j in jobs if j.state in ("queued", "running")]
        finished = [_job_view(j, now) for j in jobs if j.state not in ("queued", "running")][:FINISHED_JOBS]
        versions = s.exec(select(ModelVersion).where(ModelVersion.project_id == pid)
                          .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())).all()
        served = s.get(ModelVersion, proj.promoted_version_id) if proj.promoted_version_id else None
        served_name = served.version if served else ""
        # review queue: the most recently scored version's ranking
        latest = s.exec(select(TaskScore.model_version).where(TaskScore.project_id == pid)
                        .order_by(TaskScore.scored_at.desc())).first()
        queue_version = served_name if served_name and s.exec(
            select(TaskScore.id).where(TaskScore.project_id == pid, TaskScore.model_version == served_name)).first() \
            else latest
        queue = []
        if queue_version:
            # tasks annotated since they were scored leave the queue (as in Label Studio's Review queue view)
            labelled = select(WebhookEvent.task_id).where(WebhookEvent.project_id == pid,
                                                          WebhookEvent.action.in_(ANNOTATION_ACTIONS),
                                                          WebhookEvent.task_id.is_not(None))
            queue = [{"task": t.task_id, "rank": t.rank, "uncertainty": f"{t.uncertainty:.3f}", "boxes": t.n_boxes,
                      "batch": t.in_query_batch}
                     for t in s.exec(select(TaskScore).where(TaskScore.project_id == pid,
                                                             TaskScore.model_version == queue_version,
                                                             TaskScore.error == "",
                                                             TaskScore.task_id.not_in(labelled))
                                     .order_by(TaskScore.rank, TaskScore.task_id).limit(QUEUE_HEAD)).all()]
        errors = [{"task": t.task_id, "version": t.model_version, "error": t.error,
                   "when": t.scored_at.strftime("%Y-%m-%d %H:%M") if t.scored_at else ""}
                  for t in s.exec(select(TaskScore).where(TaskScore.project_id == pid, TaskScore.error != "")
                                  .order_by(TaskScore.scored_at.desc()).limit(ERRORS_SHOWN)).all()]
        title, config, ls_url = proj.title, proj.label_config, proj.ls_url
    names = task_file_names(settings, pid, sorted({e["task"] for e in errors}), config, ls_url) if errors else {}
    for e in errors:
        e["file"] = names.get(e["task"], "")
    figure_cols = shown_figures(versions)
    acc_rows = [_acc_view(r) for r in acceptance.stored(settings, pid)]
    acc = {r["version"]: r for r in acc_rows}
    ls = settings.label_studio_url.rstrip("/")
    return {"pid": pid, "title": title or f"project {pid}", "ls_project": f"{ls}/projects/{pid}/data",
            "ls_task": f"{ls}/projects/{pid}/data?task=", "active": active, "finished": finished,
            "versions": [_version_view(settings, v, served.id if served else None, acc, figure_cols) for v in versions],
            "served": served_name, "queue": queue, "queue_version": queue_version or "", "errors": errors,
            "acceptance": acc_rows, "without_prelabel": acceptance.without_prelabel(pid),
            # a Choices project's versions get the table of image-level choices; boxes (or no count yet) the box table
            "acceptance_choices": any(a["choices"] for a in acc_rows),
            "acceptance_boxes": any(a["boxes"] for a in acc_rows) or not any(a["choices"] for a in acc_rows),
            "refresh_s": 5 if active else 30, "now": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "figures": [t for _, t, _ in figure_cols], "acceptance_live": bool(settings.label_studio_api_key)}


def index_context(settings: Settings) -> dict:
    """The projects faceloop serves, for ``GET /status``."""
    with session_scope(settings.database_url) as s:
        out = []
        for p in s.exec(select(Project).order_by(Project.id)).all():
            served = s.get(ModelVersion, p.promoted_version_id) if p.promoted_version_id else None
            job = s.exec(select(TrainingJob).where(TrainingJob.project_id == p.id,
                                                   TrainingJob.state.in_(("queued", "running")))
                         .order_by(TrainingJob.id.desc())).first()
            n = len(s.exec(select(ModelVersion.id).where(ModelVersion.project_id == p.id)).all())
            out.append({"id": p.id, "title": p.title or f"project {p.id}", "served": served.version if served else "–",
                        "versions": n,
                        # the stage's own epochs name the stage ("detector epoch 3 of 10"), else the stage
                        "job": " · ".join(x for x in (job.state, jobprogress.epoch_text(job) or job.stage) if x)
                        if job else ""})
    return {"projects": out, "now": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


class _Thumbs:
    """Bounded LRU of thumbnail bytes by (project, task)."""

    def __init__(self, size: int):
        self.size, self.d, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.d:
                self.d.move_to_end(key)
                return self.d[key]
        return None

    def put(self, key, value):
        with self.lock:
            self.d[key] = value
            self.d.move_to_end(key)
            while len(self.d) > self.size:
                self.d.popitem(last=False)


#: Image file names of tasks by (project, task), for the error rows (:func:`task_file_names`).
_file_names = _Thumbs(4096)


def thumbnail(settings: Settings, pid: int, task_id: int) -> bytes:
    """JPEG thumbnail of a task's image (longest side :data:`THUMB_SIDE` pixels).

    The task is read from Label Studio (``tasks.get``) and must belong to project ``pid``; the
    image URL is the task data's value under the project's Image ``value`` key.
    Raises: HTTPException 404 (no such task in the project, no image URL), 502 (image unreadable:
    :class:`backend.images.ImageError`'s message; Label Studio unreachable).
    """
    from PIL import Image

    from backend.images import ImageError, load_image, ls_client

    with session_scope(settings.database_url) as s:
        proj = s.get(Project, pid)
        if proj is None:
            raise HTTPException(404, f"project {pid} is not set up in faceloop")
        config, ls_url = proj.label_config, proj.ls_url
    try:
        client = ls_client(settings, ls_url)
        task = client.tasks.get(id=task_id)
    except ImageError as e:
        raise HTTPException(502, str(e))
    except Exception as e:  # SDK ApiError (404 for an unknown task), connection errors
        code = getattr(e, "status_code", None)
        if code == 404:
            raise HTTPException(404, f"task {task_id} not found in Label Studio")
        raise HTTPException(502, f"could not read task {task_id} from Label Studio: {e.__class__.__name__}")
    if int(getattr(task, "project", None) or 0) != pid:
        raise HTTPException(404, f"task {task_id} is not in project {pid}")
    url = _image_url(task, config)
    if not url:
        raise HTTPException(404, f"task {task_id} has no image URL")
    try:
        img = load_image(url, settings, ls_url)
    except ImageError as e:
        raise HTTPException(502, str(e))
    im = Image.fromarray(img.array)
    im.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


#: Cookie that carries a project's status token to the page's images (path-scoped to the project's page).
TOKEN_COOKIE = "faceloop_status"


def token_key(settings: Settings) -> str:
    """The secret status tokens derive from: ``WEBHOOK_SECRET``, else ``BASIC_AUTH_PASS``; "" (no
    tokens) when neither is set (then the backend's own rule applies: loopback clients only)."""
    return settings.webhook_secret or settings.basic_auth_pass or ""


def status_token(key: str, project_id: int) -> str:
    """Read-only token of one project's status page: HMAC-SHA256(key, "faceloop-status-v1:<id>"),
    first 32 hex digits (128 bits). Raises: ValueError for an empty key."""
    import hashlib
    import hmac

    if not key:
        raise ValueError("no key: set WEBHOOK_SECRET or BASIC_AUTH_PASS to link the status page with a token")
    return hmac.new(key.encode(), f"faceloop-status-v1:{int(project_id)}".encode(), hashlib.sha256).hexdigest()[:32]


def status_link(backend_url: str, project_id: int, key: str = "") -> str:
    """The URL of a project's status page for a person's browser: ``<backend_url>/status/<id>``,
    with ``?token=`` (:func:`status_token`) when ``key`` is given, so that one click opens it
    without a password prompt. ``key`` must be the backend's :func:`token_key`."""
    url = f"{backend_url.rstrip('/')}/status/{int(project_id)}"
    return f"{url}?token={status_token(key, project_id)}" if key else url


def make_router(settings: Settings, require_auth) -> APIRouter:
    """The status routes. ``/status`` is behind ``require_auth`` (the app's auth dependency); a
    project's page, plots and thumbnails also open with that project's token (:func:`status_token`)
    in ``?token=`` or in the cookie the page sets (read-only, one project)."""
    import secrets

    router = APIRouter()
    thumbs = _Thumbs(THUMB_CACHE)
    key = token_key(settings)

    async def project_auth(request: Request, project_id: Id):
        given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        if key and given and secrets.compare_digest(given.encode("utf-8", "surrogateescape"),
                                                    status_token(key, project_id).encode()):
            request.state.status_token = given
            return
        await require_auth(request)
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                                          "frame-ancestors 'none'"}

    @router.get("/status", response_class=HTMLResponse, dependencies=[Depends(require_auth)])
    def status_index():
        return HTMLResponse(_env.get_template("status_index.html").render(**index_context(settings)),
                            headers=headers)

    @router.get("/status/{project_id}", response_class=HTMLResponse, dependencies=[Depends(project_auth)])
    def status_project(project_id: Id, request: Request):
        try:
            t = acceptance.refresh_in_background(settings, project_id)
            if t is not None:  # a small project is recounted before the page is drawn
                t.join(ACCEPTANCE_WAIT_S)
        except Exception as e:  # the page still shows the stored counts
            log.warning("acceptance refresh of project %s not started: %s", project_id, e)
        ctx = project_context(settings, project_id)
        token = getattr(request.state, "status_token", None)
        # opened with the project's token: the index (all projects) will ask for the backend's password
        ctx["index_needs_password"] = bool(token)
        resp = HTMLResponse(_env.get_template("status_project.html").render(**ctx), headers=headers)
        if token and request.query_params.get("token"):  # the page's images and reloads carry it
            resp.set_cookie(TOKEN_COOKIE, token, path=request.url.path, httponly=True, samesite="lax",
                            secure=request.url.scheme == "https", max_age=7 * 24 * 3600)
        return resp

    @router.get("/status/{project_id}/versions/{version_id}/plots/{k}", dependencies=[Depends(project_auth)])
    def status_plot(project_id: Id, version_id: Id, k: Index):
        with session_scope(settings.database_url) as s:
            v = s.get(ModelVersion, version_id)
            if v is None or v.project_id != project_id:
                raise HTTPException(404, f"project {project_id} has no model version {version_id}")
        path = plot_path(settings, v, k)
        media = PLOT_IMAGES.get(path.suffix.lower()) or PLOT_DOWNLOADS[path.suffix.lower()]
        extra = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
        if path.suffix.lower() in PLOT_DOWNLOADS:
            return FileResponse(path, media_type=media, filename=f"{v.version}_{path.name}", headers=extra)
        return FileResponse(path, media_type=media, headers=extra)

    @router.get("/status/{project_id}/tasks/{task_id}/thumb.jpg", dependencies=[Depends(project_auth)])
    async def status_thumb(project_id: Id, task_id: Id):
        key = (project_id, task_id)
        data = thumbs.get(key)
        if data is None:
            data = await run_in_threadpool(thumbnail, settings, project_id, task_id)
            thumbs.put(key, data)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})

    return router
