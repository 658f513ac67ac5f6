"""Image-level Choices configs (issue 11 item 4): parsing, the Choices prediction, the refusal of
configs faceloop cannot serve, the dataset built from choices, image-level evaluation and the gate.

Fast tests use a stand-in model whose detections are written by hand (the rule under test is
which face the class comes from, not the detector); the ``/setup``/``/predict`` tests and the
``slow`` test use the shipped model on real images.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.app import CANNOT_SERVE, REFUSED_PREFIX, create_app, refusal_path
from backend.config import DEFAULT_MODEL_PATH, REPO_ROOT
from backend.labels import LabelConfigError, ProjectSchema
from backend.lsapi import SnapshotTask
from backend.predict import TaskPrediction, analyse_choice, main_face, predict_tasks, to_ls_prediction
from backend.uncertainty import joint, margin
from facemodels.detector import Detection, ImageDetections
from tests.conftest import AWAKE_SLEEP, require_data
from tests.helpers_unit import CHOICES_CONFIG, POLYGON_CONFIG, config_text, local_url, make_settings, write_jpeg

LOOPBACK = ("127.0.0.1", 50000)
AWAKE_SLEEP_CHOICES = config_text("awake_sleep_choices")
SHARED_FACES = REPO_ROOT.parent / "shared" / "data" / "expressions" / "images"


def _det(box, face_conf, probs):
    p = np.asarray(probs, float)
    return Detection(tuple(map(float, box)), float(face_conf * p.max()), int(p.argmax()), p, float(face_conf))


class StandIn:
    """A two-stage model stand-in: ``detect`` returns the detections given per image, found by the
    image's mean red value (JPEG keeps it within a few levels), nearest key wins."""

    def __init__(self, names, per_image, face_threshold=0.5):
        self.names, self.per_image, self.face_threshold = list(names), per_image, face_threshold
        self.calls = []

    def detect(self, images, conf, imgsz=256, batch=16, embed=False):
        self.calls.append(conf)
        out = []
        for im in images:
            key = min(self.per_image, key=lambda k: abs(k - float(im[..., 0].mean()))) if self.per_image else None
            dets = [d for d in self.per_image.get(key, []) if d.face_conf >= conf]
            out.append(ImageDetections(im.shape[1], im.shape[0], dets, np.ones(4) / 2 if embed else None))
        return out


# --- parsing -------------------------------------------------------------------------------
def test_choices_config_parses_as_image_level():
    s = ProjectSchema.parse(AWAKE_SLEEP_CHOICES)
    assert (s.kind, s.is_choices, s.from_name, s.to_name, s.value_key) == ("choices", True, "state", "image", "image")
    assert s.labels == ["awake", "sleep"]
    assert ProjectSchema.parse(config_text("awake_sleep")).kind == "boxes"


def test_rectanglelabels_win_over_choices_and_per_region_choices_are_not_image_level():
    both = """<View><Image name="image" value="$image"/>
      <Choices name="c" toName="image"><Choice value="x"/></Choices>
      <RectangleLabels name="face" toName="image"><Label value="A"/></RectangleLabels></View>"""
    assert ProjectSchema.parse(both).kind == "boxes"
    per_region = """<View><Image name="image" value="$image"/>
      <Choices name="c" toName="image" perRegion="true"><Choice value="x"/></Choices></View>"""
    with pytest.raises(LabelConfigError, match="no <RectangleLabels> control on an <Image> and no image-level"):
        ProjectSchema.parse(per_region)


@pytest.mark.parametrize("cfg, words", [
    (POLYGON_CONFIG, ["PolygonLabels", "face boxes (RectangleLabels) or the image's class (Choices)"]),
    ("""<View><Image name="image" value="$image"/><TextArea name="t" toName="image"/></View>""", ["TextArea"]),
    ("""<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="x"/></Choices></View>""",
     ["no Image tag", "Text"]),
    ("""<View><Image name="a" value="$a"/><Image name="b" value="$b"/>
        <Choices name="c" toName="a"><Choice value="x"/></Choices></View>""", ["2 Image tags", '"a"', '"b"']),
    ("""<View><Image name="image" value="$image"/><Choices name="c" toName="image"/></View>""",
     ['<Choices name="c"> has no <Choice> children']),
])
def test_configs_faceloop_cannot_serve_say_why(cfg, words):
    with pytest.raises(LabelConfigError) as e:
        ProjectSchema.parse(cfg)
    for w in words:
        assert w in str(e.value)


