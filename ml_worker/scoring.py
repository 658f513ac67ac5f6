"""The score and queue stations: score the unlabelled pool, write predictions, refresh the view.

After a promotion (and for new tasks), every unlabelled task is predicted with the promoted
version; each gets a :class:`backend.models.TaskScore` (all measures) and a Label Studio
prediction with ``score = 1 - uncertainty``; the project's ``model_version`` is pointed at that
version and the *Review queue* view (unlabelled, lowest score first) is refreshed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sqlmodel import select

from backend import registry
from backend.config import Settings
from backend.db import session_scope
from backend.images import ls_client
from backend.labels import ProjectSchema
from backend.lsapi import refresh_review_view, set_project_model_version, snapshot, write_predictions
from backend.models import Project, TaskScore
from backend.predict import predict_tasks, to_ls_prediction
from ml_worker.sampler import DEFAULT_QUERY_STRATEGY, USES_LABELLED, select as select_batch

log = logging.getLogger("faceloop.scoring")

#: Tasks predicted per forward batch while scoring the pool.
SCORE_CHUNK = 32


@dataclass
class ScoreOutcome:
    """What :func:`score_pool` did: tasks scored, predictions written, failures, timing."""

    model_version: str
    scored: int
    written: int
    failed: int
    seconds: float
    query_batch: list[int]


def score_pool(settings: Settings, project_id: int, task_ids: list[int] | None = None,
               progress: Callable[[int, int], None] | None = None, model_cache=None) -> ScoreOutcome:
    """Score unlabelled tasks with the promoted version and queue them for review.

    The query batch is chosen by ``settings.query_strategy`` (default
    :data:`ml_worker.sampler.DEFAULT_QUERY_STRATEGY`); strategies that use the labelled images
    (``typiclust``, ``diverse_*``) also embed the labelled tasks with the same model.

    Args:
        project_id: Label Studio project id.
        task_ids: only these tasks (new tasks); default every unlabelled task.
        progress: called with ``(done, total)`` after each chunk.
    Returns: :class:`ScoreOutcome`. Tasks whose image fails are counted in ``failed`` (their
        TaskScore row keeps the error) and never stop the others.
    """
    from backend.yolo import ModelCache

    t0 = time.time()
    with session_scope(settings.database_url) as s:
        proj = s.get(Project, project_id) or registry.upsert_project(s, project_id)
        ls_url = proj.ls_url or settings.label_studio_url
        version = registry.promoted_version(s, project_id, settings)
        vname, vpath = version.version, version.path
    client = ls_client(settings, ls_url)
    config = client.projects.get(id=project_id).label_config
    schema = ProjectSchema.parse(config)
    everything = snapshot(client, project_id)
    tasks = [t for t in everything if t.result is None]
    if task_ids is not None:
        wanted = set(task_ids)
        tasks = [t for t in tasks if t.id in wanted]
    model = (model_cache or ModelCache(settings.device)).get(vpath)
    strategy = settings.query_strategy or DEFAULT_QUERY_STRATEGY
    # strategies that place the batch relative to what is labelled need the labelled images too
    labelled = [t for t in everything if t.result is not None] if strategy in USES_LABELLED else []
    todo = tasks + labelled
    preds = []
    for i in range(0, len(todo), SCORE_CHUNK):
        chunk = todo[i : i + SCORE_CHUNK]
        preds.extend(predict_tasks([{"id": t.id, "data": t.data} for t in chunk], schema, model, settings,
                                   ls_url=ls_url, embed=True))
        if progress:
            progress(min(i + SCORE_CHUNK, len(todo)), len(todo))
    lab_emb = [p.embedding for p in preds[len(tasks):] if p.error is None and p.embedding is not None]
    preds = preds[: len(tasks)]
    good = [p for p in preds if p.error is None]
    measure = settings.uncertainty_measure
    unc = {m: np.array([p.uncertainty.get(m) for p in good]) for m in ("least_confidence", "margin", "entropy")}
    order = sorted(range(len(good)), key=lambda i: (-unc[measure][i], good[i].task_id))
    rank = {good[i].task_id: r for r, i in enumerate(order)}
    batch: list[int] = []
    if good:
        dim = next((len(p.embedding) for p in good if p.embedding is not None), 1)
        emb = np.stack([p.embedding if p.embedding is not None else np.zeros(dim) for p in good])
        picks = select_batch(strategy, unc, settings.query_batch_size, embeddings=emb,
                             rng=np.random.default_rng(settings.seed),
                             labelled_embeddings=np.stack(lab_emb) if lab_emb else None)
        batch = [good[i].task_id for i in picks]
    with session_scope(settings.database_url) as s:
        for p in preds:
            row = s.exec(select(TaskScore).where(TaskScore.project_id == project_id, TaskScore.task_id == p.task_id,
                                                 TaskScore.model_version == vname)).first()
            if row is None:
                row = TaskScore(project_id=project_id, task_id=p.task_id, model_version=vname, uncertainty=1.0,
                                least_confidence=1.0, margin=1.0, entropy=1.0)
                s.add(row)
            if p.error is None:
                u = p.uncertainty
                row.uncertainty, row.least_confidence, row.margin, row.entropy = (
                    u.get(measure), u.least_confidence, u.margin, u.entropy)
                row.n_boxes, row.rank, row.error = u.n_boxes, rank[p.task_id], ""
                row.in_query_batch = p.task_id in batch
            else:
                row.error = p.error
    existing = {t.id for t in tasks if vname in t.prediction_versions}
    payload = []
    for p in good:
        if p.task_id in existing:
            continue
        d = to_ls_prediction(p, schema, vname, measure)
        payload.append({"task": p.task_id, "model_version": vname, "score": d["score"], "result": d["result"]})
    written = write_predictions(client, project_id, payload) if payload else 0
    set_project_model_version(client, project_id, vname)
    refresh_review_view(client, project_id, settings.review_view_title)
    for p in preds:
        if p.error:
            log.warning("project %s task %s not scored: %s", project_id, p.task_id, p.error)
    return ScoreOutcome(vname, len(good), written, len(preds) - len(good), round(time.time() - t0, 2), batch)
