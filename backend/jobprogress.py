"""Per-stage progress of a training job, and the time left the status page shows.

A retrain runs stages of very different pace: ``train detector`` (YOLO epochs, seconds each on a
CPU), ``train classifier`` (small-CNN epochs, ~10x shorter), ``evaluate``, and, when the gate
promotes the candidate, ``refine classifier`` (docs/training.md). One rate over the job's combined
``epoch``/``epochs`` therefore ran long (a person saw "about 2 min 49 s left" with ~36 s left).

The worker records each stage in ``TrainingJob.stages_json`` (:func:`record`): the plan (stage,
epochs, condition) when training starts, then, as progress arrives, when the stage started, when
its first and latest epochs ended, and when it ended. :func:`estimate` then gives

- the current stage's time left, from its own epochs (seconds per epoch between the first and the
  latest epoch end, so the stage's setup is not counted as an epoch; from the first epoch alone,
  setup included, when only one has ended);
- each later stage's time from the same stage of the project's previous succeeded job, scaled by
  the number of labelled images (train + validation; an epoch's work grows with them), per epoch
  when the epoch counts differ;
- on a job without a previous one, the ``evaluate`` stage from this job's own measure: the
  retrained detector's run on the labelled images (``predict_seconds`` for ``predict_images``,
  recorded with ``train detector``) per image, times the validation images, times the two versions
  evaluated (:func:`evaluate_estimate`);
- "not known" (None) for any part it cannot measure, never a guess from another stage's pace.

Times are seconds; datetimes are UTC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

#: Fields of a progress report that belong to the stage record, not to the job row.
STAGE_FIELDS = ("stage_epoch", "stage_epochs", "plan", "predict_seconds", "predict_images")
#: Versions the ``evaluate`` stage runs on the validation images (the candidate and the current one).
EVALUATED_VERSIONS = 2


def _iso(t: datetime) -> str:
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat()


def _time(s) -> datetime | None:
    if not s:
        return None
    try:
        t = datetime.fromisoformat(str(s))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def record(job, fields: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """Note a progress report in ``job.stages_json``; returns the fields that are job columns.

    Args:
        job: a :class:`backend.models.TrainingJob` (changed in place; the caller commits).
        fields: the report: job columns (``stage``, ``epoch``, ``epochs``, ``message``...) and
            ``plan`` (``[{"stage", "epochs", "if"?}]``: the stages to come, in order; ``"if":
            "promoted"`` for one that runs only when the gate promotes the candidate),
            ``stage_epoch``/``stage_epochs`` (epoch k of n of the current stage, 1-based).
    A new ``stage`` ends the running one and starts (or appends) its record.
    """
    now = now or datetime.now(timezone.utc)
    stages = job.stages
    plan = fields.get("plan")
    if plan:
        known = {s["stage"] for s in stages}
        for p in plan:
            if p["stage"] not in known:
                stages.append({"stage": p["stage"], "epochs": int(p.get("epochs") or 0), "epoch": 0, "planned": True,
                               **({"if": p["if"]} if p.get("if") else {})})
    stage = fields.get("stage")
    cur = next((s for s in reversed(stages) if s.get("start") and not s.get("end")), None)
    if stage and (cur is None or cur["stage"] != stage):
        if cur is not None:
            cur["end"] = _iso(now)
        new = next((s for s in stages if s["stage"] == stage and not s.get("start")), None)
        if new is None:  # an unplanned stage (snapshot, dataset...): before the planned ones still to come
            new = {"stage": stage, "epochs": 0, "epoch": 0}
            at = next((i for i, s in enumerate(stages) if not s.get("start")), len(stages))
            stages.insert(at, new)
        new["start"] = _iso(now)
        cur = new
    if cur is not None and fields.get("stage_epoch") is not None:
        k = int(fields["stage_epoch"])
        if fields.get("stage_epochs"):
            cur["epochs"] = int(fields["stage_epochs"])
        if k > int(cur.get("epoch") or 0):
            cur["epoch"] = k
            cur["last"] = _iso(now)
            if k == 1 or not cur.get("first"):
                cur["first"] = _iso(now)
                cur["first_k"] = k
    if cur is not None and fields.get("predict_seconds") is not None and fields.get("predict_images"):
        cur["predict_seconds"] = float(fields["predict_seconds"])
        cur["predict_images"] = int(fields["predict_images"])
    if fields.get("stage") == "registered" and cur is not None:
        cur["end"] = _iso(now)
    job.stages_json = json.dumps(stages)
    return {k: v for k, v in fields.items() if k not in STAGE_FIELDS}


@dataclass
class StageTime:
    """One stage still to run (or running): its name, epochs, seconds left (None: not known)."""

    stage: str
    epochs: int
    seconds: float | None
    conditional: str = ""  # "promoted": runs only when the gate promotes the candidate


@dataclass
class Estimate:
    """A running job's time left: the current stage, the stages after it, and the total.

    ``total``: seconds left of the stages that will run (None when one of them is not known);
    ``extra``: seconds of conditional stages (the refit after a passing gate), None when not known.
    """

    current: StageTime | None
    later: list[StageTime] = field(default_factory=list)
    total: float | None = None
    extra: float | None = None

    def text(self) -> str:
        """One line for a person, e.g. ``"train detector: about 49 s left, then train classifier
        (40 epochs, about 28 s), evaluate (about 4 s): about 1 min 21 s left in all"``."""
        if self.current is None:
            return "time left not known yet"
        c = self.current
        head = f"{c.stage}: " + (f"about {duration(c.seconds)} left" if c.seconds is not None
                                 else "time left not known until its first epoch ends" if c.epochs
                                 else "time left not known (no earlier job to compare with)")
        parts = []
        for s in self.later:
            what = f"{s.epochs} epochs" if s.epochs else ""
            if s.seconds is not None:
                what = f"{what}, about {duration(s.seconds)}" if what else f"about {duration(s.seconds)}"
            name = f"{s.stage} if the gate promotes the candidate" if s.conditional else s.stage
            parts.append(f"{name} ({what})" if what else name)
        line = head + (", then " + ", ".join(parts) if parts else "")
        if self.total is not None and self.later:
            line += f": about {duration(self.total)} left in all"
            if self.extra:
                line += f" (+{duration(self.extra)} with the refit)"
        elif self.total is None and self.later:
            line += ": total not known yet (no earlier finished job to time the later stages by)"
        return line