def test_choice_region_and_reading_a_choice_back():
    s = ProjectSchema.parse(AWAKE_SLEEP_CHOICES)
    r = s.choice_region("Sleep", 0.87654)
    assert r["from_name"] == "state" and r["to_name"] == "image" and r["type"] == "choices"
    assert r["value"] == {"choices": ["sleep"]} and r["score"] == 0.8765 and r["id"]
    assert "score" not in s.choice_region("awake")
    with pytest.raises(KeyError):
        s.choice_region("dreaming")
    assert s.choice_from_result([r]) == (1, [])
    other = {"from_name": "other", "type": "choices", "value": {"choices": ["awake"]}}
    idx, problems = s.choice_from_result([other])
    assert idx is None and "no choice" in problems[0]
    idx, problems = s.choice_from_result([{**r, "value": {"choices": ["dreaming"]}}])
    assert idx is None and "'dreaming' is not in the project's labels" in problems[0]
    multi = {**r, "value": {"choices": ["dreaming", "awake"]}}
    assert s.choice_from_result([multi]) == (0, [])  # choice="multiple": the first known value


# --- the Choices prediction ------------------------------------------------------------------
def test_main_face_is_the_largest_face_at_the_threshold():
    small_sure = _det((0, 0, 10, 10), 0.99, [0.9, 0.1])
    large = _det((20, 20, 60, 60), 0.6, [0.2, 0.8])
    larger_unsure = _det((0, 0, 100, 100), 0.3, [0.5, 0.5])
    assert main_face([small_sure, large, larger_unsure], 0.5) is large
    assert main_face([small_sure, large, larger_unsure], 0.2) is larger_unsure
    assert main_face([larger_unsure], 0.5) is None
    twin = _det((20, 20, 60, 60), 0.7, [0.5, 0.5])  # same area: the more confident one
    assert main_face([large, twin], 0.5) is twin


def test_analyse_choice_gives_the_main_faces_class_and_its_uncertainty():
    s = ProjectSchema.parse(AWAKE_SLEEP_CHOICES)
    det = ImageDetections(200, 100, [_det((0, 0, 10, 10), 0.95, [0.9, 0.1]), _det((20, 20, 80, 80), 0.8, [0.3, 0.7])])
    boxes, face, unc = analyse_choice(det, s, ["awake", "sleep"], 0.5)
    assert face.label == "sleep" and face.score == pytest.approx(0.8 * 0.7)
    assert len(boxes) == 2 and unc.basis == "boxes" and unc.n_boxes == 2
    assert unc.margin == pytest.approx(joint(margin(np.array([[0.3, 0.7]])), np.array([0.8]))[0])
    # no face at the threshold: no choice, most uncertain
    _, face, unc = analyse_choice(det, s, ["awake", "sleep"], 0.99)
    assert face is None and (unc.margin, unc.basis) == (1.0, "none")
    # a model that knows none of the project's classes (the shipped expressions): no choice
    _, face, unc = analyse_choice(det, s, ["happy", "sad"], 0.5)
    assert face is None and unc.basis == "unknown_classes" and unc.n_boxes == 2


def test_to_ls_prediction_sends_one_choices_result_with_a_score():
    s = ProjectSchema.parse(AWAKE_SLEEP_CHOICES)
    det = ImageDetections(200, 100, [_det((20, 20, 80, 80), 0.8, [0.3, 0.7])])
    boxes, face, unc = analyse_choice(det, s, ["awake", "sleep"], 0.5)
    p = TaskPrediction(7, boxes, 200, 100, unc, choice=face.label, choice_score=face.score)
    d = to_ls_prediction(p, s, "p1-v1", "margin")
    assert d["model_version"] == "p1-v1" and d["score"] == pytest.approx(1 - unc.margin, abs=1e-6)
    assert [(r["type"], r["from_name"], r["to_name"], r["value"]) for r in d["result"]] == [
        ("choices", "state", "image", {"choices": ["sleep"]})]
    assert d["result"][0]["score"] == pytest.approx(0.56, abs=1e-4)
    none = TaskPrediction(8, [], 200, 100, analyse_choice(ImageDetections(200, 100, []), s, ["awake", "sleep"], 0.5)[2])
    assert to_ls_prediction(none, s, "p1-v1", "margin") == {"model_version": "p1-v1", "score": 0.0, "result": []}


