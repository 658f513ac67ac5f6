"""Time left of a running training job, per stage (backend.jobprogress), on realistic timings.

The timeline mirrors ``ml_worker.training.run_training``'s progress reports: snapshot, dataset,
``train`` with the plan, 10 detector epochs (YOLO: setup, then ~7 s an epoch on a CPU), the face
threshold fit, 40 classifier epochs ~10x shorter, evaluation, and the refit after a passing gate.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from backend.jobprogress import estimate, record
from backend.models import TrainingJob

T0 = datetime(2026, 11, 30, 17, 0, tzinfo=timezone.utc)
PLAN = [{"stage": "train detector", "epochs": 10}, {"stage": "train classifier", "epochs": 40},
        {"stage": "evaluate", "epochs": 0}, {"stage": "refine classifier", "epochs": 20, "if": "promoted"}]


def timeline(pace: float = 1.0, n_train: int = 40, n_val: int = 10, promoted: bool = True):
    """``[(seconds since start, progress fields)]`` of one job; ``pace`` scales every stage's time."""
    det_epoch, setup, thr, clf_epoch, crops, evaluate, refit_epoch = (7 * pace, 3 * pace, 4 * pace, 0.7 * pace,
                                                                      1 * pace, 5 * pace, 0.9 * pace)
    ev = [(0, {"stage": "snapshot"}), (2 * pace, {"stage": "dataset"}),
          (4 * pace, {"stage": "train", "n_train": n_train, "n_val": n_val, "epochs": 50, "plan": PLAN}),
          (4 * pace, {"stage": "train detector", "epoch": 0})]
    t = 4 * pace + setup
    for k in range(1, 11):
        ev.append((t + k * det_epoch, {"stage": "train detector", "epoch": k, "stage_epoch": k, "stage_epochs": 10}))
    t += 10 * det_epoch + thr
    ev.append((t, {"stage": "train classifier"}))
    t += crops
    for k in range(1, 41):
        ev.append((t + k * clf_epoch, {"stage": "train classifier", "epoch": 10 + k, "stage_epoch": k,
                                       "stage_epochs": 40}))
    t += 40 * clf_epoch
    ev.append((t, {"stage": "evaluate"}))
    t += evaluate
    if promoted:
        ev.append((t, {"stage": "refine classifier"}))
        for k in range(1, 21):
            ev.append((t + k * refit_epoch, {"stage": "refine classifier", "stage_epoch": k, "stage_epochs": 20}))
        t += 20 * refit_epoch
    ev.append((t, {"stage": "registered"}))
    return ev


def run(job: TrainingJob, events, until: float | None = None) -> None:
    """Apply the reports up to ``until`` seconds as ``run_training``'s ``update`` does."""
    job.state, job.started_at = "running", T0
    for t, f in events:
        if until is not None and t > until:
            break
        for k, v in record(job, dict(f), now=T0 + timedelta(seconds=t)).items():
            setattr(job, k, v)


def finished_job(pace: float, n_train: int, n_val: int, promoted: bool = True) -> TrainingJob:
    job = TrainingJob(id=1, project_id=1)
    run(job, timeline(pace, n_train, n_val, promoted))
    job.state = "succeeded"
    return job


def truth(events, at: float, with_refit: bool) -> float:
    """Seconds from ``at`` to the end of evaluation (``with_refit``: of the refit)."""
    first = {}
    for t, f in events:
        first.setdefault(f["stage"], t)
    end = first["registered"] if with_refit else first.get("refine classifier", first["registered"])
    return end - at


def test_28_s_in_at_detector_epoch_3_of_10_without_an_earlier_job_says_what_it_cannot_tell():
    ev = timeline()
    job = TrainingJob(id=2, project_id=1)
    run(job, ev, until=28)
    assert (job.stage, job.epoch, job.epochs) == ("train detector", 3, 50)
    est = estimate(job, None, T0 + timedelta(seconds=28))
    # the detector's own pace: (28 - 14) s for epochs 2 and 3 -> 7 s an epoch, 7 epochs left
    assert est.current.stage == "train detector" and est.current.seconds == pytest.approx(49)
    det_end = next(t for t, f in ev if f["stage"] == "train classifier")
    assert 1 / 1.5 <= est.current.seconds / (det_end - 28) <= 1.5
    # the classifier's pace cannot be told from the detector's: no total rather than a wrong one
    assert est.total is None
    text = est.text()
    assert text.startswith("train detector: about 49 s left, then train classifier (40 epochs), evaluate")
    assert "total not known yet" in text and "refine classifier if the gate promotes the candidate" in text
    # the old estimate (one rate over all 50 epochs: 28 s / 3 x 47) was 439 s for 87 s left
    assert truth(ev, 28, with_refit=False) == pytest.approx(87)


