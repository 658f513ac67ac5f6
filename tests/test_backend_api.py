"""The backend's HTTP API (FastAPI TestClient) with the real shipped model and a SQLite database
in a temporary folder; Redis is deliberately unreachable. Checks structure, not detections (the
shipped model may be an interim checkpoint)."""

from __future__ import annotations

import base64
import shutil
import time

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from backend.app import create_app
from backend.config import DEFAULT_MODEL_PATH, REPO_ROOT
from backend.db import session_scope
from backend.hashing import file_sha256
from backend.models import Project, TrainingJob, WebhookEvent
from tests.helpers_unit import POLYGON_CONFIG, config_text, jpeg_bytes, local_url, make_settings, write_jpeg

PROJECT = "1.1795968202"  # Label Studio's "<id>.<created_ts>"
EXPRESSIONS = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt"]
SHARED_FACES = REPO_ROOT.parent / "shared" / "data" / "expressions" / "images"

#: Webhooks must be answered fast (Label Studio waits 1 s); generous for a loaded 2-core machine.
WEBHOOK_BUDGET_S = 3.0
#: Without BASIC_AUTH_USER the backend answers loopback clients only (TestClient's default is "testclient").
LOOPBACK = ("127.0.0.1", 50000)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    write_jpeg(root / "good.jpg", width=96, height=64, color=(180, 150, 120))
    write_jpeg(root / "rotated.jpg", width=120, height=60, orientation=6)  # displayed 60 x 120
    (root / "notimage.jpg").write_text("this is a text file with a .jpg name")
    full = jpeg_bytes(96, 64)
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    real = sorted(SHARED_FACES.glob("*/*.jpg"))[:1] if SHARED_FACES.exists() else []
    if real:  # a real face, when the public data is there: more likely to give regions to check
        shutil.copyfile(real[0], root / "face.jpg")
    else:
        write_jpeg(root / "face.jpg", width=80, height=80)
    return root


@pytest.fixture(scope="module")
def settings(tmp_path_factory, images):
    return make_settings(tmp_path_factory.mktemp("var"), local_files_document_root=str(images),
                         retrain_min_annotations=3)


@pytest.fixture(scope="module")
def client(settings):
    """One app (and so one loaded model) for the whole module."""
    with TestClient(create_app(settings), client=LOOPBACK) as c:
        yield c


@pytest.fixture(scope="module")
def base_version():
    return f"base-{file_sha256(DEFAULT_MODEL_PATH)[:8]}"


def _setup(client, project=PROJECT, schema=None):
    return client.post("/setup", json={"project": project, "schema": schema or config_text("face_expressions"),
                                       "hostname": "http://localhost:8080", "access_token": "x",
                                       "extra_params": {}})


def _jobs(settings, pid):
    with session_scope(settings.database_url) as s:
        return [(j.id, j.state, j.trigger) for j in
                s.exec(select(TrainingJob).where(TrainingJob.project_id == pid).order_by(TrainingJob.id)).all()]


# --- /health, /setup --------------------------------------------------------------------------
def test_health(client):
    for path in ("/health", "/"):
        r = client.get(path)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["status"] == "UP"
        assert r.json()["model_class"] == "FaceModel"


def test_setup_returns_base_version(client, base_version):
    r = _setup(client)
    assert r.status_code == 200, r.text
    assert r.json() == {"model_version": base_version}
    assert _setup(client, project=1).json() == {"model_version": base_version}  # plain id, same project


def test_setup_without_rectanglelabels_is_422(client):
    r = _setup(client, project="2.1", schema=POLYGON_CONFIG)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "faceloop cannot serve this label config" in detail and "RectangleLabels" in detail


@pytest.mark.parametrize("schema", ["<View><Image", "not xml"])
def test_setup_malformed_config_is_422(client, schema):
    r = _setup(client, project="2.1", schema=schema)
    assert r.status_code == 422 and "not valid XML" in r.json()["detail"]


