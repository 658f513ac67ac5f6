"""fine_tune's transfer regularisers (docs/classifier.md, "Fifth round"): L2-SP (Li et al. 2018)
pulls the backbone towards its starting point, BSS (Chen et al. 2019) shrinks the smallest
singular values of the batch's features. Both are off in the recipe."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from facemodels.classifier import FaceClassifier, default_classifier_path, fine_tune
from tests.helpers_unit import synthetic_face_crops

CLASSES = ["awake", "sleep"]


@pytest.fixture(scope="module")
def clf() -> FaceClassifier:
    return FaceClassifier.load(default_classifier_path())


def _sq_dist(a: FaceClassifier, b: FaceClassifier) -> float:
    pa, pb = dict(a.net.features.named_parameters()), dict(b.net.features.named_parameters())
    return float(sum((pa[k].detach() - pb[k].detach()).pow(2).sum() for k in pa))


def test_l2sp_keeps_the_backbone_near_its_starting_point(clf):
    s = synthetic_face_crops(8)
    plain, _ = fine_tune(clf, s, CLASSES, epochs=3, seed=0, lr=3e-3)
    held, met = fine_tune(clf, s, CLASSES, epochs=3, seed=0, lr=3e-3, l2sp=100.0)
    assert met["recipe"]["l2sp"] == 100.0
    assert 0 < _sq_dist(held, clf) < 0.5 * _sq_dist(plain, clf)
    # the default anchor is the init itself
    same, _ = fine_tune(clf, s, CLASSES, epochs=3, seed=0, lr=3e-3, l2sp=100.0, anchor=clf)
    for a, b in zip(held.net.parameters(), same.net.parameters()):
        assert torch.equal(a, b)
    # the init is not modified
    assert _sq_dist(clf, FaceClassifier.load(default_classifier_path())) == 0.0


def test_l2sp_pulls_towards_another_anchor(clf):
    """A refit anchored at the port (not at the classifier it continues from) is pulled back to it."""
    s = synthetic_face_crops(8)
    moved, _ = fine_tune(clf, s, CLASSES, epochs=3, seed=0, lr=3e-3)  # a "gated" classifier, off the port
    free, _ = fine_tune(moved, s, CLASSES, epochs=3, seed=1, lr=3e-3)
    pulled, _ = fine_tune(moved, s, CLASSES, epochs=3, seed=1, lr=3e-3, l2sp=100.0, anchor=clf)
    assert _sq_dist(pulled, clf) < _sq_dist(free, clf)


def test_l2sp_anchor_of_another_architecture_is_refused(clf):
    bad = copy.deepcopy(clf)
    name = next(iter(bad.net.features.named_parameters()))[0]
    mod = bad.net.features.get_submodule(name.rsplit(".", 1)[0]) if "." in name else bad.net.features
    setattr(mod, name.rsplit(".", 1)[-1], torch.nn.Parameter(torch.zeros(3, 1)))
    with pytest.raises(ValueError, match="l2sp anchor"):
        fine_tune(clf, synthetic_face_crops(8), CLASSES, epochs=1, l2sp=0.1, anchor=bad)


def test_bss_acts_on_batches_of_two_or_more(clf):
    s = synthetic_face_crops(8)
    base1, _ = fine_tune(clf, s, CLASSES, epochs=1, seed=0, batch_size=1)
    bss1, _ = fine_tune(clf, s, CLASSES, epochs=1, seed=0, batch_size=1, bss=10.0)
    for a, b in zip(base1.net.parameters(), bss1.net.parameters()):  # one crop a batch: no spectrum to shrink
        assert torch.equal(a, b)
    base, _ = fine_tune(clf, s, CLASSES, epochs=2, seed=0, batch_size=8)
    shrunk, met = fine_tune(clf, s, CLASSES, epochs=2, seed=0, batch_size=8, bss=10.0)
    assert met["recipe"]["bss"] == 10.0 and np.isfinite(met["loss"]).all()
    assert any(not torch.equal(a, b) for a, b in zip(base.net.parameters(), shrunk.net.parameters()))
