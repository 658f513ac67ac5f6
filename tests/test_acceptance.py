"""Pre-label acceptance: what people did with each predicted box (backend.acceptance).

The JSON below has the shapes Label Studio 1.23.2 stores and returns from
``tasks.list(fields="all")`` (checked live: annotations carry ``parent_prediction``, the id of
the prediction the editor copied; region ids are kept, a ``#<annotation>`` suffix rewritten).
"""

from __future__ import annotations

import copy

import pytest
from fastapi.testclient import TestClient

from backend import acceptance
from backend.acceptance import Counts, acceptance_rows, compare, project_counts, store, task_counts
from tests.helpers_unit import make_settings


@pytest.fixture(autouse=True)
def _no_recount_marks_of_other_tests():
    """Recount marks live in the process and are keyed by project id, which restarts at 1 in each
    test's Label Studio: start every test without another test's marks."""
    acceptance._dirty.clear()
    yield


def test_a_webhook_without_api_key_leaves_no_recount_mark(tmp_path):
    """Without LABEL_STUDIO_API_KEY nothing can recount: an annotation webhook marks nothing, so the
    counts do not read stale for good (CI: another test's webhook for project 3 made this module's
    real-Label-Studio test see its fresh counts as stale)."""
    settings = make_settings(tmp_path, label_studio_api_key="")
    assert acceptance.request_recount(settings, 3) is None
    assert 3 not in acceptance._dirty

LOOPBACK = ("127.0.0.1", 50000)