def test_setup_bad_project_id_is_422(client):
    r = _setup(client, project="abc")
    assert r.status_code == 422 and "project must look like" in r.json()["detail"]


# --- /predict ---------------------------------------------------------------------------------
def _task(tid, url, project=1):
    return {"id": tid, "data": {"image": url}, "meta": {}, "project": project, "annotations": [], "predictions": []}


def _check_region(region, width, height, labels):
    assert region["from_name"] == "face" and region["to_name"] == "image" and region["type"] == "rectanglelabels"
    assert (region["original_width"], region["original_height"]) == (width, height)
    v = region["value"]
    for k in ("x", "y", "width", "height"):
        assert 0.0 <= v[k] <= 100.0
    assert v["x"] + v["width"] <= 100.0 + 1e-6 and v["y"] + v["height"] <= 100.0 + 1e-6
    assert set(v["rectanglelabels"]) <= set(labels)
    assert 0.0 <= region["score"] <= 1.0
    assert region["id"]


def test_predict_one_entry_per_task_in_order(client, base_version):
    setup_version = _setup(client).json()["model_version"]
    tasks = [
        _task(11, local_url("good.jpg")),
        _task(12, local_url("missing.jpg")),
        _task(13, local_url("notimage.jpg")),
        _task(14, local_url("truncated.jpg")),
        _task(15, local_url("rotated.jpg")),
        {"id": 16, "data": {"text": "no image field"}, "project": 1},
        _task(17, "s3://bucket/face.jpg"),
        _task(18, local_url("face.jpg")),
    ]
    r = client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": config_text("face_expressions"),
                                      "params": {"login": None, "password": None, "context": None}})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(tasks)
    for res in results:
        assert res["model_version"] == setup_version == base_version

    failed = {12: "local file not found", 13: "not a readable image", 14: "broken image data",
              16: "task has no data.image", 17: "unsupported image URL"}
    for task, res in zip(tasks, results):
        if task["id"] in failed:
            assert "result" not in res and "score" not in res
            assert failed[task["id"]] in res["error"], res
        else:
            assert "error" not in res
            assert isinstance(res["result"], list)
            assert isinstance(res["score"], float) and 0.0 <= res["score"] <= 1.0
    sizes = {11: (96, 64), 15: (60, 120)}  # the rotated image's displayed size
    for task, res in zip(tasks, results):
        for region in res.get("result", []):
            w, h = sizes.get(task["id"], (region["original_width"], region["original_height"]))
            _check_region(region, w, h, EXPRESSIONS)
    ids = [reg["id"] for res in results for reg in res.get("result", [])]
    assert len(ids) == len(set(ids))


def test_predict_errors_are_listed_on_the_status_page(client, settings, base_version):
    """Label Studio drops a result-less answer and shows the person nothing (docs/label_configs.md):
    the task's error goes to the status page (linked from the project), and leaves when it predicts."""
    from backend.status import project_context

    _setup(client)
    body = {"project": PROJECT, "label_config": config_text("face_expressions")}
    r = client.post("/predict", json={**body, "tasks": [_task(31, local_url("truncated.jpg")),
                                                        _task(32, local_url("good.jpg"))]})
    assert r.status_code == 200 and "error" in r.json()["results"][0]
    errors = {e["task"]: e for e in project_context(settings, 1)["errors"]}
    assert "broken image data" in errors[31]["error"] and errors[31]["version"] == base_version
    assert 32 not in errors
    assert "broken image data" in client.get("/status/1").text
    client.post("/predict", json={**body, "tasks": [_task(31, local_url("good.jpg"))]})  # the image was fixed
    assert 31 not in {e["task"] for e in project_context(settings, 1)["errors"]}


