"""backend.uncertainty on a hand-written 3x4 probability array (arithmetic in the comments),
normalise, aggregate and the per-image score."""

from __future__ import annotations

import numpy as np
import pytest

from backend.uncertainty import (ImageUncertainty, aggregate, entropy, image_uncertainty, joint, least_confidence,
                                 margin, normalise)

approx = pytest.approx

# Three boxes, four classes; every row sums to 1.
P = np.array([
    [0.70, 0.10, 0.10, 0.10],   # confident
    [0.40, 0.40, 0.10, 0.10],   # a tie between two classes
    [0.25, 0.25, 0.25, 0.25],   # uniform: maximally uncertain
])

# normalised least-confidence (1 - max p) * K/(K-1), K = 4:  .3*4/3 = .4;  .6*4/3 = .8;  .75*4/3 = 1
LC = [0.4, 0.8, 1.0]
# margin 1 - (p1 - p2):  1-(.7-.1) = .4;  1-(.4-.4) = 1;  1-(.25-.25) = 1
MARGIN = [0.4, 1.0, 1.0]
# entropy -sum p ln p / ln 4, with ln .7 = -0.356675, ln .1 = -2.302585, ln .4 = -0.916291, ln 4 = 1.386294:
#   row 0: .7*.356675 + 3*.1*2.302585 = .249672 + .690776 = .940448;  / 1.386294 = .678390
#   row 1: 2*.4*.916291 + 2*.1*2.302585 = .733033 + .460517 = 1.193550;  / 1.386294 = .860964
#   row 2: 4*.25*ln 4 = ln 4;  / ln 4 = 1
ENTROPY = [0.678390, 0.860964, 1.0]


def test_least_confidence_by_hand():
    assert least_confidence(P) == approx(LC)


def test_margin_by_hand():
    assert margin(P) == approx(MARGIN)


def test_entropy_by_hand():
    assert entropy(P) == approx(ENTROPY, abs=1e-6)


def test_measures_of_a_certain_box_are_zero():
    one_hot = np.array([[0.0, 1.0, 0.0, 0.0]])
    assert least_confidence(one_hot) == approx([0.0])
    assert margin(one_hot) == approx([0.0])
    assert entropy(one_hot) == approx([0.0], abs=1e-9)  # 0 log 0 taken as 0


def test_measures_accept_one_row_and_one_class():
    assert least_confidence(np.array([0.5, 0.5])) == approx([1.0])  # uniform over 2 classes
    # two classes: (1 - .8) * 2 = .4, the same as margin 1 - (.8 - .2)
    assert least_confidence(np.array([0.8, 0.2])) == approx([0.4]) == margin(np.array([0.8, 0.2]))
    assert least_confidence(np.array([[0.8]])) == approx([0.2])  # one class: 1 - p1
    # one class: margin is 1 - p1, entropy 0 (nothing to be unsure between)
    assert margin(np.array([[0.8]])) == approx([0.2])
    assert entropy(np.array([[1.0]])) == approx([0.0])


def test_normalise():
    # sigmoid scores .6, .2, .2 -> sum 1.0 -> unchanged; .3, .1 -> sum .4 -> .75, .25
    out = normalise(np.array([[0.6, 0.2, 0.2], [0.3, 0.1, 0.0]]))
    assert out == approx(np.array([[0.6, 0.2, 0.2], [0.75, 0.25, 0.0]]))
    assert out.sum(axis=1) == approx([1.0, 1.0])


def test_normalise_zero_row_is_uniform_and_negatives_clipped():
    out = normalise(np.array([[0.0, 0.0, 0.0, 0.0], [-0.5, 0.5, 0.0, 0.0]]))
    assert out[0] == approx([0.25] * 4)
    assert out[1] == approx([0.0, 1.0, 0.0, 0.0])


def test_normalise_one_dim_input():
    assert normalise(np.array([1.0, 3.0])) == approx(np.array([[0.25, 0.75]]))


def test_aggregate():
    v = np.array([0.3, 0.6, 0.75])
    assert aggregate(v, "max") == approx(0.75)
    assert aggregate(v, "mean") == approx(0.55)  # 1.65 / 3
    assert aggregate(v, "sum") == approx(1.0)  # 1.65, capped at 1
    assert aggregate(np.array([0.1, 0.2]), "sum") == approx(0.3)
    assert isinstance(aggregate(v), float)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="no box values"):
        aggregate(np.array([]))
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        aggregate(np.array([0.1]), "median")


