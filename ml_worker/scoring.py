"""The score and queue stations: score the unlabelled pool, write predictions, refresh the view.

After a promotion (and for new tasks), every unlabelled task is predicted with the promoted
version; each gets a :class:`backend.models.TaskScore` (all measures) and a Label Studio
prediction; the project's ``model_version`` is pointed at that version and the *Review queue* view
(unlabelled, lowest score first) is refreshed. The review queue is the query batch (the sampler's
picks) first, then the other tasks by uncertainty (:func:`batch_ahead`); Label Studio's task score
carries that order (:func:`ls_task_score`: the batch below 0.001, every other task ``1 -
uncertainty`` squeezed into 0.001-1), so *Label All Tasks* serves the batch first. Ties of
uncertainty (every task at day 0, when the project's classes are unknown) are ordered by diversity
over the image embeddings (:func:`ml_worker.sampler.queue_order`), and Label Studio's score gets an
offset below 1e-6 that keeps that order in its view (:func:`tie_offsets`).

The writes to Label Studio go through the outbox (:mod:`ml_worker.outbox`): they are stored with
the scores in one transaction and delivered until Label Studio acknowledges them, so a Label
Studio outage during write-back delays the predictions but loses none.
"""

from __future__ import annotations

import logging
import math
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
from backend.lsapi import snapshot
from backend.models import ModelVersion, Project, TaskScore, utcnow
from backend.predict import predict_tasks, to_ls_prediction
from ml_worker.outbox import deliver, enqueue_write_back, pending_writes
from ml_worker.sampler import DEFAULT_QUERY_STRATEGY, TIE_DECIMALS, USES_LABELLED, queue_order
from ml_worker.sampler import select as select_batch

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
    pending_writes: int = 0


def read_pool(settings: Settings, project_id: int, task_ids: list[int] | None = None) -> dict:
    """Step 1 of a scoring: what to score, read once from the database and Label Studio.

    Args:
        project_id: Label Studio project id.
        task_ids: only these tasks (new tasks); default every unlabelled task.
    Returns: the plan, a JSON-serialisable dict (it travels in Celery messages):
        ``project_id``, ``version`` (the promoted version's name, fixed for the whole run),
        ``ls_url``, ``label_config``, ``measure`` (the uncertainty measure), ``todo`` (``[{"id",
        "data"}]``: the tasks to score, the unlabelled ones first), ``n_unlabelled`` (how many of
        ``todo`` are unlabelled; the rest are labelled tasks that strategies of
        :data:`ml_worker.sampler.USES_LABELLED` embed), ``pool`` (ids of every unlabelled task),
        ``existing`` (ids of tasks to score that already hold a prediction of ``version``),
        ``has_version`` (some task holds one), ``partial`` (``task_ids`` was given).
    Raises: Label Studio errors while reading the project or its tasks (nothing is stored then).
    """
    with session_scope(settings.database_url) as s:
        proj = s.get(Project, project_id) or registry.upsert_project(s, project_id)
        ls_url = proj.ls_url or settings.label_studio_url
        vname = registry.promoted_version(s, project_id, settings).version
    client = ls_client(settings, ls_url)
    config = client.projects.get(id=project_id).label_config
    everything = snapshot(client, project_id)
    tasks = [t for t in everything if t.result is None]
    if task_ids is not None:
        wanted = set(task_ids)
        tasks = [t for t in tasks if t.id in wanted]
    strategy = settings.query_strategy or DEFAULT_QUERY_STRATEGY
    # strategies that place the batch relative to what is labelled need the labelled images too
    labelled = [t for t in everything if t.result is not None] if strategy in USES_LABELLED else []
    return {"project_id": project_id, "version": vname, "ls_url": ls_url, "label_config": config,
            "measure": settings.uncertainty_measure,
            "todo": [{"id": t.id, "data": t.data} for t in tasks + labelled], "n_unlabelled": len(tasks),
            "pool": [t.id for t in everything if t.result is None],
            "existing": [t.id for t in tasks if vname in t.prediction_versions],
            "has_version": any(vname in t.prediction_versions for t in everything), "partial": task_ids is not None}