def test_predict_project_without_known_classes_scores_zero(client):
    # The base model knows none of awake/sleep: faces (if any) come unlabelled, and every image is
    # maximally uncertain (basis unknown_classes), so score = 1 - 1 = 0.
    _setup(client, project="3.1", schema=config_text("awake_sleep"))
    tasks = [_task(21, local_url("good.jpg"), project=3), _task(22, local_url("face.jpg"), project=3)]
    r = client.post("/predict", json={"tasks": tasks, "label_config": config_text("awake_sleep")})
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        assert res["score"] == 0.0
        for region in res["result"]:
            assert region["value"]["rectanglelabels"] == []
            assert "pick one" in region["meta"]["text"][0]


def test_predict_uses_stored_config_when_none_sent(client):
    _setup(client, project="4.1", schema=config_text("awake_sleep"))
    r = client.post("/predict", json={"tasks": [_task(31, local_url("good.jpg"), project=4)]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["score"] == 0.0  # awake/sleep: unknown classes, see above


def test_predict_empty_tasks(client):
    r = client.post("/predict", json={"tasks": []})
    assert r.status_code == 200 and r.json() == {"results": []}


@pytest.mark.parametrize("body", [{"tasks": "nope"}, {"tasks": [1, 2]}, {"project": "1.2"}, [1, 2, 3]])
def test_predict_malformed_body_is_422(client, body):
    assert client.post("/predict", json=body).status_code == 422


def test_predict_non_json_body_is_422(client):
    r = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_predict_without_project_is_422(client):
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": local_url("good.jpg")}}],
                                      "label_config": config_text("face_expressions")})
    assert r.status_code == 422 and "project must look like" in r.json()["detail"]


def test_predict_with_unusable_config_is_422(client):
    r = client.post("/predict", json={"tasks": [_task(1, local_url("good.jpg"), project=5)],
                                      "label_config": POLYGON_CONFIG})
    assert r.status_code == 422 and "RectangleLabels" in r.json()["detail"]


# --- /webhook ---------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"not json", b"{\"action\": ", b""])
def test_webhook_non_json_is_400(client, body):
    r = client.post("/webhook", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]


@pytest.mark.parametrize("payload", [[1, 2], {"project": {"id": 1}}, {"action": 5}])
def test_webhook_without_action_is_400(client, payload):
    r = client.post("/webhook", json=payload)
    assert r.status_code == 400 and "'action'" in r.json()["detail"]


def test_webhook_unknown_action_is_recorded_and_ignored(client, settings):
    _setup(client, project=40)
    r = client.post("/webhook", json={"action": "SOMETHING_NEW", "project": {"id": 40}})
    assert r.status_code == 200 and r.json() == {"status": "ignored", "action": "SOMETHING_NEW"}
    r = client.post("/webhook", json={"action": "SOMETHING_NEW"})
    assert r.status_code == 200 and r.json()["status"] == "ignored"
    with session_scope(settings.database_url) as s:
        assert s.exec(select(WebhookEvent).where(WebhookEvent.project_id == 40)).first().action == "SOMETHING_NEW"


def test_start_training_with_broker_down_keeps_the_job(client, settings):
    _setup(client, project=41)
    project = {"id": 41, "title": "p", "label_config": config_text("awake_sleep"),
               "min_annotations_to_start_training": 0}
    t0 = time.perf_counter()
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": project})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["queued"] is True and body["joined_existing"] is False
    assert elapsed < WEBHOOK_BUDGET_S, f"START_TRAINING took {elapsed:.1f}s with Redis down"
    jobs = _jobs(settings, 41)
    assert [(j[0], j[1], j[2]) for j in jobs] == [(int(body["job"]), "queued", "start_training")]
    with session_scope(settings.database_url) as s:
        assert s.get(TrainingJob, jobs[0][0]).celery_id == ""  # never sent: the worker re-sends it

    r2 = client.post("/webhook", json={"action": "START_TRAINING", "project": project})
    assert r2.status_code == 200
    assert r2.json()["job"] == body["job"] and r2.json()["joined_existing"] is True
    assert len(_jobs(settings, 41)) == 1


