"""backend.labels: parsing label configs, mapping model classes to labels, regions for Label
Studio and YOLO boxes from annotations."""

from __future__ import annotations

import pytest

from backend.labels import Box, LabelConfigError, ProjectSchema
from tests.helpers_unit import EXAMPLE_CONFIG, POLYGON_CONFIG, config_text, rect_region

EXPRESSIONS = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt"]


# --- parse ------------------------------------------------------------------------------------
def test_parse_face_expressions_config():
    s = ProjectSchema.parse(config_text("face_expressions"))
    assert (s.from_name, s.to_name, s.value_key) == ("face", "image", "image")
    assert s.labels == EXPRESSIONS  # config order = class index order
    assert s.predicted_values == {}
    assert s.score_threshold == pytest.approx(0.25)


def test_parse_awake_sleep_config():
    s = ProjectSchema.parse(config_text("awake_sleep"))
    assert s.labels == ["awake", "sleep"]
    assert (s.from_name, s.to_name, s.value_key) == ("face", "image", "image")
    assert s.score_threshold == pytest.approx(0.25)


def test_parse_inline_with_predicted_values():
    s = ProjectSchema.parse(EXAMPLE_CONFIG)
    assert s.labels == ["Happy", "Sad", "Neutral", "Surprise"]
    assert s.predicted_values == {"Happy": ["happy", "smile"]}
    assert s.score_threshold == pytest.approx(0.4)


def test_parse_other_names_and_no_threshold():
    cfg = """<View><Image name="img" value="$photo"/>
      <RectangleLabels name="box" toName="img"><Label value="A"/><Label value="B"/></RectangleLabels></View>"""
    s = ProjectSchema.parse(cfg)
    assert (s.from_name, s.to_name, s.value_key) == ("box", "img", "photo")
    assert s.labels == ["A", "B"]
    assert s.score_threshold is None


@pytest.mark.parametrize("cfg", ["", "   \n "])
def test_parse_empty_config(cfg):
    with pytest.raises(LabelConfigError, match="empty"):
        ProjectSchema.parse(cfg)


@pytest.mark.parametrize("cfg", ["not xml at all", "<View><Image name='image' value='$image'/>"])
def test_parse_malformed_xml(cfg):
    with pytest.raises(LabelConfigError, match="not valid XML") as e:
        ProjectSchema.parse(cfg)
    assert isinstance(e.value, ValueError)  # callers may catch ValueError


def test_parse_config_without_rectanglelabels():
    with pytest.raises(LabelConfigError, match="no <RectangleLabels> control on an <Image>") as e:
        ProjectSchema.parse(POLYGON_CONFIG)
    assert "faceloop predicts face boxes" in str(e.value)


def test_parse_rectanglelabels_on_text_is_rejected():
    cfg = """<View><Text name="t" value="$t"/>
      <RectangleLabels name="box" toName="t"><Label value="A"/></RectangleLabels></View>"""
    with pytest.raises(LabelConfigError, match="no Image tag"):
        ProjectSchema.parse(cfg)


def test_parse_rectanglelabels_without_labels():
    cfg = """<View><Image name="image" value="$image"/><RectangleLabels name="face" toName="image"/></View>"""
    with pytest.raises(LabelConfigError, match="no <Label> children"):
        ProjectSchema.parse(cfg)


