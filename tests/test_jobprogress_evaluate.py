"""A project's first training job: the evaluate stage's time from the job's own measure (the retrained
detector's run on the labelled images, per image), so the status page can give a total once the
classifier's pace is known (backend.jobprogress.evaluate_estimate)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from backend.jobprogress import EVALUATED_VERSIONS, estimate, evaluate_estimate
from backend.models import TrainingJob
from tests.test_jobprogress import T0, finished_job, run, timeline


def with_measure(events, seconds: float = 2.0, images: int = 50):
    """``events`` plus the worker's report at the end of the face-threshold fit: the detector ran on
    ``images`` labelled images in ``seconds`` (``ml_worker.training.train_two_stage``)."""
    out = []
    for t, f in events:
        if f["stage"] == "train classifier" and not any(x.get("predict_images") for _, x in out):
            out.append((t, {"stage": "train detector", "predict_seconds": seconds, "predict_images": images}))
        out.append((t, f))
    return out


def test_first_job_times_the_evaluation_by_its_own_predictions():
    ev = with_measure(timeline(n_train=40, n_val=10))
    job = TrainingJob(id=2, project_id=1)
    run(job, ev, until=100)  # classifier epochs running, no earlier job
    assert job.stages[3]["predict_seconds"] == 2.0 and job.stages[3]["predict_images"] == 50
    assert "predict_seconds" not in job.__dict__  # a stage record, not a job column
    est = estimate(job, None, T0 + timedelta(seconds=100))
    ev_stage = next(s for s in est.later if s.stage == "evaluate")
    assert ev_stage.seconds == pytest.approx(EVALUATED_VERSIONS * 10 * 2.0 / 50)  # 0.8 s
    assert est.total is not None and est.total == pytest.approx(est.current.seconds + 0.8)
    assert "evaluate (about 1 s)" in est.text() and "left in all" in est.text()
    assert "refine classifier if the gate promotes the candidate (20 epochs)" in est.text()  # still not known
    # during the evaluation itself: the estimate less the time it has run
    evaluate_start = next(t for t, f in ev if f["stage"] == "evaluate")
    job = TrainingJob(id=3, project_id=1)
    run(job, ev, until=evaluate_start)
    est = estimate(job, None, T0 + timedelta(seconds=evaluate_start + 0.5))
    assert est.current.stage == "evaluate" and est.current.seconds == pytest.approx(0.3)


def test_without_the_measure_or_with_a_previous_job_nothing_changes():
    job = TrainingJob(id=2, project_id=1)
    run(job, timeline(), until=100)  # a worker from before the measure, or a Choices project (no detector)
    assert evaluate_estimate(job) is None
    est = estimate(job, None, T0 + timedelta(seconds=100))
    assert est.total is None and "total not known yet" in est.text()
    # a previous job's evaluation time is the better measure: it is used as before
    job = TrainingJob(id=3, project_id=1)
    run(job, with_measure(timeline()), until=100)
    est = estimate(job, finished_job(pace=1.0, n_train=40, n_val=10), T0 + timedelta(seconds=100))
    assert next(s for s in est.later if s.stage == "evaluate").seconds == pytest.approx(5)
    # no validation image: no estimate
    job = TrainingJob(id=4, project_id=1)
    run(job, with_measure(timeline(n_val=0)), until=100)
    assert evaluate_estimate(job) is None