# --- per image --------------------------------------------------------------------------------
def test_joint():
    # 1 - c (1 - u): c .9, u .4 -> 1 - .54 = .46;  c .1, u 0 -> .9;  c 1, u .3 -> .3;  c 0 -> 1
    assert joint(np.array([0.4, 0.0, 0.3, 0.2]), np.array([0.9, 0.1, 1.0, 0.0])) == approx([0.46, 0.9, 0.3, 1.0])


def test_image_uncertainty_boxes_basis():
    confs = np.array([0.9, 0.8, 0.1])  # threshold .5 keeps rows 0 and 1
    u = image_uncertainty(P, confs, threshold=0.5, how="max")
    assert u.basis == "boxes" and u.n_boxes == 2
    # joint 1 - c (1 - u): lc row 0: 1 - .9*.6 = .46, row 1: 1 - .8*.2 = .84
    assert u.least_confidence == approx(0.84)
    assert u.margin == approx(1.0)             # row 1: 1 - .8*0
    # entropy row 0: 1 - .9*(1 - .678390) = .710551; row 1: 1 - .8*(1 - .860964) = .888771
    assert u.entropy == approx(0.888771, abs=1e-6)
    m = image_uncertainty(P, confs, threshold=0.5, how="mean")
    assert m.least_confidence == approx(0.65)  # (.46 + .84) / 2
    assert m.margin == approx(0.73)            # (1 - .9*.6 = .46, 1) -> .73
    assert m.entropy == approx((0.710551 + 0.888771) / 2, abs=1e-6)


def test_image_uncertainty_threshold_is_inclusive():
    u = image_uncertainty(P[:1], np.array([0.5]), threshold=0.5)
    assert u.basis == "boxes" and u.n_boxes == 1
    assert u.least_confidence == approx(0.7)   # 1 - .5 * (1 - .4)


def test_image_uncertainty_candidate_basis():
    # no box reaches .5: the best candidate (conf .3, row 1) is scored the same joint way:
    # lc 1 - .3*(1 - .8) = .94; margin 1 - .3*0 = 1; entropy 1 - .3*(1 - .860964) = .958289
    confs = np.array([0.2, 0.3, 0.05])
    u = image_uncertainty(P, confs, threshold=0.5)
    assert u.basis == "candidate" and u.n_boxes == 0
    assert u.least_confidence == approx(0.94)
    assert u.margin == approx(1.0)
    assert u.entropy == approx(0.958289, abs=1e-6)


def test_unsure_detection_outranks_a_sure_one_with_the_same_class_split():
    # both normalise to .6/.4; the box scored (.06, .04) is far more likely a miss
    weak = image_uncertainty(np.array([[0.6, 0.4]]), np.array([0.06]), threshold=0.05)
    strong = image_uncertainty(np.array([[0.6, 0.4]]), np.array([0.9]), threshold=0.05)
    assert weak.margin > strong.margin and weak.entropy > strong.entropy


def test_image_uncertainty_candidate_confident_class_still_uncertain():
    # a candidate whose classes are certain (one-hot) still scores 1 - conf = .9
    u = image_uncertainty(np.array([[1.0, 0.0]]), np.array([0.1]), threshold=0.25)
    assert (u.least_confidence, u.margin, u.entropy) == approx((0.9, 0.9, 0.9))


def test_image_uncertainty_none_basis():
    u = image_uncertainty(np.zeros((0, 4)), np.zeros(0), threshold=0.25)
    assert u.basis == "none" and u.n_boxes == 0
    assert (u.least_confidence, u.margin, u.entropy) == (1.0, 1.0, 1.0)


def test_image_uncertainty_unknown_classes_basis():
    u = image_uncertainty(np.ones((2, 1)), np.array([0.9, 0.1]), threshold=0.25, known_classes=False)
    assert u.basis == "unknown_classes"
    assert u.n_boxes == 1
    assert (u.least_confidence, u.margin, u.entropy) == (1.0, 1.0, 1.0)


def test_image_uncertainty_get():
    u = ImageUncertainty(0.1, 0.2, 0.3, 1, "boxes")
    assert (u.get("least_confidence"), u.get("margin"), u.get("entropy")) == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match="unknown uncertainty measure"):
        u.get("variance")