def duration(seconds: float | None) -> str:
    """``"49 s"``, ``"2 min 05 s"``, ``"1 h 03 min"``; ``"–"`` for None."""
    if seconds is None:
        return "–"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


#: What a stage's epochs are called where a person reads a job's progress (status page, CLI).
EPOCH_NAMES = {"train detector": "detector", "train classifier": "classifier",
               "refine classifier": "classifier refit"}


def stage_epochs(job) -> tuple[str, int, int] | None:
    """The epoch count a person reads for a job: ``(what, k, n)`` of its running stage, epoch k of
    n of that stage alone (k: epochs ended, 0 before the first one ends), ``what`` its name in
    :data:`EPOCH_NAMES` (e.g. ``("detector", 3, 10)``).

    The job row's own ``epoch``/``epochs`` count the detector's and the classifier's epochs together
    (3 of 50 for detector epoch 3 of 10 before 40 classifier epochs) and stop before the refit; a
    new user's trial read both scales on one page and could not tell them apart, so this is the one
    shown. Returns None when the running stage has no epochs (snapshot, dataset, evaluate) or the job
    is not running one; ``("", epoch, epochs)`` for a job without stage records (a worker from
    before them), whose only count is the combined one.
    """
    stages = job.stages
    if not stages:
        return ("", int(job.epoch or 0), int(job.epochs)) if job.epochs else None
    cur = next((s for s in reversed(stages) if s.get("start") and not s.get("end")), None)
    if cur is None or not int(cur.get("epochs") or 0):
        return None
    return EPOCH_NAMES.get(cur["stage"], cur["stage"]), int(cur.get("epoch") or 0), int(cur["epochs"])


def epoch_text(job) -> str:
    """``"detector epoch 3 of 10"``, ``"classifier epoch 5 of 40"``, ``"classifier refit epoch 2 of
    20"`` (:func:`stage_epochs`); ``"epoch 3 of 50 (detector and classifier together)"`` for a job
    without stage records; ``""`` when the running stage has no epochs."""
    se = stage_epochs(job)
    if se is None:
        return ""
    what, k, n = se
    return f"{what} epoch {k} of {n}" if what else f"epoch {k} of {n} (detector and classifier together)"


def _previous_times(previous) -> dict[str, dict]:
    """``{stage: {"seconds", "epochs", "tail"}}`` of a finished job's stages that started and ended."""
    out = {}
    for s in (previous.stages if previous is not None else []):
        a, b = _time(s.get("start")), _time(s.get("end"))
        if a is None or b is None or b < a:
            continue
        last = _time(s.get("last"))
        out[s["stage"]] = {"seconds": (b - a).total_seconds(), "epochs": int(s.get("epoch") or 0),
                           "tail": (b - last).total_seconds() if last and last <= b else 0.0}
    return out