def test_joined_job_that_was_never_sent_is_sent_again(client, settings, monkeypatch):
    # Redis down at the first request: the job is recorded but not sent. When a later request
    # joins it, it is sent then (the worker may never restart to re-send it); once sent, joining
    # requests send nothing more.
    from backend import events

    _setup(client, project=45)
    hook = {"action": "START_TRAINING", "project": {"id": 45}}
    job = int(client.post("/webhook", json=hook).json()["job"])
    sent = []
    monkeypatch.setattr(events, "enqueue", lambda _s, name, args: sent.append((name, args)) or "celery-123")
    r = client.post("/webhook", json=hook).json()
    assert (int(r["job"]), r["joined_existing"]) == (job, True)
    assert sent == [("faceloop.train", [job])]
    with session_scope(settings.database_url) as s:
        assert s.get(TrainingJob, job).celery_id == "celery-123"
    client.post("/webhook", json=hook)
    assert len(sent) == 1
    assert len(_jobs(settings, 45)) == 1


# the retrain trigger (switch, threshold, what counts): tests/test_retrain_trigger.py


def test_other_events_are_recorded(client, settings):
    _setup(client, project=44)
    for action in ("ANNOTATIONS_DELETED", "PROJECT_UPDATED"):
        r = client.post("/webhook", json={"action": action, "project": {"id": 44}, "annotations": [{"id": 1}]})
        assert r.status_code == 200 and r.json() == {"status": "recorded"}
    t0 = time.perf_counter()
    r = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 44}, "tasks": [{"id": 5}, {"id": 6}]})
    assert r.status_code == 200 and r.json() == {"status": "ok", "tasks": 2}
    assert time.perf_counter() - t0 < WEBHOOK_BUDGET_S
    with session_scope(settings.database_url) as s:
        actions = [e.action for e in s.exec(select(WebhookEvent).where(WebhookEvent.project_id == 44)).all()]
    assert actions == ["ANNOTATIONS_DELETED", "PROJECT_UPDATED", "TASKS_CREATED"]


# --- /versions, /metrics ----------------------------------------------------------------------
def test_versions(client, base_version):
    _setup(client)
    for r in (client.get("/versions", params={"project": PROJECT}), client.get("/versions", params={"project": 1}),
              client.get("/versions")):
        assert r.status_code == 200
        assert r.json() == {"versions": [base_version]}  # one name, even though several projects use it
    assert client.get("/versions", params={"project": 999}).json() == {"versions": []}


def test_metrics(client):
    client.post("/webhook", json={"action": "PING_FOR_METRICS"})
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE faceloop_predict_seconds histogram" in r.text
    assert 'faceloop_webhooks_total{action="PING_FOR_METRICS"} 1.0' in r.text
    assert "faceloop_predicted_tasks_total" in r.text


