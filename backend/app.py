"""The Label Studio ML backend (FastAPI): /health, /setup, /predict, /webhook, /versions, /metrics.

Protocol details (timeouts, payloads, auth) follow ``shared/docs/label-studio-protocol.md``:
``/health`` answers JSON without touching the model (1 s budget), ``/setup`` returns the
project's promoted ``model_version`` (3 s budget, no model load), ``/predict`` returns one entry
per task in order, ``/webhook`` records the event and answers at once (1 s budget; the work
goes to Celery).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import select

from backend import registry
from backend.config import Settings, get_settings
from backend.db import session_scope
from backend.labels import LabelConfigError, ProjectSchema
from backend.models import ModelVersion, Project

log = logging.getLogger("faceloop.backend")


# --- request bodies --------------------------------------------------------------------------
class SetupRequest(BaseModel):
    """``POST /setup`` body sent by Label Studio."""

    model_config = ConfigDict(extra="allow")
    project: str | int
    schema_: str = Field("", alias="schema")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict | None = None


class PredictRequest(BaseModel):
    """``POST /predict`` body sent by Label Studio (tasks are kept as raw dicts)."""

    model_config = ConfigDict(extra="allow")
    tasks: list[dict]
    project: str | int | None = None
    label_config: str | None = None
    params: dict | None = None


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of a credential; as bytes, because ``secrets.compare_digest``
    raises TypeError on non-ASCII ``str`` (a 500 instead of a 401)."""
    return secrets.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def parse_project_id(value) -> int:
    """Label Studio's project uid ``"<id>.<created_ts>"`` (or a plain id) -> int id.

    Raises: HTTPException 422 when it is not of that form.
    """
    try:
        return int(str(value).split(".", 1)[0])
    except (TypeError, ValueError):
        raise HTTPException(422, f"project must look like '<id>.<timestamp>' or an integer id, got {value!r}")


# --- app -------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the backend app for ``settings`` (default: from the environment)."""
    settings = settings or get_settings()
    state: dict = {"models": None}
    metrics = CollectorRegistry()
    m_predict = Histogram("faceloop_predict_seconds", "Time of /predict requests", registry=metrics)
    m_tasks = Counter("faceloop_predicted_tasks_total", "Tasks predicted", ["outcome"], registry=metrics)
    m_hooks = Counter("faceloop_webhooks_total", "Webhooks received", ["action"], registry=metrics)

    def models():
        if state["models"] is None:
            from backend.yolo import ModelCache  # imports torch + ultralytics: keep off /health

            state["models"] = ModelCache(settings.device)
        return state["models"]

    def warm_up():
        try:
            from ml_worker.celery_app import make_celery

            make_celery(settings)  # import Celery now, not in the first webhook's 1 s budget
            models().get(settings.default_model_path)
        except Exception:  # pragma: no cover - warm-up is best effort
            log.exception("model warm-up failed")

    @asynccontextmanager
    async def lifespan(_app):
        from backend.db import get_engine

        get_engine(settings.database_url)
        threading.Thread(target=warm_up, daemon=True).start()
        yield

    app = FastAPI(title="faceloop ML backend", version="0.1.0", lifespan=lifespan)

    def check_basic_auth(request: Request) -> bool:
        if not settings.basic_auth_user:
            return True
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
            except Exception:
                return False
            return _same(user, settings.basic_auth_user) and _same(pw, settings.basic_auth_pass)
        return False

    def require_auth(request: Request):
        if not check_basic_auth(request):
            raise HTTPException(401, "basic auth required", headers={"WWW-Authenticate": "Basic"})

    @app.get("/")
    @app.get("/health")
    def health(_=Depends(require_auth)):
        return {"status": "UP", "model_class": "FaceModel", "version": "faceloop 0.1.0"}

    @app.post("/setup")
    def setup(req: SetupRequest, _=Depends(require_auth)):
        pid = parse_project_id(req.project)
        try:
            ProjectSchema.parse(req.schema_)
        except LabelConfigError as e:
            raise HTTPException(422, f"faceloop cannot serve this label config: {e}")
        with session_scope(settings.database_url) as s:
            registry.upsert_project(s, pid, label_config=req.schema_, ls_url=req.hostname)
            try:
                v = registry.promoted_version(s, pid, settings)
            except FileNotFoundError as e:
                raise HTTPException(503, str(e))
            return {"model_version": v.version}

    @app.post("/predict")
    def predict(req: PredictRequest, _=Depends(require_auth)):
        t0 = time.perf_counter()
        from backend.predict import predict_tasks, to_ls_prediction

        if not req.tasks:
            return {"results": []}
        pid = req.tasks[0].get("project")
        pid = parse_project_id(pid if pid is not None else req.project)
        with session_scope(settings.database_url) as s:
            proj = s.get(Project, pid)
            config = req.label_config or (proj.label_config if proj else "")
            try:
                schema = ProjectSchema.parse(config)
            except LabelConfigError as e:
                raise HTTPException(422, f"faceloop cannot serve this label config: {e}")
            proj = registry.upsert_project(s, pid, label_config=config)
            ls_url = proj.ls_url or None
            try:
                version = registry.promoted_version(s, pid, settings)
            except FileNotFoundError as e:
                raise HTTPException(503, str(e))
        model = models().get(version.path)
        preds = predict_tasks(req.tasks, schema, model, settings, ls_url=ls_url)
        results = [to_ls_prediction(p, schema, version.version, settings.uncertainty_measure) for p in preds]
        for p in preds:
            m_tasks.labels("error" if p.error else "ok").inc()
            if p.error:
                log.warning("task %s: %s", p.task_id, p.error)
        m_predict.observe(time.perf_counter() - t0)
        return {"results": results}

    @app.post("/webhook")
    async def webhook(request: Request):
        raw = await request.body()
        try:
            payload = json.loads(raw or b"null")
        except ValueError:
            raise HTTPException(400, "webhook body is not JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("action"), str):
            raise HTTPException(400, "webhook body must be a JSON object with an 'action' string")
        if settings.webhook_secret:
            ok = _same(request.headers.get("x-faceloop-secret", ""), settings.webhook_secret) or (
                bool(settings.basic_auth_user) and check_basic_auth(request))
            if not ok:
                raise HTTPException(401, "webhook secret missing or wrong (header X-Faceloop-Secret)")
        action = payload["action"]
        m_hooks.labels(action).inc()
        from fastapi.concurrency import run_in_threadpool

        from backend.events import handle_event

        return await run_in_threadpool(handle_event, settings, action, payload)

    @app.get("/versions")
    async def versions(request: Request, _=Depends(require_auth)):
        pid = request.query_params.get("project")
        if pid is None:
            try:
                body = json.loads((await request.body()) or b"{}")
                pid = body.get("project") if isinstance(body, dict) else None
            except ValueError:
                pid = None
        pid = parse_project_id(pid) if pid is not None else None

        def names():
            with session_scope(settings.database_url) as s:
                q = select(ModelVersion).order_by(ModelVersion.created_at)
                if pid is not None:
                    q = q.where(ModelVersion.project_id == pid)
                return list(dict.fromkeys(v.version for v in s.exec(q).all()))

        from fastapi.concurrency import run_in_threadpool

        return {"versions": await run_in_threadpool(names)}

    @app.get("/metrics")
    def prom():
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc):  # pragma: no cover - last resort: clear JSON, server stays up
        log.exception("unhandled error")
        return JSONResponse({"detail": f"internal error: {exc.__class__.__name__}: {exc}"}, status_code=500)

    app.state.settings = settings
    return app