def _version_model(settings: Settings, project_id: int, version: str, model_cache=None):
    """The loaded model of ``version`` (by name: the one the plan fixed, even if another was
    promoted since), materialised from the model store. Raises LookupError for an unknown version."""
    import modelstore
    from facemodels.detector import ModelCache

    with session_scope(settings.database_url) as s:
        v = s.exec(select(ModelVersion).where(ModelVersion.project_id == project_id,
                                              ModelVersion.version == version)).first()
        if v is None:
            raise LookupError(f"project {project_id} has no model version {version!r}")
        s.expunge(v)
    return (model_cache or ModelCache(settings.device)).get(modelstore.model_path(settings, v))


def score_chunk(settings: Settings, plan: dict, tasks: list[dict], model_cache=None) -> list[dict]:
    """Step 2 of a scoring: predict one chunk of the plan's tasks, into plain results.

    Pure: it writes nothing (a chunk run twice, e.g. redelivered after its worker died, gives the
    same results). Forward batches of :data:`SCORE_CHUNK` tasks.

    Args:
        plan: from :func:`read_pool` (``todo`` is not needed here).
        tasks: ``[{"id", "data"}]``, a slice of ``plan["todo"]``.
    Returns: one JSON-serialisable dict per task, in order: ``task_id``, ``error`` (None, or why
        the image failed), ``uncertainty`` (``{"least_confidence", "margin", "entropy"}`` 0-1 and
        ``n_boxes``; None on error), ``embedding`` (list of floats or None) and ``prediction``
        (the Label Studio prediction dict of :func:`backend.predict.to_ls_prediction`; None on error).
    Raises: LookupError (unknown version), model store errors; a bad image never raises.
    """
    model = _version_model(settings, plan["project_id"], plan["version"], model_cache)
    schema = ProjectSchema.parse(plan["label_config"])
    out = []
    for i in range(0, len(tasks), SCORE_CHUNK):
        for p in predict_tasks(tasks[i : i + SCORE_CHUNK], schema, model, settings, ls_url=plan["ls_url"], embed=True):
            ok = p.error is None
            u = p.uncertainty
            out.append({
                "task_id": p.task_id, "error": p.error,
                "uncertainty": {"least_confidence": float(u.least_confidence), "margin": float(u.margin),
                                "entropy": float(u.entropy), "n_boxes": int(u.n_boxes)} if ok else None,
                "embedding": [float(x) for x in np.asarray(p.embedding).ravel()] if ok and p.embedding is not None
                else None,
                "prediction": to_ls_prediction(p, schema, plan["version"], plan["measure"]) if ok else None})
    return out


