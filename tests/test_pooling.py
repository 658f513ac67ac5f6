"""Optional poolings of the face classifier in place of face-api's global mean (docs/classifier.md,
"Sixth round"): GeM (Radenović et al. 2018) and spatial softmax attention. Off in the recipe;
both start as the mean, so the pretrained head rows stay valid."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from facemodels.classifier import (
    RECIPE,
    FaceClassifier,
    default_classifier_path,
    fine_tune,
)
from facemodels.faceapi_net import AttentionPool, GeMPool, make_pool
from tests.helpers_unit import synthetic_face_crops

CLASSES = ["awake", "sleep"]


@pytest.fixture(scope="module")
def clf() -> FaceClassifier:
    return FaceClassifier.load(default_classifier_path())


def test_recipe_keeps_the_mean_pool(clf):
    assert RECIPE["pool"] == "mean"
    assert clf.net.features.pool is None
    assert not any(k.startswith("features.pool") for k in clf.net.state_dict())


@pytest.mark.parametrize("pool", [AttentionPool(256), GeMPool(1.0)], ids=["attn", "gem_p1"])
def test_pools_start_as_the_mean(pool):
    x = torch.rand(3, 256, 7, 7) * 4  # a post-ReLU map (non-negative)
    x[:, :, :2] = 0.0  # dead cells, as after a ReLU
    with torch.no_grad():
        assert torch.allclose(pool(x), x.mean(dim=(2, 3)), atol=1e-5)


def test_gem_approaches_the_max_for_large_p():
    x = torch.rand(2, 8, 7, 7)
    with torch.no_grad():
        assert torch.allclose(GeMPool(200.0)(x), x.amax(dim=(2, 3)), rtol=0.05)
    with pytest.raises(ValueError, match="pool must be one of"):
        make_pool("max")


@pytest.mark.parametrize("pool,kw", [("attn", {}), ("gem", {"gem_p": 3.0})])
def test_fine_tune_trains_saves_and_loads_the_pool(clf, pool, kw, tmp_path):
    s = synthetic_face_crops(8)
    model, met = fine_tune(clf, s, CLASSES, epochs=2, seed=0, lr=3e-3, pool=pool, **kw)
    assert met["recipe"]["pool"] == pool and clf.net.features.pool is None  # the init is not modified
    params = dict(model.net.features.pool.named_parameters())
    start = {"conv.weight": 0.0, "conv.bias": 0.0} if pool == "attn" else {"p": 3.0}
    assert any(not torch.allclose(params[k].detach(), torch.full_like(params[k], v)) for k, v in start.items())
    # a refit from it keeps its trained pooling
    refit, _ = fine_tune(model, s, CLASSES, epochs=1, seed=1, pool=pool, **kw, lr=0.0)
    for k, p in refit.net.features.pool.named_parameters():
        assert torch.equal(p, params[k])
    model.save(tmp_path / "m.pt")
    back = FaceClassifier.load(tmp_path / "m.pt")
    assert back.net.features.pool_name == pool
    im, box, _ = s[0]
    np.testing.assert_allclose(back.predict_proba(im, box.reshape(1, 4)), model.predict_proba(im, box.reshape(1, 4)),
                               atol=1e-6)
    with pytest.raises(ValueError, match="pool must be one of"):
        fine_tune(clf, s, CLASSES, epochs=1, pool="max")


def test_onnx_export_matches_torch_with_a_trained_pool(clf, tmp_path):
    pytest.importorskip("onnxruntime")
    from facemodels.onnx_runtime import OnnxClassifier, export_classifier

    s = synthetic_face_crops(8)
    for pool in ("gem", "attn"):
        model, _ = fine_tune(clf, s, CLASSES, epochs=2, seed=0, lr=3e-3, pool=pool)
        model.save(tmp_path / f"{pool}.pt")
        export_classifier(tmp_path / f"{pool}.pt", tmp_path / f"{pool}.onnx")
        onnx = OnnxClassifier(tmp_path / f"{pool}.onnx")
        for im, box, _ in s[:2]:
            np.testing.assert_allclose(onnx.predict_proba(im, box.reshape(1, 4)),
                                       model.predict_proba(im, box.reshape(1, 4)), atol=1e-4)
