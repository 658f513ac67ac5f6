"""Issue 9 §5: bad task values give a per-task error; the other tasks in the request still get
predictions (never a 500 for the whole request). Real shipped model, TestClient."""

from __future__ import annotations


import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.app import create_app
from tests.helpers_unit import config_text, local_url, make_settings, write_jpeg
from tests.security.conftest import LOOPBACK


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    write_jpeg(root / "good.jpg", width=96, height=64, color=(180, 150, 120))
    for side in (1, 15, 16):
        Image.new("RGB", (side, side), (120, 90, 70)).save(root / f"tiny{side}.png")
    Image.new("RGB", (400, 3), (120, 90, 70)).save(root / "strip.png")
    s = make_settings(tmp_path_factory.mktemp("var"), local_files_document_root=str(root))
    with TestClient(create_app(s), client=LOOPBACK, raise_server_exceptions=False) as c:
        assert c.post("/setup", json={"project": 1, "schema": config_text("awake_sleep")}).status_code == 200
        yield c


def _predict(client, images):
    tasks = [{"id": i, "project": 1, "data": {"image": u}} for i, u in enumerate(images, 1)]
    r = client.post("/predict", json={"tasks": tasks})
    assert r.status_code == 200, r.text
    return r.json()["results"]


@pytest.mark.parametrize("value,message", [(None, "is null"), ("", "empty string"), (5, "is int"),
                                           ({"url": "x"}, "is dict"), ([1], "is list"), (True, "is bool")])
def test_bad_image_value_is_a_task_error(client, value, message):
    # issue 9 §5: data.image = null failed the whole request with 500
    res = _predict(client, [local_url("good.jpg"), value, local_url("good.jpg")])
    assert "result" in res[0] and "result" in res[2]
    assert "result" not in res[1] and message in res[1]["error"], res[1]


def test_task_without_data_or_odd_ids(client):
    tasks = [{"id": True, "project": 1, "data": {"image": local_url("good.jpg")}}, {"id": -3, "project": 1},
             {"id": 2**70, "project": 1, "data": None}, "not a task"]
    r = client.post("/predict", json={"tasks": tasks})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        res = r.json()["results"]
        assert len(res) == 4 and "result" in res[0] and all("error" in x for x in res[1:])


@pytest.mark.parametrize("name,ok", [("tiny1.png", False), ("tiny15.png", False), ("strip.png", False),
                                     ("tiny16.png", True)])
def test_tiny_images_get_no_whole_image_box(client, name, ok):
    # issue 9 §5: a 1x1 image got a whole-image box at 0.70
    res = _predict(client, [local_url(name)])[0]
    if ok:
        assert "result" in res
    else:
        assert "result" not in res and "image is too small" in res["error"] and "minimum 16 px" in res["error"]


def test_16_bit_photos_through_predict_differ(client, tmp_path):
    # issue 9 §5: three different I;16 photos all got the same whole-image box at 0.57
    root = client.app.state.settings.local_files_document_root
    scores = []
    for seed in range(3):
        a = (np.random.default_rng(seed).random((64, 96)) * 30000 + seed * 10000).astype("<u2")
        Image.frombytes("I;16", (96, 64), a.tobytes()).save(f"{root}/g16_{seed}.png")
        scores.append(_predict(client, [local_url(f"g16_{seed}.png")])[0])
    for res in scores:
        assert "result" in res
        for region in res["result"]:
            v = region["value"]
            assert not (v["width"] > 99 and v["height"] > 99), region  # no whole-image box