def finish_scoring(settings: Settings, plan: dict, results: list[dict], run_id: int | None = None,
                   t0: float | None = None) -> ScoreOutcome:
    """Step 3 of a scoring: store the scores, rank the queue, write back to Label Studio once.

    Writes a :class:`backend.models.TaskScore` per scored task, chooses the query batch
    (``settings.query_strategy``; diversity over the embeddings), ranks the review queue
    (:func:`rerank`) and queues the write-back through the outbox in the same transaction, then
    tries to deliver it. Idempotent: run again with the same results it leaves the same rows.

    Args:
        plan: from :func:`read_pool`; without ``todo`` it needs ``todo_ids`` (the ids of ``todo``).
        results: :func:`score_chunk`'s results for the whole of ``plan["todo"]``, in its order
            (the chunks' results concatenated).
        run_id: the :class:`backend.models.ScoringRun` this is; its outbox rows name it.
        t0: when the run started (Unix seconds), for ``seconds``.
    Returns: :class:`ScoreOutcome` (see :func:`score_pool`).
    Raises: ValueError when ``results`` do not match ``plan["todo"]`` (nothing is stored then).
    """
    t0 = time.time() if t0 is None else t0
    project_id, vname, measure = plan["project_id"], plan["version"], plan["measure"]
    want = [t["id"] for t in plan["todo"]] if "todo" in plan else plan["todo_ids"]
    got = [r["task_id"] for r in results]
    if got != want:
        raise ValueError(f"scoring results for {len(got)} tasks do not match the plan's {len(want)} tasks")
    n = plan["n_unlabelled"]
    preds = results[:n]
    lab_emb = [np.asarray(r["embedding"]) for r in results[n:] if r["error"] is None and r["embedding"] is not None]
    good = [p for p in preds if p["error"] is None]

    def unc_of(p, m):
        v = p["uncertainty"].get(m)
        return float("nan") if v is None else v

    strategy = settings.query_strategy or DEFAULT_QUERY_STRATEGY
    unc = {m: np.array([unc_of(p, m) for p in good]) for m in ("least_confidence", "margin", "entropy")}
    batch: list[int] = []
    order: list[int] = []  # task ids in review-queue order (ties of uncertainty broken by diversity)
    if good:
        dim = next((len(p["embedding"]) for p in good if p["embedding"] is not None), 1)
        emb = np.stack([np.asarray(p["embedding"]) if p["embedding"] is not None else np.zeros(dim) for p in good])
        picks = pick_rounds(strategy, unc, settings.query_batch_size, settings.query_batch_rounds, emb,
                            np.random.default_rng(settings.seed), np.stack(lab_emb) if lab_emb else None)
        batch = [good[i]["task_id"] for i in picks]
        order = [good[i]["task_id"] for i in queue_order(np.array([_unit(unc_of(p, measure)) for p in good]), emb)]
        if not plan["partial"]:
            order = batch_ahead(order, batch)
    with session_scope(settings.database_url) as s:
        for p in preds:
            row = s.exec(select(TaskScore).where(TaskScore.project_id == project_id,
                                                 TaskScore.task_id == p["task_id"],
                                                 TaskScore.model_version == vname)).first()
            if row is None:
                row = TaskScore(project_id=project_id, task_id=p["task_id"], model_version=vname, uncertainty=1.0,
                                least_confidence=1.0, margin=1.0, entropy=1.0)
                s.add(row)
            if p["error"] is None:
                u = p["uncertainty"]
                row.uncertainty, row.least_confidence, row.margin, row.entropy = (
                    _unit(u.get(measure)), _unit(u["least_confidence"]), _unit(u["margin"]), _unit(u["entropy"]))
                row.n_boxes, row.error = u["n_boxes"], ""
            else:
                row.error = p["error"]
            row.scored_at = utcnow()
        s.flush()
        batch = rerank(s, project_id, vname, set(plan["pool"]), settings.query_batch_size * settings.query_batch_rounds,
                       picks=None if plan["partial"] else batch, order=order)
        existing = set(plan["existing"])
        in_batch = set(batch)
        rest = [t for t in order if t not in in_batch]
        tie_break = tie_offsets(rest, {p["task_id"]: _unit(unc_of(p, measure)) for p in good})
        payload = []
        for p in good:
            if p["task_id"] in existing:
                continue
            d = p["prediction"]
            score = ls_task_score(d["score"], p["task_id"], batch, tie_break.get(p["task_id"], 0.0))
            payload.append({"task": p["task_id"], "model_version": vname, "score": score, "result": d["result"]})
        # Label Studio refuses a project model_version no prediction has (400): set it only when one will
        has_predictions = bool(payload) or plan["has_version"]
        enqueue_write_back(s, project_id, vname, payload, settings.review_view_title, run_id=run_id,
                           set_version=has_predictions)
    # the scores and the writes are committed together; now try to deliver (the recovery pass retries)
    stats = deliver(settings, project_id)
    pending = len(pending_writes(settings, project_id))
    if pending:
        log.warning("project %s: %d Label Studio writes pending (retried every RECOVERY_INTERVAL_S)", project_id,
                    pending)
    for p in preds:
        if p["error"]:
            log.warning("project %s task %s not scored: %s", project_id, p["task_id"], p["error"])
    return ScoreOutcome(vname, len(good), stats["acknowledged"], len(preds) - len(good), round(time.time() - t0, 2),
                        batch, pending)


