"""The scores a person sees in Label Studio: every pre-labelled box carries its own confidence (the
region ``score``, 0-1), also a grey day-0 box whose class the model does not know yet, while the
task's score (Label Studio's *Prediction score* column, its sort and uncertainty sampling) stays
``1 - uncertainty``: 0 for such a task, which the Review queue serves first (README, "Scores")."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import AWAKE_SLEEP, require_data
from tests.helpers_unit import EXAMPLE_CONFIG, config_text, local_url, make_settings

FACES = ["agufsamudra_05feec546aad", "agufsamudra_2024f47e864f"]  # awake_sleep val, one face each


def _predictions(tmp_path, config: str) -> list[dict]:
    """Label Studio predictions of the shipped default model for two real faces, as /predict and
    scoring send them, with each task's threshold."""
    data = require_data(AWAKE_SLEEP)
    from backend.config import DEFAULT_MODEL_PATH
    from backend.labels import ProjectSchema
    from backend.predict import pre_annotation_threshold, predict_tasks, to_ls_prediction
    from facemodels.detector import ModelCache

    root = tmp_path / "docs"
    root.mkdir(exist_ok=True)
    for name in FACES:
        Image.open(data / "images" / "val" / f"{name}.jpg").save(root / f"{name}.jpg")
    settings = make_settings(tmp_path, local_files_document_root=str(root))
    schema = ProjectSchema.parse(config)
    model = ModelCache().get(DEFAULT_MODEL_PATH)
    preds = predict_tasks([{"id": k + 1, "data": {"image": local_url(f"{n}.jpg")}} for k, n in enumerate(FACES)],
                          schema, model, settings)
    thr = pre_annotation_threshold(schema, settings, model)
    out = []
    for p in preds:
        assert p.error is None
        d = to_ls_prediction(p, schema, "v1", settings.uncertainty_measure)
        d["_threshold"], d["_uncertainty"] = thr, p.uncertainty.get(settings.uncertainty_measure)
        out.append(d)
    return out


def test_a_grey_day0_box_carries_its_face_confidence_while_the_task_scores_0(tmp_path):
    # awake/sleep boxes: the shipped model knows expressions, not these classes (grey boxes at day 0)
    for d in _predictions(tmp_path, config_text("awake_sleep")):
        assert d["score"] == 0.0 and d["_uncertainty"] == 1.0  # the class is unknown: review first
        assert d["result"], "the face is still boxed"
        for r in d["result"]:
            assert r["value"]["rectanglelabels"] == []
            assert d["_threshold"] <= r["score"] <= 1.0  # the box's face confidence, not 0


def test_a_labelled_box_carries_face_times_class_confidence(tmp_path):
    for d in _predictions(tmp_path, EXAMPLE_CONFIG):
        assert d["result"]
        for r in d["result"]:
            assert r["value"]["rectanglelabels"] and 0.0 < r["score"] <= 1.0  # P(face) * P(class | face)
        assert d["score"] == pytest.approx(1.0 - d["_uncertainty"], abs=1e-6)


@pytest.mark.e2e
def test_label_studio_keeps_each_box_score_and_shows_the_task_score(stack, tmp_path):
    """In Label Studio: each stored region keeps its ``score``; the Data Manager's prediction score
    (``predictions_score``, what its column, sort and uncertainty sampling use) is the task score."""
    from label_studio_sdk import LabelStudio

    from backend.lsapi import all_pages, create_project, set_project_model_version, write_predictions

    preds = _predictions(tmp_path, config_text("awake_sleep"))
    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    pid = create_project(client, "scores", config_text("awake_sleep"))
    tids = [client.tasks.create(project=pid, data={"image": f"http://127.0.0.1:9/{n}.jpg"}).id for n in FACES]
    write_predictions(client, pid, [{"task": t, "model_version": "v1", "score": d["score"], "result": d["result"]}
                                    for t, d in zip(tids, preds)])
    set_project_model_version(client, pid, "v1")
    for t, d in zip(tids, preds):
        task = client.tasks.get(id=t)
        (stored,) = task.predictions
        pred = stored if isinstance(stored, dict) else stored.dict()
        assert [r["score"] for r in pred["result"]] == [r["score"] for r in d["result"]]
        assert all(r["score"] > 0 for r in pred["result"])
        shown = next(x for x in all_pages(client.tasks.list, project=pid, fields="all") if x.id == t)
        assert shown.predictions_score == pytest.approx(d["score"], abs=1e-6)