def test_predict_tasks_with_a_choices_config(tmp_path):
    """The serve path end to end with a stand-in model: images are read, faces chosen, errors kept per task."""
    root = tmp_path / "docs"
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name, colour in (("one.jpg", 20), ("two.jpg", 40), ("none.jpg", 60)):
        # textured (+-15 levels): a flat image's boxes are dropped as plain bands (backend.predict.drop_uniform)
        Image.fromarray((colour + rng.integers(-15, 16, (90, 120, 1)) * np.ones(3, int)).astype(np.uint8)).save(root / name)
    model = StandIn(["awake", "sleep"], {20: [_det((10, 10, 50, 50), 0.9, [0.8, 0.2])],
                                         40: [_det((0, 0, 20, 20), 0.9, [0.9, 0.1]), _det((30, 10, 90, 80), 0.7, [0.1, 0.9])],
                                         60: []})
    settings = make_settings(tmp_path, local_files_document_root=str(root))
    s = ProjectSchema.parse(AWAKE_SLEEP_CHOICES)
    tasks = [{"id": i + 1, "data": {"image": local_url(n)}} for i, n in enumerate(["one.jpg", "two.jpg", "none.jpg"])]
    tasks.append({"id": 4, "data": {"image": local_url("missing.jpg")}})
    preds = predict_tasks(tasks, s, model, settings)
    assert [p.choice for p in preds] == ["awake", "sleep", None, None]
    assert preds[3].error and preds[2].error is None
    assert model.calls and all(c <= 0.5 for c in model.calls)  # candidates down to the threshold
    out = [to_ls_prediction(p, s, "v", "margin") for p in preds]
    assert out[1]["result"][0]["value"]["choices"] == ["sleep"] and out[2]["result"] == []
    assert "result" not in out[3] and "error" in out[3]


# --- /setup and /predict on the backend ------------------------------------------------------
@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    real = sorted(SHARED_FACES.glob("*/*.jpg"))[:1] if SHARED_FACES.exists() else []
    if real:
        shutil.copyfile(real[0], root / "face.jpg")
    else:
        write_jpeg(root / "face.jpg", width=80, height=80)
    settings = make_settings(tmp_path_factory.mktemp("var"), local_files_document_root=str(root))
    with TestClient(create_app(settings), client=LOOPBACK) as c:
        yield c


def _setup(client, schema, **kw):
    return client.post("/setup", json={"project": "3.1795968202", "schema": schema, "hostname": "http://x",
                                       "access_token": "x", "extra_params": {}}, **kw)


def test_setup_accepts_a_choices_config(backend):
    r = _setup(backend, AWAKE_SLEEP_CHOICES)
    assert r.status_code == 200 and r.json()["model_version"].startswith("base-")


def test_setup_refuses_with_a_redirect_that_spells_the_reason(backend):
    """Label Studio shows only the final URL of a failed /setup (docs/label_configs.md)."""
    r = _setup(backend, POLYGON_CONFIG, follow_redirects=False)
    assert r.status_code == 303
    assert f"{CANNOT_SERVE}:" in r.json()["detail"] and "PolygonLabels" in r.json()["detail"]
    loc = r.headers["location"]
    assert loc.startswith(REFUSED_PREFIX + "faceloop+cannot+serve+this+label+config:+label+config+has+no+RectangleLabels")
    assert "PolygonLabels" in loc and " " not in loc and "%" not in quote(loc, safe="/:+=@!$&'()*,;~-._")
    final = _setup(backend, POLYGON_CONFIG)  # a client that follows it (Label Studio does)
    assert final.status_code == 422 and final.url.path == loc
    assert "PolygonLabels" in final.json()["detail"] and final.json()["detail"].startswith(CANNOT_SERVE)


def test_refusal_path_is_plain_text_in_a_url():
    p = refusal_path('<Choices name="c"> has no <Choice> children — ü?#x', limit=400)
    assert p == REFUSED_PREFIX + "faceloop+cannot+serve+this+label+config:+Choices+name='c'+has+no+Choice+children+x"
    assert len(refusal_path("word " * 500)) <= len(REFUSED_PREFIX) + 400


