"""Acceptance counts and mAP50 of pre-annotations against ground truth (ml_worker.evaluation)."""

from __future__ import annotations

import pytest

from ml_worker.evaluation import GTFace, PredFace, acceptance, evaluate_predictions, iou_matrix, map50


def test_iou_matrix_by_hand():
    # (0,0)-(10,10) vs (5,0)-(15,10): overlap 50, union 150
    m = iou_matrix([(0, 0, 10, 10)], [(5, 0, 15, 10), (20, 20, 30, 30)])
    assert m[0, 0] == pytest.approx(1 / 3) and m[0, 1] == 0.0


def test_acceptance_each_outcome():
    gts = [GTFace((0, 0, 100, 100), "awake"), GTFace((200, 0, 300, 100), "sleep"),
           GTFace((400, 0, 500, 100), "sleep"), GTFace((600, 0, 700, 100), "awake")]
    preds = [
        PredFace((0, 0, 100, 100), "Awake", 0.9),      # accepted (name matched case-insensitively)
        PredFace((200, 0, 300, 100), "awake", 0.8),    # class fixed
        PredFace((400, 0, 440, 100), "sleep", 0.7),    # IoU 0.4: box fixed
        PredFace((0, 0, 95, 100), "awake", 0.6),       # duplicate of face 1: a false box
        PredFace((900, 900, 950, 950), None, 0.5),     # nowhere near a face: a false box
    ]
    c = acceptance(preds, gts)
    assert (c.accepted, c.class_fixed, c.box_fixed, c.missed, c.false_boxes) == (1, 1, 1, 1, 2)
    assert c.acceptance_rate == 0.25
    assert c.edits_per_image == 5
    assert c.class_accuracy == 0.5
    assert c.boxes_per_face == 5 / 4


def test_unlabelled_face_box_needs_a_class():
    c = acceptance([PredFace((0, 0, 10, 10), None, 0.9)], [GTFace((0, 0, 10, 10), "awake")])
    assert (c.accepted, c.class_fixed) == (0, 1)


def test_map50_perfect_and_by_name():
    gts = [GTFace((0, 0, 10, 10), "happy"), GTFace((20, 20, 30, 30), "sad")]
    preds = [PredFace((0, 0, 10, 10), "Happy", 0.9), PredFace((20, 20, 30, 30), "SAD", 0.8)]
    m = map50([(preds, gts)])
    assert m["mAP50"] == pytest.approx(1.0, abs=0.01)
    assert set(m["per_class"]) == {"happy", "sad"}
    # swapping the classes: boxes still right (face mAP50 1), classes all wrong (mAP50 0)
    swapped = [PredFace((0, 0, 10, 10), "sad", 0.9), PredFace((20, 20, 30, 30), "happy", 0.8)]
    ev = evaluate_predictions([(swapped, gts)])
    assert ev.classes["mAP50"] == pytest.approx(0.0, abs=0.01)
    assert ev.faces["mAP50"] == pytest.approx(1.0, abs=0.01)


def test_map50_no_ground_truth_is_zero_not_an_error():
    assert map50([([PredFace((0, 0, 1, 1), "a", 0.5)], [])])["mAP50"] == 0.0


def test_class_hypotheses_find_a_face_under_its_second_class():
    """A face whose top class is wrong is still found, lower in the ranking, under its right class
    (one hypothesis per class, as ultralytics' validator counts boxes); the top-1 figure is not."""
    import numpy as np

    from backend.predict import Face
    from ml_worker.evaluation import class_hypotheses

    labels = ["awake", "sleep"]
    gts = [GTFace((0, 0, 100, 100), "sleep"), GTFace((200, 0, 300, 100), "awake")]
    faces = [Face((0, 0, 100, 100), 0.9, "awake", 0.9 * 0.7, np.array([0.7, 0.3])),   # wrong top class
             Face((200, 0, 300, 100), 0.8, "awake", 0.8 * 0.9, np.array([0.9, 0.1])),
             Face((500, 0, 510, 10), 0.005, "sleep", 0.004, np.array([0.2, 0.8]))]    # below the candidate threshold
    hyps = class_hypotheses(faces, labels, low=0.01)
    assert [(h.label, round(h.score, 3)) for h in hyps] == [("awake", 0.63), ("sleep", 0.27),
                                                            ("awake", 0.72), ("sleep", 0.08)]
    top1 = [PredFace(f.box, f.label, f.score) for f in faces[:2]]
    ev = evaluate_predictions([(top1, gts)], candidates=[top1], class_candidates=[hyps])
    assert ev.as_dict()["mAP50_top1"] == pytest.approx(0.5, abs=0.01)  # sleep never found: AP 0
    assert ev.classes["per_class"]["sleep"] == pytest.approx(1.0, abs=0.01)
    assert ev.classes["per_class"]["awake"] == pytest.approx(1.0, abs=0.01)  # awake 0.72 ranks above the false 0.63
    assert ev.faces["mAP50"] == pytest.approx(1.0, abs=0.01)  # face AP: one box per face, no duplicates
    assert ev.counts.accepted == 1 and ev.counts.class_fixed == 1  # what a person sees is unchanged


def test_class_hypotheses_unlabelled_faces_stay_one_box():
    import numpy as np

    from backend.predict import Face
    from ml_worker.evaluation import class_hypotheses

    hyps = class_hypotheses([Face((0, 0, 10, 10), 0.5, None, 0.5, np.array([1.0]))], ["awake", "sleep"], 0.01)
    assert [(h.label, h.score) for h in hyps] == [(None, 0.5)]