def chunks_of(plan: dict, size: int) -> list[list[dict]]:
    """The plan's ``todo`` cut into chunks of ``size`` tasks (the last one shorter); one chunk
    when ``size`` is 0 or the pool is no larger."""
    todo = plan["todo"]
    if size <= 0 or len(todo) <= size:
        return [todo]
    return [todo[i : i + size] for i in range(0, len(todo), size)]


def score_plan(settings: Settings, plan: dict, progress: Callable[[int, int], None] | None = None,
               model_cache=None, run_id: int | None = None, t0: float | None = None) -> ScoreOutcome:
    """Steps 2 and 3 in this process: score the plan's tasks :data:`SCORE_CHUNK` at a time, then
    :func:`finish_scoring`. ``progress`` is called with ``(done, total)`` after each chunk."""
    from facemodels.detector import ModelCache

    cache = model_cache or ModelCache(settings.device)
    todo, results = plan["todo"], []
    for i in range(0, len(todo), SCORE_CHUNK):
        results.extend(score_chunk(settings, plan, todo[i : i + SCORE_CHUNK], cache))
        if progress:
            progress(min(i + SCORE_CHUNK, len(todo)), len(todo))
    return finish_scoring(settings, plan, results, run_id=run_id, t0=t0)


def score_pool(settings: Settings, project_id: int, task_ids: list[int] | None = None,
               progress: Callable[[int, int], None] | None = None, model_cache=None,
               run_id: int | None = None) -> ScoreOutcome:
    """Score unlabelled tasks with the promoted version and queue them for review, in this process
    (:func:`read_pool`, :func:`score_chunk` per :data:`SCORE_CHUNK` tasks, :func:`finish_scoring`;
    ``faceloop.score`` spreads the chunks of a large pool over the workers instead).

    The query batch is chosen by ``settings.query_strategy`` (default
    :data:`ml_worker.sampler.DEFAULT_QUERY_STRATEGY`); strategies that use the labelled images
    (``typiclust``, ``diverse_*``) also embed the labelled tasks with the same model.

    Args:
        project_id: Label Studio project id.
        task_ids: only these tasks (new tasks); default every unlabelled task.
        progress: called with ``(done, total)`` after each chunk.
        run_id: the :class:`backend.models.ScoringRun` this is; its outbox rows name it.
    Returns: :class:`ScoreOutcome`. Tasks whose image fails are counted in ``failed`` (their
        TaskScore row keeps the error) and never stop the others. ``written`` counts the
        predictions Label Studio acknowledged now; ``pending_writes`` the outbox rows not yet
        delivered (Label Studio unreachable: the recovery pass retries them).
    Raises: Label Studio errors while reading the project or its tasks (nothing is stored then).
    """
    t0 = time.time()
    plan = read_pool(settings, project_id, task_ids)
    return score_plan(settings, plan, progress=progress, model_cache=model_cache, run_id=run_id, t0=t0)