def _scale(job, previous) -> float:
    n, m = (job.n_train or 0) + (job.n_val or 0), (previous.n_train or 0) + (previous.n_val or 0)
    return n / m if n and m else 1.0


def _from_previous(name: str, epochs: int, prev: dict, scale: float) -> float | None:
    p = prev.get(name)
    if p is None:
        return None
    if epochs and p["epochs"] and epochs != p["epochs"]:
        return scale * p["seconds"] * epochs / p["epochs"]
    return scale * p["seconds"]


def evaluate_estimate(job) -> float | None:
    """Seconds of the ``evaluate`` stage from this job's own measure: seconds per image of the
    retrained detector's run on the labelled images (recorded with ``train detector``: model load and
    the first call's warm-up included, so it errs long; the classifier's share not included, which
    errs short) x validation images x :data:`EVALUATED_VERSIONS`. None without that measure or
    without validation images (a Choices project: no detector stage). Measured on awake_sleep, 20
    labels, 5 validation images: 1.85 s estimated for 0.7 s evaluated (first run in the process),
    0.25 s for 0.41 s (warm); the stage took 0.4-2.2 s in a new user's trial (docs/training.md)."""
    rec = next((s for s in job.stages if s.get("predict_images")), None)
    if rec is None or not job.n_val:
        return None
    return EVALUATED_VERSIONS * int(job.n_val) * float(rec["predict_seconds"]) / int(rec["predict_images"])


def _stage_seconds(job, name: str, epochs: int, prev: dict, scale: float) -> float | None:
    """A stage's seconds from the previous job (:func:`_from_previous`), else, for ``evaluate``,
    from this job's own measure (:func:`evaluate_estimate`); None when neither is known."""
    secs = _from_previous(name, epochs, prev, scale)
    return evaluate_estimate(job) if secs is None and name == "evaluate" else secs


def estimate(job, previous=None, now: datetime | None = None) -> Estimate | None:
    """The time left of a running job, per stage (see the module docstring).

    Args:
        job: a running :class:`backend.models.TrainingJob` with its ``stages_json``.
        previous: the project's previous succeeded job (its stage times time the later stages), or None.
    Returns: None when the job is not running or has no stage record (a job of a worker from
        before per-stage records: no honest estimate); else an :class:`Estimate` whose unknown parts are None.
    """
    now = now or datetime.now(timezone.utc)
    if job.state != "running":
        return None
    stages = job.stages
    idx = next((i for i in range(len(stages) - 1, -1, -1) if stages[i].get("start") and not stages[i].get("end")),
               None)
    if idx is None:
        return None
    prev, scale = _previous_times(previous), (_scale(job, previous) if previous is not None else 1.0)
    cur = stages[idx]
    start = _time(cur["start"])
    n, k = int(cur.get("epochs") or 0), int(cur.get("epoch") or 0)
    first, last = _time(cur.get("first")), _time(cur.get("last"))
    left: float | None = None
    if n and k >= 1 and first and last:
        k0 = int(cur.get("first_k") or 1)
        per = ((last - first).total_seconds() / (k - k0) if k > k0
               else (first - start).total_seconds() / k0)  # the first epoch alone: setup included, errs long
        tail = prev.get(cur["stage"], {}).get("tail", 0.0) * scale  # e.g. the detector's face-threshold fit
        left = max(0.0, per * max(0, n - k) + tail - (now - last).total_seconds())
    else:
        took = _stage_seconds(job, cur["stage"], n, prev, scale)
        if took is not None:
            left = max(0.0, took - (now - start).total_seconds())
    current = StageTime(cur["stage"], n, left)
    if not any(s.get("planned") for s in stages):  # before the plan (snapshot, dataset): the rest is not known
        return Estimate(current, [], None, None)
    later, total, extra = [], left, 0.0
    for s in stages[idx + 1:]:
        if s.get("start"):
            continue
        secs = _stage_seconds(job, s["stage"], int(s.get("epochs") or 0), prev, scale)
        later.append(StageTime(s["stage"], int(s.get("epochs") or 0), secs, s.get("if", "")))
        if s.get("if"):
            extra = None if secs is None or extra is None else extra + secs
        else:
            total = None if secs is None or total is None else total + secs
    return Estimate(current, later, total, extra)