def test_predict_with_a_choices_config_on_the_shipped_model(backend):
    """The shipped classifier knows expressions: a happy/sad Choices project gets a choice (or an
    empty result when no face is found), never boxes."""
    r = _setup(backend, CHOICES_CONFIG)
    assert r.status_code == 200
    r = backend.post("/predict", json={"tasks": [{"id": 1, "project": 3, "data": {"image": local_url("face.jpg")}}],
                                       "project": "3.1795968202", "label_config": CHOICES_CONFIG})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 1 and 0.0 <= res[0]["score"] <= 1.0
    for item in res[0]["result"]:
        assert item["type"] == "choices" and item["from_name"] == "mood" and item["to_name"] == "image"
        assert item["value"]["choices"][0] in ("happy", "sad") and 0 <= item["score"] <= 1
    if SHARED_FACES.exists():
        assert len(res[0]["result"]) == 1, "a real face gets a choice"


# --- dataset, evaluation, gate ---------------------------------------------------------------
def _choice_task(tid, image, choice, schema):
    return SnapshotTask(id=tid, data={"image": local_url(image)},
                        result=[{k: v for k, v in schema.choice_region(choice).items()}] if choice else [])


def test_choice_dataset_puts_the_choice_on_the_main_face(tmp_path):
    from ml_worker.dataset import build_dataset

    root = tmp_path / "docs"
    s = ProjectSchema.parse(AWAKE_SLEEP_CHOICES)
    per_image, tasks = {}, []
    for i in range(10):
        write_jpeg(root / f"{i}.jpg", width=100, height=80, color=(20 * i + 10, 0, 0))
        # every image: a small confident face and a larger one; image 9: no face at all
        per_image[20 * i + 10] = [] if i == 9 else [_det((0, 0, 10, 10), 0.95, [0.5, 0.5]), _det((20, 10, 70, 70), 0.7, [0.5, 0.5])]
        tasks.append(_choice_task(100 + i, f"{i}.jpg", "awake" if i % 2 else "sleep", s))
    tasks.append(SnapshotTask(id=200, data={"image": local_url("0.jpg")}, result=[]))  # submitted without a choice
    tasks.append(_choice_task(201, "gone.jpg", "awake", s))  # unreadable image
    settings = make_settings(tmp_path, local_files_document_root=str(root))
    model = StandIn(["awake", "sleep"], per_image, face_threshold=0.5)
    with pytest.raises(ValueError, match="needs the current model version"):
        build_dataset(tasks, s, tmp_path / "ds0", settings)
    ds = build_dataset(tasks, s, tmp_path / "ds", settings, model=model)
    assert ds.kind == "choices" and len(ds.samples) == 10
    assert {t for t, _ in ds.problems} == {200, 201}
    assert ds.no_face == [109]
    for smp in ds.samples:
        assert smp.label == (0 if (smp.task_id - 100) % 2 else 1)
        if smp.task_id != 109:
            assert smp.boxes == [(20.0, 10.0, 70.0, 70.0, smp.label)], "the larger face carries the choice"
    val = [smp for smp in ds.samples if smp.split == "val"]
    assert {smp.label for smp in val} == {0, 1}, "validation holds both classes"
    assert ds.val_labels() == len(val) and set(ds.train_ids) | set(ds.val_ids) == {100 + i for i in range(10)}
    lines = (tmp_path / "ds" / "labels" / ds.samples[0].split / f"task_{ds.samples[0].task_id}.txt").read_text()
    assert lines.startswith(f"{ds.samples[0].label} 0.45")  # the found face, with the image's class