def _unit(x) -> float:
    """An uncertainty as a float in 0-1; NaN/None (unknown) counts as 1, as in the sampler."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 1.0
    return 1.0 if math.isnan(x) else min(max(x, 0.0), 1.0)


def pick_rounds(strategy: str, uncertainty: dict[str, np.ndarray], k: int, rounds: int, embeddings: np.ndarray,
                rng: np.random.Generator, labelled: np.ndarray | None = None) -> list[int]:
    """The query batch: ``rounds`` rounds of ``k`` picks by ``strategy``, each chosen as if the
    rounds before it were labelled (their embeddings join ``labelled``; greedy batch selection).

    Why: after the query batch Label Studio serves the rest of the queue, the most uncertain first,
    the order measured worst (``docs/benchmarks.md``, "Which images a person labels"). A person
    reaches it when a retrain is rejected (no new scoring, so no new batch: found in a new user's
    trial after 50 labels) or takes longer than the batch. The first round is exactly the
    ``k``-pick that was measured (``faceloop bench-accept --query-batch``); the later ones continue
    it.

    Args:
        uncertainty: ``{measure: (n,) 0-1}`` of the unlabelled images.
        k: picks per round (``QUERY_BATCH_SIZE``); ``rounds``: ``QUERY_BATCH_ROUNDS``.
        embeddings: ``(n, d)`` of the unlabelled images; ``labelled``: ``(m, d)`` or None.
    Returns: at most ``k * rounds`` distinct indices into the ``n`` images, round by round, each
        round in pick order.
    Raises: ValueError from :func:`ml_worker.sampler.select` (unknown strategy, bad shapes).
    """
    n = len(embeddings)
    picks: list[int] = []
    for _ in range(rounds):
        taken = set(picks)
        free = np.array([i for i in range(n) if i not in taken], dtype=int)
        if not len(free) or k <= 0:
            break
        lab = embeddings[picks] if picks else None
        if labelled is not None and len(labelled):
            lab = labelled if lab is None else np.vstack([labelled, lab])
        got = select_batch(strategy, {m: np.asarray(v)[free] for m, v in uncertainty.items()}, k,
                           embeddings=embeddings[free], rng=rng, labelled_embeddings=lab)
        picks += [int(free[i]) for i in got]
    return picks


#: Label Studio task scores below this are the query batch's: :func:`ls_task_score` writes the
#: batch's j-th of b tasks as ``BATCH_SHOWN_ZERO * j / b`` and squeezes every other task's score
#: into ``[BATCH_SCORE_SPAN, 1]``, so that Label Studio serves the query batch first.
BATCH_SCORE_SPAN = 1e-3
#: Upper bound of the batch's scores: below 0.0005, so that the Data Manager's three decimals show
#: 0.000 for every batch task and at least 0.001 for the first task after it (at 0.001 · j/b, a
#: new user's trial saw both read "0.001" and could not tell where the batch ended).
BATCH_SHOWN_ZERO = 4e-4


def batch_ahead(order: list[int], batch: list[int]) -> list[int]:
    """The review queue: the query batch's tasks first, in the sampler's pick order, then the rest
    of ``order`` (uncertainty, ties by diversity) unchanged.

    Why: *Label All Tasks* serves the review queue (Label Studio's *Uncertainty sampling*). When
    the queue was uncertainty order with the batch first only among ties, a person was served the
    batch at day 0 (every task ties) and the ``margin`` top of the pool after every retrain: the
    order that measured worst of four (``docs/benchmarks.md``, "Which images a person labels":
    0.728 of faces accepted as is at 40 labels against 0.819 for ``typiclust``'s batches and
    0.787 for random picks, awake_sleep, seeds 0-2/0-4).

    Args:
        order: task ids in queue order (uncertainty not increasing).
        batch: the query batch's task ids, in pick order (ids not in ``order`` are ignored).
    Returns: the task ids of ``order``, reordered.
    """
    known = set(order)
    head = [t for t in dict.fromkeys(batch) if t in known]
    flagged = set(head)
    return head + [t for t in order if t not in flagged]


def ls_task_score(score: float, task_id: int, batch: list[int], tie_offset: float = 0.0) -> float:
    """The task score written to Label Studio, whose ascending order is faceloop's review queue.

    Label Studio orders the Review queue and serves *Label All Tasks* by one number, the
    prediction's task ``score`` (protocol doc; ``projects/functions/next_task.py``, lowest first).
    The query batch's j-th of b tasks is written as ``BATCH_SHOWN_ZERO * j / b`` (below 0.0005,
    shown as 0.000); any other task as
    ``BATCH_SCORE_SPAN + (1 - BATCH_SCORE_SPAN) * (score + tie_offset)``: its ``1 - uncertainty``
    moved by at most 0.001, order kept. The boxes keep their own scores, and the database keeps
    every task's real uncertainty (status page, ``faceloop queue``).

    Args:
        score: the prediction's ``1 - uncertainty``, 0-1 (:func:`backend.predict.to_ls_prediction`).
        task_id: the task.
        batch: the query batch's task ids, in pick order.
        tie_offset: from :func:`tie_offsets` (below 1e-6).
    Returns: the score, 0-1, rounded to 9 decimals.
    """
    if task_id in batch:
        return round(BATCH_SHOWN_ZERO * batch.index(task_id) / len(batch), 9)
    return round(BATCH_SCORE_SPAN + (1.0 - BATCH_SCORE_SPAN) * max(score + tie_offset, 0.0), 9)


def tie_offsets(order: list[int], uncertainty: dict[int, float]) -> dict[int, float]:
    """What to add to the Label Studio score (``1 - uncertainty``) of each task so that Label
    Studio's Review queue (one ordering column: ascending prediction score) shows ties of
    uncertainty in faceloop's order (:func:`ml_worker.sampler.queue_order`), not in id order.

    Args:
        order: task ids in queue order.
        uncertainty: ``{task id: uncertainty 0-1}``.
    Returns: ``{task id: offset}``: the j-th of a group of g equal uncertainties (to
        :data:`ml_worker.sampler.TIE_DECIMALS` decimals) gets ``10**-TIE_DECIMALS * j / g``,
        below the smallest step between two different rounded uncertainties, so the order of
        different uncertainties never changes and a score moves by less than 1e-6.
    """
    step = 10.0 ** -TIE_DECIMALS
    groups: dict[float, list[int]] = {}
    for t in order:
        groups.setdefault(round(uncertainty[t], TIE_DECIMALS), []).append(t)
    return {t: step * j / len(g) for g in groups.values() for j, t in enumerate(g)}


def rerank(s, project_id: int, version: str, pool: set[int], batch_size: int,
           picks: list[int] | None = None, order: list[int] | None = None) -> list[int]:
    """Rank every scored pool task of ``version`` and flag exactly one query batch (issue 9 §6).

    Rows of tasks no longer in the pool (labelled or deleted since) are removed. Scored rows get
    ``rank`` 0..n-1: the query batch first, in pick order (:func:`batch_ahead`: what Label Studio
    serves first), then the others by uncertainty, highest first. Without ``order``, ties go by task id. With
    ``order`` (the tasks just scored, in :func:`ml_worker.sampler.queue_order`: ties by
    diversity), ties (to :data:`ml_worker.sampler.TIE_DECIMALS` decimals) keep the earlier rank
    of rows not just scored, then follow ``order``. Rows whose image failed come after them.
    ``in_query_batch`` is set on exactly ``min(batch_size, n)`` rows: ``picks`` (the sampler's
    choice over the whole pool) when given, else the rows flagged before that are still in the
    pool; either is cut to ``batch_size`` and topped up with the most uncertain unflagged rows.

    Args:
        pool: ids of the project's unlabelled tasks now.
        picks: task ids, most informative first; None keeps the current batch (a partial scoring).
        order: the tasks just scored, in queue order (None: ties by task id).
    Returns: the batch's task ids, in pick order then rank order.
    """
    rows = s.exec(select(TaskScore).where(TaskScore.project_id == project_id, TaskScore.model_version == version)).all()
    for r in rows:
        if r.task_id not in pool:
            s.delete(r)
    rows = [r for r in rows if r.task_id in pool]
    if order is None:
        good = sorted((r for r in rows if not r.error), key=lambda r: (-_unit(r.uncertainty), r.task_id))
    else:
        pos = {t: i for i, t in enumerate(order)}
        good = sorted((r for r in rows if not r.error),
                      key=lambda r: (-round(_unit(r.uncertainty), TIE_DECIMALS), r.task_id in pos,
                                     pos.get(r.task_id, r.rank or 0), r.task_id))
    bad = sorted((r for r in rows if r.error), key=lambda r: r.task_id)
    ok = {r.task_id for r in good}
    chosen = picks if picks is not None else [r.task_id for r in sorted(good, key=lambda r: (r.rank is None, r.rank or 0))
                                              if r.in_query_batch]
    batch = list(dict.fromkeys(t for t in chosen if t in ok))[:batch_size]
    for r in good:
        if len(batch) >= batch_size:
            break
        if r.task_id not in batch:
            batch.append(r.task_id)
    flagged = set(batch)
    by_id = {r.task_id: r for r in good}
    # the review queue: the query batch first (what Label Studio serves first, batch_ahead), then the rest
    queue = [by_id[t] for t in batch] + [r for r in good if r.task_id not in flagged]
    for i, r in enumerate(queue + bad):
        r.rank = i
    for r in rows:
        r.in_query_batch = r.task_id in flagged
    s.flush()
    return batch