def region(rid, x, y, w, h, labels, **extra):
    """A RectangleLabels region as faceloop predicts it and Label Studio stores it (percent units)."""
    return {"id": rid, "from_name": "face", "to_name": "image", "type": "rectanglelabels",
            "original_width": 640, "original_height": 480, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": labels}, **extra}


PRED = [region("a1b2c3d4e5", 10, 10, 20, 25, ["awake"], score=0.91),
        region("f6a7b8c9d0", 40, 12, 18, 22, ["awake"], score=0.84),
        region("0a1b2c3d4e", 70, 15, 15, 20, ["sleep"], score=0.77),
        region("9f8e7d6c5b", 5, 60, 10, 12, [], score=0.45, meta={"text": ["face found; pick a class"]})]


def edited_annotation():
    """The person keeps box 1 (the editor re-serialises it: float noise), relabels box 2, drags box 3,
    deletes box 4, and draws one face by hand."""
    ann = copy.deepcopy(PRED[:3])
    for r in ann:
        r.pop("score")
        r["origin"] = "prediction"
    ann[0]["value"]["x"] = 10.000000000000002
    ann[1]["value"]["rectanglelabels"] = ["sleep"]
    ann[1]["origin"] = "prediction-changed"
    ann[2]["value"].update(x=72.5, width=14.0)
    ann[2]["origin"] = "prediction-changed"
    ann.append(region("Xk3_pQ9zLm", 50, 55, 12, 15, ["awake"], origin="manual"))
    return ann


def test_each_predicted_box_is_counted_by_what_the_person_did():
    c = compare(PRED, edited_annotation())
    assert (c.annotations, c.predicted, c.accepted, c.relabelled, c.moved, c.deleted, c.drawn) == (1, 4, 1, 1, 1, 1, 1)
    assert c.moved_relabelled == 0
    assert c.acceptance_rate == pytest.approx(0.25)


def test_untouched_prediction_is_all_accepted_and_an_empty_annotation_deletes_all():
    ann = copy.deepcopy(PRED)
    assert compare(PRED, ann) == Counts(annotations=1, predicted=4, accepted=4)
    assert compare(PRED, []) == Counts(annotations=1, predicted=4, deleted=4)
    assert compare([], [region("hand", 1, 1, 5, 5, ["awake"])]) == Counts(annotations=1, drawn=1)


def test_editor_suffix_on_region_ids_is_ignored():
    """The editor rewrites 'id#<annotation>' to 'id#<new annotation>' when it copies a prediction."""
    pred = [region("r1#7", 10, 10, 20, 20, ["awake"])]
    ann = [region("r1#42", 10, 10, 20, 20, ["awake"])]
    assert compare(pred, ann).accepted == 1


def test_grey_box_given_its_class_counts_as_class_picked():
    """Day 0 of a project with new classes: faces are found without a class (grey boxes). A person
    who keeps the box and picks its class relabelled it, and its box was right: class_picked."""
    grey = PRED[3]
    ann = [region(grey["id"], 5, 60, 10, 12, ["sleep"], origin="prediction-changed")]
    c = compare([grey, PRED[0]], ann)
    assert (c.predicted, c.accepted, c.relabelled, c.class_picked, c.deleted) == (2, 0, 1, 1, 1)
    assert c.acceptance_rate == 0.0 and c.box_kept_rate == pytest.approx(0.5)
    assert compare(PRED[1:2], [region(PRED[1]["id"], 40, 12, 18, 22, ["sleep"])]).class_picked == 0  # had a class


def test_moved_and_relabelled_box_counts_as_moved_and_in_moved_relabelled():
    ann = [region(PRED[0]["id"], 12, 10, 20, 25, ["sleep"])]
    c = compare(PRED[:1], ann)
    assert (c.moved, c.moved_relabelled, c.relabelled, c.accepted) == (1, 1, 0, 0)


def test_resize_just_under_tolerance_is_unchanged_and_just_over_is_moved():
    tol = acceptance.BOX_TOLERANCE_PCT
    ann = [region(PRED[0]["id"], 10, 10, 20 + tol * 0.9, 25, ["awake"])]
    assert compare(PRED[:1], ann).accepted == 1
    ann = [region(PRED[0]["id"], 10, 10, 20 + tol * 1.5, 25, ["awake"])]
    assert compare(PRED[:1], ann).moved == 1


def test_annotation_with_other_region_ids_is_paired_by_iou():
    """An annotation made through the API (new ids): boxes are paired by IoU >= 0.1."""
    ann = [region("new1", 10, 10, 20, 25, ["awake"]),      # same box as PRED[0]
           region("new2", 41, 12, 18, 22, ["awake"]),      # PRED[1] nudged
           region("new3", 80, 80, 5, 5, ["sleep"])]        # overlaps nothing: drawn
    c = compare(PRED, ann)
    assert (c.accepted, c.moved, c.deleted, c.drawn) == (1, 1, 2, 1)


def test_box_drawn_in_the_editor_is_never_paired_with_a_deleted_prediction():
    """The editor marks regions a person draws "origin": "manual": drawn, even over a deleted pre-label."""
    ann = [region("Zq9wE1rT0y", 11, 11, 20, 25, ["awake"], origin="manual")]
    c = compare(PRED[:1], ann)
    assert (c.deleted, c.drawn, c.moved) == (1, 1, 0)


def test_per_region_choices_count_as_the_region_labels():
    """A per-region Choices item shares the region id; changing it is a relabel."""
    choice = {"id": PRED[0]["id"], "from_name": "eyes", "to_name": "image", "type": "choices",
              "value": {"x": 10, "y": 10, "width": 20, "height": 25, "rotation": 0, "choices": ["open"]}}
    pred = [PRED[0], choice]
    ann = copy.deepcopy(pred)
    ann[1]["value"]["choices"] = ["closed"]
    assert compare(pred, ann).relabelled == 1
    assert compare(pred, copy.deepcopy(pred)).accepted == 1


def ls_task(tid, predictions, annotations):
    return {"id": tid, "data": {"image": f"/data/upload/1/{tid}.jpg"}, "project": 1,
            "predictions": predictions, "annotations": annotations}


def ls_prediction(pid, version, result):
    return {"id": pid, "model_version": version, "score": 0.6, "result": result, "task": 1, "project": 1}


def ls_annotation(aid, result, parent=None, cancelled=False):
    return {"id": aid, "result": result, "parent_prediction": parent, "parent_annotation": None,
            "was_cancelled": cancelled, "ground_truth": False, "completed_by": 1, "task": 1, "project": 1}


def test_counts_by_model_version_skip_cancelled_and_count_annotations_without_prelabel():
    tasks = [
        ls_task(1, [ls_prediction(11, "v1", PRED), ls_prediction(12, "v2", PRED[:2])],
                [ls_annotation(101, edited_annotation(), parent=11),
                 ls_annotation(102, PRED[:2], parent=12),
                 ls_annotation(103, [], parent=11, cancelled=True)]),
        ls_task(2, [ls_prediction(13, "v2", PRED[:1])], [ls_annotation(104, [], parent=13),
                                                          ls_annotation(105, PRED[:1])]),
        ls_task(3, [], [ls_annotation(106, PRED[:1], parent=999)]),  # parent prediction deleted
    ]
    per, without = task_counts(tasks[0])
    assert set(per) == {"v1", "v2"} and without == 0
    total, without = project_counts(tasks)
    assert without == 1
    assert total["v1"] == Counts(annotations=1, predicted=4, accepted=1, relabelled=1, moved=1, deleted=1, drawn=1)
    assert total["v2"] == Counts(annotations=2, predicted=3, accepted=2, deleted=1)


def test_stored_counts_reach_rows_and_metrics(tmp_path):
    from backend.app import create_app

    settings = make_settings(tmp_path)
    store(settings, 5, {"v1": Counts(annotations=3, predicted=10, accepted=7, relabelled=1, moved=1, deleted=1,
                                     drawn=2)})
    store(settings, 6, {"v1": Counts(annotations=1, predicted=1, accepted=1)})
    rows = acceptance_rows(settings, 5, refresh_now=False)
    assert rows == [{"version": "v1", "annotations": 3, "predicted": 10, "accepted": 7, "relabelled": 1, "moved": 1,
                     "deleted": 1, "drawn": 2, "accepted %": "70.0", "choices predicted": 0, "choice accepted": 0,
                     "choice changed": 0, "choice removed": 0, "chosen by hand": 0, "choices accepted %": ""}]
    # a recount replaces the project's rows (a version whose annotations were deleted disappears)
    store(settings, 5, {"v2": Counts(annotations=1, predicted=2, accepted=2)})
    assert [r["version"] for r in acceptance_rows(settings, 5, refresh_now=False)] == ["v2"]
    # without an API key the recount fails with a clear log and the stored rows are shown
    assert acceptance_rows(settings, 6, refresh_now=True)[0]["accepted"] == 1
    assert acceptance.request_recount(settings, 6) is None  # no key: nothing started
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(acceptance.acceptance_table(acceptance_rows(settings, 5, refresh_now=False)))
    text = console.export_text()
    assert "accepted %" in text and "100.0" in text and "choice changed" not in text  # boxes only

    text = TestClient(create_app(settings), client=LOOPBACK).get("/metrics").text
    assert 'faceloop_prelabel_boxes{model_version="v2",outcome="accepted",project="5"} 2.0' in text
    assert 'faceloop_prelabel_annotations{model_version="v1",project="6"} 1.0' in text


# --- image-level Choices projects (label_config/awake_sleep_choices.xml) ----------------------------
CHOICES_XML = """<View>
  <Image name="image" value="$image"/>
  <Choices name="state" toName="image" choice="single-radio">
    <Choice value="awake"/>
    <Choice value="sleep"/>
  </Choices>
  <Choices name="quality" toName="image"><Choice value="blurry"/></Choices>
</View>"""


def choice(value, rid="Qm3kT9xZ0a", from_name="state", **extra):
    """An image-level Choices result item: as faceloop predicts it (backend.labels.choice_region, with
    ``score``) and as Label Studio 1.23.2 stores it in an annotation (``origin``, no score)."""
    return {"id": rid, "from_name": from_name, "to_name": "image", "type": "choices",
            "value": {"choices": [value] if isinstance(value, str) else value}, **extra}


def test_image_level_choice_accepted_changed_removed_or_chosen_by_hand():
    pred = [choice("sleep", score=0.81)]
    ann = [choice("sleep", origin="prediction")]
    assert compare(pred, ann, ["state"]) == Counts(annotations=1, choices_predicted=1, choices_accepted=1)
    changed = compare(pred, [choice("awake", origin="prediction-changed")], ["state"])
    assert (changed.choices_predicted, changed.choices_changed, changed.choices_accepted) == (1, 1, 0)
    assert compare(pred, [], ["state"]) == Counts(annotations=1, choices_predicted=1, choices_removed=1)
    # no face found: faceloop sent an empty result; the person picks the class
    assert compare([], [choice("awake", rid="hand00001", origin="manual")], ["state"]) == \
        Counts(annotations=1, choices_by_hand=1)
    # no box was predicted or drawn: the box counts stay 0
    assert (changed.predicted, changed.drawn, changed.deleted) == (0, 0, 0)
    assert changed.choice_acceptance_rate == 0.0 and compare(pred, ann, ["state"]).choice_acceptance_rate == 1.0


def test_only_the_projects_choices_control_counts():
    """Another image-level Choices (left to the person) and per-region choices are not the pre-label."""
    from backend.acceptance import choice_controls

    assert choice_controls(CHOICES_XML) == ("state",)
    from tests.helpers_unit import EXAMPLE_CONFIG

    assert choice_controls(EXAMPLE_CONFIG) == () and choice_controls("<View>") == ()
    pred = [choice("awake", score=0.7)]
    ann = [choice("awake"), choice("blurry", rid="hand00002", from_name="quality")]
    assert compare(pred, ann, ("state",)) == Counts(annotations=1, choices_predicted=1, choices_accepted=1)
    assert compare(pred, ann).choices_by_hand == 1  # None: every image-level control counts
    # a boxes project: its image-level choices are the person's own
    assert compare([PRED[0]], [PRED[0], choice("blurry", from_name="quality")], ()) == \
        Counts(annotations=1, predicted=1, accepted=1)


def test_choices_project_counts_by_model_version_from_label_studio_json():
    """tasks.list(fields="all") of a Choices project: the editor copied the prediction into the
    annotation (``parent_prediction``), keeping the result item's id."""
    tasks = [
        ls_task(1, [ls_prediction(21, "v1", [choice("sleep", rid="p21", score=0.62)])],
                [ls_annotation(201, [choice("sleep", rid="p21", origin="prediction")], parent=21)]),
        ls_task(2, [ls_prediction(22, "v1", [choice("awake", rid="p22", score=0.55)])],
                [ls_annotation(202, [choice("sleep", rid="p22", origin="prediction-changed")], parent=22)]),
        ls_task(3, [ls_prediction(23, "v2", [choice("awake", rid="p23", score=0.9)])],
                [ls_annotation(203, [], parent=23)]),
        ls_task(4, [ls_prediction(24, "v2", [])],  # no face found: empty result, score 0
                [ls_annotation(204, [choice("awake", rid="m204", origin="manual")], parent=24)]),
        ls_task(5, [ls_prediction(25, "v2", [choice("awake", rid="p25")])],
                [ls_annotation(205, [choice("awake", rid="p25")], parent=25, cancelled=True),
                 ls_annotation(206, [choice("sleep", rid="m206", origin="manual")])]),
    ]
    total, without = project_counts(tasks, ("state",))
    assert without == 1
    assert total["v1"] == Counts(annotations=2, choices_predicted=2, choices_accepted=1, choices_changed=1)
    assert total["v2"] == Counts(annotations=2, choices_predicted=1, choices_removed=1, choices_by_hand=1)


def test_choice_counts_reach_rows_table_and_metrics(tmp_path):
    from rich.console import Console

    from backend.app import create_app

    settings = make_settings(tmp_path)
    store(settings, 8, {"v1": Counts(annotations=5, choices_predicted=4, choices_accepted=3, choices_changed=1,
                                     choices_by_hand=1)})
    rows = acceptance_rows(settings, 8, refresh_now=False)
    assert {k: rows[0][k] for k in acceptance.CHOICE_COLUMNS} == {
        "version": "v1", "annotations": 5, "choices predicted": 4, "choice accepted": 3, "choice changed": 1,
        "choice removed": 0, "chosen by hand": 1, "choices accepted %": "75.0"}
    console = Console(record=True, width=160)
    console.print(acceptance.acceptance_table(rows))
    text = console.export_text()
    assert "image-level choices" in text and "75.0" in text and "relabelled" not in text  # no box table
    text = TestClient(create_app(settings), client=LOOPBACK).get("/metrics").text
    assert 'faceloop_prelabel_choices{model_version="v1",outcome="accepted",project="8"} 3.0' in text
    assert 'faceloop_prelabel_choices{model_version="v1",outcome="by_hand",project="8"} 1.0' in text
    assert 'faceloop_prelabel_boxes{model_version="v1",outcome="predicted",project="8"} 0.0' in text


def test_class_confusion_of_the_evaluation():
    """ml_worker.evaluation.confusion: true class x predicted class over faces found at IoU >= 0.5."""
    from ml_worker.evaluation import GTFace, PredFace, confusion

    gts = [GTFace((0, 0, 10, 10), "awake"), GTFace((20, 0, 30, 10), "Sleep"), GTFace((40, 0, 50, 10), "awake")]
    preds = [PredFace((0, 0, 10, 10), "awake", 0.9), PredFace((20, 0, 30, 11), "awake", 0.8),
             PredFace((60, 60, 70, 70), "sleep", 0.7), PredFace((41, 0, 50, 10), None, 0.6)]
    c = confusion([(preds, gts), ([], [GTFace((0, 0, 5, 5), "sleep")])])
    assert c["labels"] == ["Sleep", "awake", "(no class)"]
    assert c["matrix"] == [[0, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert c["missed"] == {"Sleep": 1} and c["false_boxes"] == {"Sleep": 1}


@pytest.mark.e2e
def test_counts_from_a_real_label_studio(stack, tmp_path):
    """A prediction, an annotation started from it (parent_prediction) and one without, on a real
    Label Studio: the recount reads them through the SDK."""
    from label_studio_sdk import LabelStudio

    from tests.helpers_unit import EXAMPLE_CONFIG

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    p = client.projects.create(title="acceptance", label_config=EXAMPLE_CONFIG)
    first = EXAMPLE_CONFIG.split('<Label value="')[1].split('"')[0]
    pred = [region("aaaa000001", 10, 10, 20, 25, [first]), region("aaaa000002", 50, 10, 20, 25, [first])]
    t = client.tasks.create(project=p.id, data={"image": "http://127.0.0.1:9/none.jpg"})
    pr = client.predictions.create(task=t.id, model_version="vtest", score=0.5, result=pred)
    client.annotations.create(id=t.id, result=[pred[0], region("hand000001", 80, 80, 10, 10, [first])],
                              parent_prediction=pr.id)
    t2 = client.tasks.create(project=p.id, data={"image": "http://127.0.0.1:9/none2.jpg"})
    client.annotations.create(id=t2.id, result=[region("hand000002", 80, 80, 10, 10, [first])])
    settings = make_settings(tmp_path, label_studio_url=stack.ls_url, label_studio_api_key=stack.api_key)
    counts = acceptance.refresh(settings, p.id)
    assert counts == {"vtest": Counts(annotations=1, predicted=2, accepted=1, deleted=1, drawn=1)}
    assert acceptance.without_prelabel(p.id) == 1
    assert acceptance_rows(settings, p.id, refresh_now=False)[0]["accepted %"] == "50.0"
    # counts just made are fresh: no recount; an annotation webhook asks for one
    assert acceptance.refresh_in_background(settings, p.id) is None
    pr2 = client.predictions.create(task=t2.id, model_version="vtest", score=0.5, result=pred[:1])
    client.annotations.create(id=t2.id, result=pred[:1], parent_prediction=pr2.id)
    acceptance.request_recount(settings, p.id).join(60)
    assert acceptance_rows(settings, p.id, refresh_now=False)[0]["accepted"] == 2


@pytest.mark.e2e
def test_choice_counts_from_a_real_label_studio(stack, tmp_path):
    """A Choices project on a real Label Studio: the recount reads the project's Choices control
    from its label config and counts a kept, a changed and a hand-made choice."""
    from label_studio_sdk import LabelStudio

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    p = client.projects.create(title="acceptance choices", label_config=CHOICES_XML)
    made = []
    for k, (predicted, chosen) in enumerate([("sleep", "sleep"), ("awake", "sleep"), (None, "awake")]):
        t = client.tasks.create(project=p.id, data={"image": f"http://127.0.0.1:9/c{k}.jpg"})
        result = [choice(predicted, rid=f"pred{k:06d}")] if predicted else []
        pr = client.predictions.create(task=t.id, model_version="vchoice", score=0.5, result=result)
        ann = [choice(chosen, rid=f"pred{k:06d}" if predicted else f"hand{k:06d}"),
               choice("blurry", rid=f"qual{k:06d}", from_name="quality")]  # the person's own control
        made.append(client.annotations.create(id=t.id, result=ann, parent_prediction=pr.id))
    settings = make_settings(tmp_path, label_studio_url=stack.ls_url, label_studio_api_key=stack.api_key)
    counts = acceptance.refresh(settings, p.id)
    assert counts == {"vchoice": Counts(annotations=3, choices_predicted=2, choices_accepted=1, choices_changed=1,
                                        choices_by_hand=1)}
    assert acceptance_rows(settings, p.id, refresh_now=False)[0]["choices accepted %"] == "50.0"