@pytest.mark.parametrize("at", [28, 60, 80, 92, 100, 108])
def test_later_stages_are_timed_by_the_previous_job_within_a_factor_1_5(at):
    """The previous job had 45 labelled images (and ran 10% faster an image); this one has 50."""
    previous = finished_job(pace=0.9 * 45 / 50, n_train=36, n_val=9)
    ev = timeline()
    job = TrainingJob(id=2, project_id=1)
    run(job, ev, until=at)
    est = estimate(job, previous, T0 + timedelta(seconds=at))
    left = truth(ev, at, with_refit=False)
    assert est.total is not None, est.text()
    assert 1 / 1.5 <= est.total / left <= 1.5, (at, est.total, left, est.text())
    assert est.extra is not None and est.extra > 0  # the refit after a passing gate, shown apart
    assert "left in all" in est.text()


def test_detector_epoch_3_of_10_with_a_previous_job_on_the_page_words():
    previous = finished_job(pace=1.0, n_train=40, n_val=10)
    ev = timeline()
    job = TrainingJob(id=2, project_id=1)
    run(job, ev, until=28)
    est = estimate(job, previous, T0 + timedelta(seconds=28))
    # detector 49 s + its face-threshold fit 4 s, classifier 29 s, evaluation 5 s; the refit 18 s apart
    assert est.total == pytest.approx(87) and est.extra == pytest.approx(18)
    assert truth(ev, 28, with_refit=False) == pytest.approx(87)
    assert est.text() == ("train detector: about 53 s left, then train classifier (40 epochs, about 29 s), "
                          "evaluate (about 5 s), refine classifier if the gate promotes the candidate "
                          "(20 epochs, about 18 s): about 1 min 27 s left in all (+18 s with the refit)")


def test_first_epoch_alone_counts_the_stage_setup_and_no_epoch_yet_is_not_known():
    ev = timeline()
    job = TrainingJob(id=2, project_id=1)
    run(job, ev, until=10)  # detector started at 4 s, no epoch ended
    est = estimate(job, None, T0 + timedelta(seconds=10))
    assert est.current.seconds is None and "not known until its first epoch ends" in est.text()
    run(TrainingJob(id=3, project_id=1), ev)  # (a separate job: the timeline is reusable)
    job = TrainingJob(id=4, project_id=1)
    run(job, ev, until=14)  # epoch 1 ended at 14 s: 10 s with the setup -> errs long, 9 x 10 s
    est = estimate(job, None, T0 + timedelta(seconds=14))
    assert est.current.seconds == pytest.approx(90)
    assert 1 < est.current.seconds / (63 + 4) <= 1.5


def test_before_the_plan_and_without_records_there_is_no_estimate():
    job = TrainingJob(id=2, project_id=1)
    run(job, timeline(), until=1)  # reading annotations: what follows is not planned yet
    est = estimate(job, finished_job(1.0, 40, 10), T0 + timedelta(seconds=1))
    assert est.total is None and est.later == [] and est.current.stage == "snapshot"
    assert est.current.seconds == pytest.approx(1)  # the previous job's snapshot took 2 s
    legacy = TrainingJob(id=3, project_id=1, state="running", epoch=3, epochs=50, started_at=T0)
    assert estimate(legacy, None, T0 + timedelta(seconds=28)) is None  # a worker from before the records
    job.state = "succeeded"
    assert estimate(job, None, T0 + timedelta(seconds=2)) is None


def test_a_rejected_previous_job_has_no_refit_to_time_it_by():
    previous = finished_job(pace=1.0, n_train=40, n_val=10, promoted=False)
    job = TrainingJob(id=2, project_id=1)
    run(job, timeline(), until=28)
    est = estimate(job, previous, T0 + timedelta(seconds=28))
    assert est.total == pytest.approx(87) and est.extra is None
    assert "(20 epochs)" in est.text() and "with the refit" not in est.text()


def test_stage_records_survive_the_database_round_trip():
    job = TrainingJob(id=2, project_id=1)
    run(job, timeline())
    names = [s["stage"] for s in job.stages]
    assert names == ["snapshot", "dataset", "train", "train detector", "train classifier", "evaluate",
                     "refine classifier", "registered"]
    assert all(s.get("start") and s.get("end") for s in job.stages)
    det = job.stages[3]
    assert (det["epoch"], det["epochs"]) == (10, 10)
    bad = TrainingJob(id=5, project_id=1, state="running", stages_json="not json")
    assert bad.stages == [] and estimate(bad) is None