def test_evaluate_choices_and_gate(tmp_path):
    from ml_worker.evaluation import evaluate_choices
    from ml_worker.training import gate_choices

    s = ProjectSchema.parse(AWAKE_SLEEP_CHOICES)
    settings = make_settings(tmp_path)
    imgs = [np.full((40, 40, 3), i, np.uint8) for i in (1, 2, 3, 4)]
    model = StandIn(["awake", "sleep"], {1: [_det((0, 0, 20, 20), 0.9, [0.8, 0.2])],
                                         2: [_det((0, 0, 20, 20), 0.9, [0.8, 0.2])],
                                         3: [_det((0, 0, 20, 20), 0.9, [0.1, 0.9])], 4: []})
    r = evaluate_choices(model, list(zip(imgs, ["awake", "sleep", "sleep", "awake"])), s, settings)
    assert (r["images"], r["correct"], r["no_choice"]) == (4, 2, 1)
    assert r["accuracy"] == 0.5 and r["class_accuracy"] == pytest.approx(2 / 3)
    assert r["confusion"]["labels"] == ["awake", "sleep", "(no class)"]
    assert r["confusion"]["matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    cur = {"accuracy": 0.25}
    assert gate_choices(r, cur, 4) == (True, "image accuracy 0.500 >= current 0.250 on the same 4 validation images")
    assert gate_choices(r, r, 4)[1].endswith("a tie: 4 validation images do not tell the versions apart, "
                                             "the newer labels win")
    assert gate_choices({"accuracy": 0.25}, {"accuracy": 0.5}, 4)[0] is False
    promote, why = gate_choices(r, cur, 0)
    assert not promote and "no labelled image" in why
    assert gate_choices({"accuracy": 0.0}, {"accuracy": 0.0}, 4)[0] is False
    assert gate_choices({"accuracy": 0.5}, None, 4)[0] is True
    assert gate_choices({"accuracy": 0.0}, None, 4)[0] is False


@pytest.mark.slow
def test_classifier_learns_from_choices_on_real_faces(tmp_path):
    """Real faces, the shipped detector: a dataset from choices, only the classifier fine-tuned
    (the detector's weights are the parent's), the candidate evaluated by image accuracy."""
    from facemodels.detector import ModelCache
    from facemodels.two_stage import read_bundle
    from ml_worker.dataset import build_dataset
    from ml_worker.evaluation import evaluate_choices
    from ml_worker.training import train_two_stage

    data = require_data(AWAKE_SLEEP)
    s = ProjectSchema.parse(AWAKE_SLEEP_CHOICES)
    from backend.demo import dataset_names, ground_truth_boxes

    names = dataset_names(data)
    files = sorted((data / "images" / "train").glob("*.jpg"))[::40][:12]
    tasks = []
    for i, f in enumerate(files):
        boxes, _, _ = ground_truth_boxes(f, names)
        big = max(boxes, key=lambda b: (b.x2 - b.x1) * (b.y2 - b.y1))  # the person's choice: the main face's class
        tasks.append(SnapshotTask(id=300 + i, data={"image": "/data/local-files/?d=" + quote(str(f.relative_to(data)))},
                                  result=[s.choice_region(big.label)]))
    settings = make_settings(tmp_path, local_files_document_root=str(data), imgsz=256, classifier_epochs=3)
    cache = ModelCache()
    base = cache.get(DEFAULT_MODEL_PATH)
    ds = build_dataset(tasks, s, tmp_path / "ds", settings, model=base)
    assert ds.problems == [] and len(ds.samples) == 12 and len(ds.no_face) <= 2
    out = train_two_stage(ds, s, DEFAULT_MODEL_PATH, settings, tmp_path / "job")
    b, parent = read_bundle(out["bundle"]), read_bundle(DEFAULT_MODEL_PATH)
    assert b["classes"] == ["awake", "sleep"] and b["detector_sha256"] == parent["detector_sha256"]
    assert b["face_threshold"] == parent["face_threshold"] and out["detector_seconds"] < 5
    val = [(smp.image, s.labels[smp.label]) for smp in ds.samples if smp.split == "val"]
    r = evaluate_choices(cache.get(out["bundle"]), val, s, settings)
    assert r["images"] == len(val) and 0.0 <= r["accuracy"] <= 1.0
    assert evaluate_choices(base, val, s, settings)["no_choice"] == len(val), "the shipped model knows no awake/sleep"


@pytest.mark.parametrize("extra", ["", "{\"a\": 1}", None, {"a": 1}])
def test_setup_takes_extra_params_as_the_connect_model_form_sends_them(backend, extra):
    """Label Studio's web form (Settings -> Model -> Connect Model) does not send a JSON object as
    ``extra_params`` when the field is left empty: /setup refused it (422 from the request schema,
    for every config), so a person could never connect faceloop through the form
    (tests/browser/test_connect_form.py)."""
    r = backend.post("/setup", json={"project": "3.1795968202", "schema": AWAKE_SLEEP_CHOICES, "extra_params": extra})
    assert r.status_code == 200, r.text
