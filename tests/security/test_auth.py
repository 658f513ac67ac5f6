"""Issue 9 §3: auth on by default, webhooks authenticated, unknown projects refused.

Apps are built without a model load (no lifespan), on a SQLite database in tmp_path."""

from __future__ import annotations

import base64
import random

import pytest
from sqlmodel import select

from backend.app import create_app
from backend.db import session_scope
from backend.models import Project, TrainingJob, WebhookEvent
from tests.helpers_unit import config_text, make_settings
from tests.security.conftest import app_client

REMOTE = ("203.0.113.7", 40000)
ROUTES = [("get", "/health", None), ("get", "/", None), ("get", "/metrics", None), ("get", "/versions", None),
          ("post", "/setup", {"project": 1, "schema": config_text("awake_sleep")}),
          ("post", "/predict", {"tasks": [{"id": 1, "project": 1, "data": {"image": "/data/upload/1/x.jpg"}}]}),
          ("post", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}})]


def _basic(user, pw):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def _count(settings, table):
    with session_scope(settings.database_url) as s:
        return len(s.exec(select(table)).all())


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_without_credentials_configured_only_loopback_is_answered(tmp_path, method, path, body):
    c = app_client(tmp_path, _client=REMOTE)
    r = getattr(c, method)(path, **({"json": body} if body else {}))
    assert r.status_code == 403 and "loopback" in r.json()["detail"], r.text
    assert _count(c.app.state.settings, Project) == 0


def test_loopback_health_without_auth(tmp_path):
    assert app_client(tmp_path).get("/health").status_code == 200


def test_remote_without_auth_when_explicitly_allowed(tmp_path):
    c = app_client(tmp_path, _client=REMOTE, allow_remote_without_auth=True)
    assert c.get("/health").status_code == 200


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_with_basic_auth_every_route_needs_it(tmp_path, method, path, body):
    c = app_client(tmp_path, basic_auth_user="ls", basic_auth_pass="pw", webhook_secret="s3cret")
    kw = {"json": body} if body else {}
    r = getattr(c, method)(path, **kw)
    assert r.status_code == 401, (path, r.text)
    assert getattr(c, method)(path, headers=_basic("ls", "nope"), **kw).status_code == 401
    assert getattr(c, method)(path, headers=_basic("ls", "pw"), **kw).status_code != 401


def test_metrics_needs_auth(tmp_path):
    c = app_client(tmp_path, basic_auth_user="ls", basic_auth_pass="pw")
    assert c.get("/metrics").status_code == 401
    r = c.get("/metrics", headers=_basic("ls", "pw"))
    assert r.status_code == 200 and "faceloop_predict_seconds" in r.text


def test_webhook_secret_header_or_basic_auth(tmp_path):
    c = app_client(tmp_path, basic_auth_user="ls", basic_auth_pass="pw", webhook_secret="s3cret")
    hook = {"action": "PROJECT_UPDATED", "project": {"id": 1}}
    assert c.post("/webhook", json=hook).status_code == 401  # LS's auto-created webhook: no header
    assert c.post("/webhook", json=hook, headers={"X-Faceloop-Secret": "wrong"}).status_code == 401
    assert c.post("/webhook", json=hook, headers={"X-Faceloop-Secret": "s3cret"}).status_code == 200
    assert c.post("/webhook", json=hook, headers=_basic("ls", "pw")).status_code == 200  # START_TRAINING's way
    only_secret = app_client(tmp_path / "2", webhook_secret="s3cret", _client=REMOTE)
    assert only_secret.post("/webhook", json=hook, headers={"X-Faceloop-Secret": "s3cret"}).status_code == 200
    assert only_secret.post("/webhook", json=hook).status_code == 401


def test_half_configured_basic_auth_does_not_start(tmp_path):
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        create_app(make_settings(tmp_path, basic_auth_user="ls"))


def test_issue_repro_50_random_ids_create_nothing(tmp_path):
    # issue 9 §3: 50 ids gave 50 jobs and 50 project rows
    c = app_client(tmp_path)
    rng = random.Random(9)
    for pid in rng.sample(range(1000, 10**9), 50):
        r = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": pid}})
        assert r.status_code == 404 and "not set up" in r.json()["detail"], r.text
        r = c.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": pid}, "annotation": {"id": 1}})
        assert r.status_code == 200 and r.json()["status"] == "ignored"
        r = c.post("/predict", json={"tasks": [{"id": 1, "project": pid, "data": {"image": "/data/upload/1/x.jpg"}}],
                                     "label_config": config_text("awake_sleep")})
        assert r.status_code == 404 and "not set up" in r.json()["detail"], r.text
    s = c.app.state.settings
    assert (_count(s, Project), _count(s, TrainingJob), _count(s, WebhookEvent)) == (0, 0, 0)


def test_set_up_project_can_start_training(tmp_path):
    c = app_client(tmp_path)
    assert c.post("/setup", json={"project": "7.1", "schema": config_text("awake_sleep")}).status_code == 200
    r = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert r.status_code == 200 and r.json()["queued"] is True  # broker down: queued in the DB
    assert _count(c.app.state.settings, TrainingJob) == 1