def test_parse_bad_threshold():
    cfg = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="face" toName="image" model_score_threshold="high"><Label value="A"/></RectangleLabels></View>"""
    with pytest.raises(LabelConfigError, match="model_score_threshold='high' is not a number"):
        ProjectSchema.parse(cfg)


# --- label_map --------------------------------------------------------------------------------
def test_label_map_exact():
    s = ProjectSchema.parse(config_text("face_expressions"))
    assert s.label_map(EXPRESSIONS) == dict(enumerate(EXPRESSIONS))


def test_label_map_case_insensitive_and_predicted_values():
    s = ProjectSchema.parse(EXAMPLE_CONFIG)  # Happy (predicted_values happy,smile), Sad, Neutral, Surprise
    model = ["happy", "SAD", "smile", "neutral", "angry", "Surprise", "contempt"]
    assert s.label_map(model) == {0: "Happy", 1: "Sad", 2: "Happy", 3: "Neutral", 5: "Surprise"}


def test_label_map_classes_the_config_lacks_are_absent():
    s = ProjectSchema.parse(config_text("awake_sleep"))
    assert s.label_map(EXPRESSIONS) == {}
    assert s.label_map(["sleep", "happy", "Awake"]) == {0: "sleep", 2: "awake"}


def test_label_map_predicted_values_win_over_exact_names():
    cfg = """<View><Image name="image" value="$image"/><RectangleLabels name="face" toName="image">
      <Label value="joy" predicted_values="happy"/><Label value="happy"/></RectangleLabels></View>"""
    s = ProjectSchema.parse(cfg)
    assert s.label_map(["happy"]) == {0: "joy"}


def test_class_index():
    s = ProjectSchema.parse(EXAMPLE_CONFIG)
    assert s.class_index("Sad") == 1
    assert s.class_index("surprise") == 3
    with pytest.raises(KeyError, match="not in the project's labels"):
        s.class_index("angry")


# --- region -----------------------------------------------------------------------------------
def test_region_fields():
    s = ProjectSchema.parse(config_text("face_expressions"))
    # 640x480 image, box (64, 48)-(256, 240): 10 %, 10 %, 30 %, 40 %
    r = s.region(Box(64, 48, 256, 240, label="happy", score=0.876543), 640, 480)
    assert r["from_name"] == "face" and r["to_name"] == "image" and r["type"] == "rectanglelabels"
    assert r["original_width"] == 640 and r["original_height"] == 480
    assert isinstance(r["original_width"], int)
    assert r["image_rotation"] == 0
    v = r["value"]
    assert v["x"] == pytest.approx(10.0) and v["y"] == pytest.approx(10.0)
    assert v["width"] == pytest.approx(30.0) and v["height"] == pytest.approx(40.0)
    assert v["rotation"] == 0
    assert v["rectanglelabels"] == ["happy"]
    assert r["score"] == pytest.approx(0.8765)
    assert isinstance(r["id"], str) and r["id"]
    assert "meta" not in r


def test_region_ids_are_unique():
    s = ProjectSchema.parse(config_text("face_expressions"))
    ids = {s.region(Box(0, 0, 10, 10, "sad", 0.5), 100, 100)["id"] for _ in range(200)}
    assert len(ids) == 200


def test_region_without_label():
    s = ProjectSchema.parse(config_text("awake_sleep"))
    r = s.region(Box(10, 20, 30, 40, label=None, score=0.9), 100, 200)
    assert r["value"]["rectanglelabels"] == []
    assert r["value"]["x"] == pytest.approx(10.0) and r["value"]["y"] == pytest.approx(10.0)
    assert r["value"]["width"] == pytest.approx(20.0) and r["value"]["height"] == pytest.approx(10.0)
    assert "pick one" in r["meta"]["text"][0]


def test_region_without_score_has_no_score_key():
    s = ProjectSchema.parse(config_text("awake_sleep"))
    assert "score" not in s.region(Box(0, 0, 5, 5, "awake"), 10, 10)


def test_region_clips_to_image():
    s = ProjectSchema.parse(config_text("awake_sleep"))
    v = s.region(Box(-10, -10, 60, 60, "awake", 0.5), 50, 50)["value"]
    assert (v["x"], v["y"], v["width"], v["height"]) == pytest.approx((0, 0, 100, 100))


# --- boxes_from_result ------------------------------------------------------------------------
def test_boxes_from_result_by_hand():
    s = ProjectSchema.parse(EXAMPLE_CONFIG)
    result = [
        # x 10 %, y 20 %, w 30 %, h 40 % -> cx .25, cy .4, w .3, h .4; "Sad" is class 1
        rect_region(10, 20, 30, 40, "Sad", rid="a"),
        # case-insensitive label
        rect_region(0, 0, 50, 50, "neutral", rid="b"),
        # other controls are ignored, not problems
        {"id": "c", "from_name": "mood", "to_name": "image", "type": "choices", "value": {"choices": ["x"]}},
    ]
    boxes, problems = s.boxes_from_result(result)
    assert problems == []
    assert boxes[0] == pytest.approx((0.25, 0.4, 0.3, 0.4, 1))
    assert boxes[1] == pytest.approx((0.25, 0.25, 0.5, 0.5, 2))
    assert len(boxes) == 2


def test_boxes_from_result_empty_is_background():
    s = ProjectSchema.parse(EXAMPLE_CONFIG)
    assert s.boxes_from_result([]) == ([], [])
    assert s.boxes_from_result(None) == ([], [])


def test_boxes_from_result_problems():
    s = ProjectSchema.parse(EXAMPLE_CONFIG)
    result = [
        rect_region(10, 10, 10, 10, "angry", rid="unknown"),
        rect_region(10, 10, 10, 10, None, rid="nolabel"),
        rect_region(10, 10, 0, 10, "Sad", rid="flat"),
        {"id": "broken", "from_name": "face", "type": "rectanglelabels", "value": {"rectanglelabels": ["Sad"]}},
        rect_region(10, 10, 10, 10, "Happy", rid="good"),
    ]
    boxes, problems = s.boxes_from_result(result)
    assert boxes == [pytest.approx((0.15, 0.15, 0.1, 0.1, 0))]
    assert len(problems) == 4
    assert "unknown" in problems[0] and "angry" in problems[0]
    assert problems[1] == "region nolabel has no label"
    assert problems[2] == "region flat has zero size"
    assert problems[3].startswith("region broken:")


def test_boxes_from_result_rotated_uses_original_size():
    # 200x100 image, box x=50 %, y=10 %, 10 % x 10 % (20 x 10 px) rotated 90° clockwise about its
    # top-left corner -> (90, 10)-(100, 30) px -> cx .475, cy .2, w .05, h .2 (see test_geometry)
    s = ProjectSchema.parse(config_text("awake_sleep"))
    r = rect_region(50, 10, 10, 10, "sleep", rotation=90, original_width=200, original_height=100)
    boxes, problems = s.boxes_from_result([r])
    assert problems == []
    assert boxes == [pytest.approx((0.475, 0.2, 0.05, 0.2, 1))]


def test_boxes_from_result_negative_size_is_the_same_box():
    # a box drawn upward and leftward: LS stores the anchor where the drag started and a negative
    # width/height; it is the box (10, 10)-(30, 40) % and must not be left out of training
    s = ProjectSchema.parse(EXAMPLE_CONFIG)
    r = rect_region(30, 40, -20, -30, "Happy", rid="up-left")
    boxes, problems = s.boxes_from_result([r])
    assert problems == []
    assert boxes == [pytest.approx((0.2, 0.25, 0.2, 0.3, 0))]