# --- auth (an app that never loads a model) ---------------------------------------------------
def _basic(user, pw):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def test_basic_auth_and_webhook_secret(tmp_path, images):
    s = make_settings(tmp_path, local_files_document_root=str(images), basic_auth_user="ls",
                      basic_auth_pass="pw", webhook_secret="s3cret")
    c = TestClient(create_app(s))  # no lifespan: no model warm-up
    assert c.get("/health").status_code == 401
    assert c.get("/health", headers=_basic("ls", "wrong")).status_code == 401
    assert c.get("/health", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert c.get("/health", headers=_basic("ls", "pw")).status_code == 200
    assert c.post("/setup", json={"project": 1, "schema": config_text("awake_sleep")}).status_code == 401
    hook = {"action": "PROJECT_UPDATED", "project": {"id": 1}}
    assert c.post("/webhook", json=hook).status_code == 401
    assert c.post("/webhook", json=hook, headers={"X-Faceloop-Secret": "nope"}).status_code == 401
    assert c.post("/webhook", json=hook, headers={"X-Faceloop-Secret": "s3cret"}).status_code == 200
    assert c.post("/webhook", json=hook, headers=_basic("ls", "pw")).status_code == 200  # START_TRAINING path


def test_non_ascii_credentials_are_401_not_500(tmp_path):
    s = make_settings(tmp_path, basic_auth_user="ls", basic_auth_pass="pw", webhook_secret="s3cret")
    c = TestClient(create_app(s), raise_server_exceptions=False)
    assert c.get("/health", headers=_basic("jöhn", "pw")).status_code == 401
    assert c.get("/health", headers=_basic("ls", "pä")).status_code == 401
    r = c.post("/webhook", json={"action": "X", "project": {"id": 1}},
               headers={"X-Faceloop-Secret": "sécret".encode("latin-1")})
    assert r.status_code == 401
    s2 = make_settings(tmp_path / "2", basic_auth_user="jöhn", basic_auth_pass="pässwort")
    c2 = TestClient(create_app(s2), raise_server_exceptions=False)
    assert c2.get("/health", headers=_basic("jöhn", "pässwort")).status_code == 200


def test_webhook_needs_auth_when_basic_auth_is_set(tmp_path):
    # Label Studio sends ordinary webhooks without basic auth (protocol doc §0.3): with auth on,
    # they must come from a webhook registered with the X-Faceloop-Secret header (issue 9)
    s = make_settings(tmp_path, basic_auth_user="ls", basic_auth_pass="pw")
    c = TestClient(create_app(s))
    hook = {"action": "PROJECT_UPDATED", "project": {"id": 1}}
    assert c.post("/webhook", json=hook).status_code == 401
    assert c.post("/webhook", json=hook, headers=_basic("ls", "pw")).status_code == 200


def test_two_label_studios_on_one_database_never_mix(tmp_path):
    # two stacks' backends (LABEL_STUDIO_INSTANCE a, b) on one database: both Label Studios have a
    # project 7; the second one's /setup, webhooks and Start Training are refused, the row is kept
    a = make_settings(tmp_path, label_studio_instance="aaaa")
    b = make_settings(tmp_path, label_studio_instance="bbbb")
    ca = TestClient(create_app(a), client=LOOPBACK, raise_server_exceptions=False)
    cb = TestClient(create_app(b), client=LOOPBACK, raise_server_exceptions=False)
    assert _setup(ca, project=7, schema=config_text("awake_sleep")).status_code == 200
    r = _setup(cb, project=7)  # Label Studio follows the 303 to a URL that spells the reason
    assert r.status_code == 422 and "faceloop refuses this project" in r.json()["detail"], r.text
    assert "another+Label+Studio" in str(r.url) and "VAR_DIR" in r.json()["detail"]
    hook = {"action": "ANNOTATION_CREATED", "project": {"id": 7, "title": "expressions",
                                                        "label_config": config_text("face_expressions")}}
    r = cb.post("/webhook", json=hook)
    assert r.status_code == 200 and r.json()["status"] == "ignored" and "another Label Studio" in r.json()["reason"]
    assert cb.post("/webhook", json={**hook, "action": "START_TRAINING"}).status_code == 409
    # /predict too, also when the config is the one stored and a version is served (its fast path)
    body = {"tasks": [{"id": 1, "project": 7, "data": {"image": "http://127.0.0.1:9/x.jpg"}}], "project": 7,
            "label_config": config_text("awake_sleep")}
    r = cb.post("/predict", json=body)
    assert r.status_code == 409 and "another Label Studio" in r.json()["detail"], r.text
    with session_scope(a.database_url) as s:
        row = s.get(Project, 7)
        assert row.ls_instance == "aaaa" and "awake" in row.labels_json and row.title != "expressions"
    assert _jobs(a, 7) == []
    # the same Label Studio after a restart (same instance, any port): served as before
    ca2 = TestClient(create_app(make_settings(tmp_path, label_studio_instance="aaaa",
                                              label_studio_url="http://127.0.0.1:8181")), client=LOOPBACK)
    assert _setup(ca2, project=7, schema=config_text("awake_sleep")).status_code == 200
