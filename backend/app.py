"""The Label Studio ML backend (FastAPI): /health, /setup, /predict, /webhook, /versions, /metrics,
and the status pages under /status (:mod:`backend.status`).

Protocol details (timeouts, payloads, auth) follow ``shared/docs/label-studio-protocol.md``:
``/health`` answers JSON without touching the model (1 s budget), ``/setup`` returns the
project's promoted ``model_version`` (3 s budget, no model load), ``/predict`` returns one entry
per task in order, ``/webhook`` records the event and answers at once (1 s budget; the work
goes to Celery).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any, NamedTuple

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import bindparam
from sqlalchemy import select as sa_select
from sqlmodel import select

import modelstore
from backend import registry
from backend.registry import valid_id
from backend.config import Settings, get_settings
from backend.db import session_scope
from backend.labels import LabelConfigError, ProjectSchema
from backend.models import ModelVersion, Project, TaskScore

log = logging.getLogger("faceloop.backend")


# --- request bodies --------------------------------------------------------------------------
class SetupRequest(BaseModel):
    """``POST /setup`` body sent by Label Studio."""

    model_config = ConfigDict(extra="allow")
    project: Any = Field(..., description="'<id>.<created_ts>' or an int id; checked by parse_project_id "
                                          "(kept raw: pydantic would coerce true to 1)")
    schema_: str = Field("", alias="schema")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: Any = Field(None, description="Label Studio sends what the person typed in Connect Model (a JSON "
                                                 "object, or an empty string from the web form); unused")


class PredictRequest(BaseModel):
    """``POST /predict`` body sent by Label Studio (tasks are kept as raw dicts)."""

    model_config = ConfigDict(extra="allow")
    tasks: list[dict]
    project: Any = None  # checked by parse_project_id (kept raw: pydantic would coerce true to 1)
    label_config: str | None = None
    params: dict | None = None


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of a credential; as bytes, because ``secrets.compare_digest``
    raises TypeError on non-ASCII ``str`` (a 500 instead of a 401)."""
    return secrets.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


#: Largest id accepted (Label Studio ids are database integers: signed 64-bit).
MAX_ID = 2**63 - 1
_UID = re.compile(r"^\s*(\d{1,19})(?:\.\d{0,20})?\s*$")


def parse_project_id(value) -> int:
    """Label Studio's project uid ``"<id>.<created_ts>"`` (or a plain id) -> int id.

    Accepts an int (not a bool) or a string of digits with an optional ``.<digits>`` suffix;
    the id must be 1..2^63-1.
    Raises: HTTPException 422 when it is not of that form.
    """
    pid = None
    if isinstance(value, str):
        m = _UID.match(value)
        pid = valid_id(int(m.group(1))) if m else None
    else:
        pid = valid_id(value)
    if pid is None:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
        raise HTTPException(422, f"project must look like '<id>.<timestamp>' or an integer id 1..2^63-1, got {shown}")
    return pid


#: Prefix of every refusal of a label config (``/setup``, ``/predict``).
CANNOT_SERVE = "faceloop cannot serve this label config"
#: Prefix of the refusal of a project that belongs to another Label Studio (``/setup``).
REFUSED_PROJECT = "faceloop refuses this project"
#: Where ``/setup`` sends Label Studio when it refuses a label config (see :func:`refusal_path`).
REFUSED_PREFIX = "/setup/refused/"


def refusal_path(message: str, limit: int = 400, prefix: str = CANNOT_SERVE) -> str:
    """The URL path that spells a refusal ``message`` for Label Studio to show.

    Label Studio 1.23.2 shows a person only ``str(requests.HTTPError)`` of a failed ``/setup``:
    ``"<status> Client Error: <reason phrase> for url: <final URL>"``; the response body is never
    shown (measured with ``benchmarks/ls_setup_answers.py``, docs/label_configs.md). So ``/setup``
    answers a config it cannot serve with ``303 See Other`` to this path, which answers 422: the
    message then reaches the *Connect Model* form and the model card as the URL. Words are joined
    with ``+`` and characters that would be percent-encoded in a URL are dropped, so it reads as
    text; cut to ``limit`` characters.
    """
    text = f"{prefix}: {message}".replace('"', "'")
    keep = "".join(ch if (ch.isascii() and (ch.isalnum() or ch in " -_.~!$&'()*,;:=@")) else " " for ch in text)
    return REFUSED_PREFIX + "+".join(keep.split())[:limit]


class ServingState(NamedTuple):
    """What ``/predict`` needs of a project's rows (:func:`serving_state`)."""

    label_config: str
    ls_instance: str  # the Label Studio instance the project row belongs to ("" when unclaimed)
    version: ModelVersion | None  # the promoted version (a detached copy), None when none is set
    error_tasks: frozenset[int]  # the asked-for tasks that have an error row of that version


_STATE = (sa_select(Project.label_config, Project.ls_instance, ModelVersion.id, ModelVersion.project_id, ModelVersion.version,
                    ModelVersion.path, ModelVersion.sha256)
          .select_from(Project)
          .outerjoin(ModelVersion, ModelVersion.id == Project.promoted_version_id)
          .where(Project.id == bindparam("pid")))
_ERROR_TASKS = (sa_select(TaskScore.task_id)
                .where(TaskScore.project_id == bindparam("pid"), TaskScore.model_version == bindparam("version"),
                       TaskScore.error != "", TaskScore.task_id.in_(bindparam("ids", expanding=True))))


def serving_state(url: str, pid: int, task_ids: list[int]) -> ServingState | None:
    """Project ``pid``'s label config and promoted version, and which of ``task_ids`` have an
    error row (:class:`backend.models.TaskScore` with ``error``) of that version, read in one
    connection with two SQL Core queries (no ORM session: this runs on every ``/predict``).

    Nothing is cached between requests, so a version promoted by a worker on another machine, or
    a label config changed by another backend, is seen by the next request.

    Returns: None when the project has no row (it was never set up).
    Raises: SQLAlchemy errors when the database cannot be read.
    """
    from backend.db import get_engine

    with get_engine(url).connect() as conn:
        row = conn.execute(_STATE, {"pid": pid}).first()
        if row is None:
            return None
        version, errors = None, frozenset()
        if row[2] is not None:
            version = ModelVersion(id=row[2], project_id=row[3], version=row[4], path=row[5], sha256=row[6])
            if task_ids:
                errors = frozenset(r[0] for r in conn.execute(
                    _ERROR_TASKS, {"pid": pid, "version": version.version, "ids": list(task_ids)}))
        return ServingState(row[0] or "", row[1] or "", version, errors)


@lru_cache(maxsize=64)
def parse_schema(label_config: str) -> ProjectSchema:
    """:meth:`ProjectSchema.parse`, remembered for the last 64 configs (``/predict`` gets the
    project's config with every request). Callers must not change the returned schema.
    Raises: LabelConfigError as :meth:`ProjectSchema.parse` (not remembered)."""
    return ProjectSchema.parse(label_config)


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json_too_deep(body: bytes, limit: int) -> bool:
    """True when ``body`` is JSON nested deeper than ``limit`` (or too deep for Python's parser).

    Cheap first: a body with fewer opening brackets than ``limit`` cannot be that deep.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    try:
        doc = json.loads(body)
    except RecursionError:
        return True
    except ValueError:
        return False  # not JSON: the route says so
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    return False


class BodyLimits:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by Content-Length, or while reading),
    400 for JSON nested deeper than ``max_depth``; the body is then replayed to the app."""

    def __init__(self, app, max_bytes: int, max_depth: int):
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def _answer(self, send, status: int, detail: str):
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = f"request body is larger than {self.max_bytes} bytes (MAX_BODY_BYTES)"
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._answer(send, 413, too_big)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._answer(send, 413, too_big)
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        if body.count(b"[") + body.count(b"{") > self.max_depth:
            from starlette.concurrency import run_in_threadpool

            if await run_in_threadpool(_json_too_deep, body, self.max_depth):
                return await self._answer(send, 400, f"JSON body is nested deeper than {self.max_depth} levels")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# --- app -------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the backend app for ``settings`` (default: from the environment).

    Auth (issue 9): with ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` every route needs basic auth;
    without them the backend answers loopback clients only (403 for others) unless
    ``ALLOW_REMOTE_WITHOUT_AUTH`` is true. ``/webhook`` takes basic auth or the
    ``X-Faceloop-Secret`` header (``WEBHOOK_SECRET``) when either is configured.

    Raises: ValueError when only one of BASIC_AUTH_USER and BASIC_AUTH_PASS is set.
    """
    settings = settings or get_settings()
    if bool(settings.basic_auth_user) != bool(settings.basic_auth_pass):
        raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
    state: dict = {"models": None}
    metrics = CollectorRegistry()
    m_predict = Histogram("faceloop_predict_seconds", "Time of /predict requests", registry=metrics)
    m_tasks = Counter("faceloop_predicted_tasks_total", "Tasks predicted", ["outcome"], registry=metrics)
    m_hooks = Counter("faceloop_webhooks_total", "Webhooks received", ["action"], registry=metrics)
    hook_labels: set[str] = set()

    def models():
        if state["models"] is None:
            from facemodels.detector import ModelCache  # imports torch + ultralytics: keep off /health

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

        def adopt():  # versions trained here before they were stored in the database (modelstore)
            try:
                if names := modelstore.adopt_local_versions(settings):
                    log.info("model versions stored in the database: %s", ", ".join(names))
            except Exception:
                log.exception("could not store this machine's older model versions in the database")

        threading.Thread(target=adopt, daemon=True).start()
        threading.Thread(target=warm_up, daemon=True).start()
        stop = None
        if settings.recovery_interval_s > 0:  # lost training jobs, jobs queued while Redis was down
            from ml_worker.tasks import start_recovery_thread

            stop = start_recovery_thread(settings)
        yield
        if stop is not None:
            stop.set()

    app = FastAPI(title="faceloop ML backend", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, max_depth=settings.max_json_depth)

    def check_basic_auth(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if settings.basic_auth_user and header.lower().startswith("basic "):
            try:
                user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
            except Exception:
                return False
            return _same(user, settings.basic_auth_user) and _same(pw, settings.basic_auth_pass)
        return False

    def loopback_only(request: Request):
        if not settings.allow_remote_without_auth and not _is_loopback(request):
            raise HTTPException(403, "no BASIC_AUTH_USER/BASIC_AUTH_PASS configured: this backend answers "
                                     "loopback clients only (set them, or ALLOW_REMOTE_WITHOUT_AUTH=true)")

    # async: runs on the event loop, so /health answers even when the threadpool is busy
    async def require_auth(request: Request):
        if settings.basic_auth_user:
            if not check_basic_auth(request):
                raise HTTPException(401, "basic auth required", headers={"WWW-Authenticate": "Basic"})
        else:
            loopback_only(request)

    @app.get("/")
    @app.get("/health")
    async def health(_=Depends(require_auth)):
        return {"status": "UP", "model_class": "FaceModel", "version": "faceloop 0.1.0"}

    @app.post("/setup")
    def setup(req: SetupRequest, _=Depends(require_auth)):
        pid = parse_project_id(req.project)
        try:
            ProjectSchema.parse(req.schema_)
        except LabelConfigError as e:
            # Label Studio shows only the final URL of a failed /setup, never the body: send it to a
            # URL that spells the reason (refusal_path); a client that does not follow redirects
            # still gets the message in the JSON body
            log.info("project %s: %s: %s", pid, CANNOT_SERVE, e)
            return JSONResponse({"detail": f"{CANNOT_SERVE}: {e}"}, status_code=303,
                                headers={"Location": refusal_path(str(e))})
        with session_scope(settings.database_url) as s:
            # req.hostname is NOT stored: credentials go to LABEL_STUDIO_URL only (issue 9)
            try:
                registry.upsert_project(s, pid, label_config=req.schema_, ls_instance=settings.label_studio_instance)
            except registry.ProjectOfAnotherLabelStudio as e:  # shown as the URL, as a refused config
                log.warning("/setup of project %s refused: %s", pid, e)
                return JSONResponse({"detail": f"{REFUSED_PROJECT}: {e}"}, status_code=303,
                                    headers={"Location": refusal_path(str(e), prefix=REFUSED_PROJECT)})
            try:
                v = registry.promoted_version(s, pid, settings)
            except FileNotFoundError as e:
                raise HTTPException(503, str(e))
            return {"model_version": v.version}

    @app.get(REFUSED_PREFIX + "{reason:path}")
    def setup_refused(reason: str, _=Depends(require_auth)):
        """Where /setup sends Label Studio for a label config it cannot serve (see refusal_path)."""
        text = reason.replace("+", " ")[:1000]
        if not text.startswith((CANNOT_SERVE, REFUSED_PROJECT)):
            text = f"{CANNOT_SERVE}: {text}"
        return JSONResponse({"detail": text}, status_code=422)

    def not_set_up(pid: int) -> HTTPException:
        return HTTPException(404, f"project {pid} is not set up in faceloop: Label Studio calls /setup when "
                                  "the ML backend is connected to the project (connect it, or validate it again)")

    @app.post("/predict")
    def predict(req: PredictRequest, _=Depends(require_auth)):
        t0 = time.perf_counter()
        from backend.predict import predict_tasks, to_ls_prediction

        if not req.tasks:
            return {"results": []}
        if len(req.tasks) > settings.max_tasks_per_request:
            raise HTTPException(413, f"{len(req.tasks)} tasks in one request; at most {settings.max_tasks_per_request} "
                                     "(MAX_TASKS_PER_REQUEST): send them in smaller batches")
        pid = req.tasks[0].get("project")
        pid = parse_project_id(pid if pid is not None else req.project)
        ids = [t.get("id") for t in req.tasks if isinstance(t, dict) and valid_id(t.get("id"))]
        state = serving_state(settings.database_url, pid, ids)  # one connection, two reads, no ORM
        config = req.label_config or (state.label_config if state else "")
        try:
            schema = parse_schema(config)
        except LabelConfigError as e:
            raise HTTPException(422, f"{CANNOT_SERVE}: {e}")
        if state is None:
            raise not_set_up(pid)
        try:  # before either path: the fast one below writes nothing and would skip upsert's check
            registry.check_instance(Project(id=pid, ls_instance=state.ls_instance), settings.label_studio_instance)
        except registry.ProjectOfAnotherLabelStudio as e:
            raise HTTPException(409, str(e))
        if state.version is not None and config == state.label_config:
            version = state.version  # served as is: nothing to write
        else:  # a new label config, or no version served yet (the shipped default is registered)
            with session_scope(settings.database_url) as s:
                try:
                    registry.upsert_project(s, pid, label_config=config, ls_instance=settings.label_studio_instance)
                except registry.ProjectOfAnotherLabelStudio as e:
                    raise HTTPException(409, str(e))
                try:
                    version = registry.promoted_version(s, pid, settings)
                except FileNotFoundError as e:
                    raise HTTPException(503, str(e))
            state = None  # the error rows below are looked up after the predictions (as before)
        try:
            model = models().get(modelstore.model_path(settings, version))  # from the database's model store
        except (FileNotFoundError, modelstore.ArtifactError) as e:
            raise HTTPException(503, f"model version {version.version} cannot be loaded: {e}")
        preds = predict_tasks(req.tasks, schema, model, settings)
        results = [to_ls_prediction(p, schema, version.version, settings.uncertainty_measure) for p in preds]
        failed = {}
        for p in preds:
            m_tasks.labels("error" if p.error else "ok").inc()
            if p.error:
                log.warning("task %s: %s", p.task_id, p.error)
                if valid_id(p.task_id):
                    failed[p.task_id] = p.error
        ok = [p.task_id for p in preds if not p.error and valid_id(p.task_id)]
        if state is not None:  # only tasks that had an error row of this version need clearing
            ok = [t for t in ok if t in state.error_tasks]
        if failed or ok:
            try:  # Label Studio shows the person no per-task error: the status page lists them
                from backend.status import record_predict_errors

                record_predict_errors(settings, pid, version.version, failed, ok)
            except Exception as e:  # noqa: BLE001 - the predictions still go back to Label Studio
                log.warning("per-task errors of project %s not recorded: %s", pid, e)
        m_predict.observe(time.perf_counter() - t0)
        # encoded here as Starlette's JSONResponse does, without FastAPI's jsonable_encoder walk
        # (the results are plain dicts, lists, strings and floats)
        return Response(json.dumps({"results": results}, ensure_ascii=False, allow_nan=False,
                                   separators=(",", ":")).encode("utf-8"), media_type="application/json")

    def check_webhook_auth(request: Request):
        if settings.webhook_secret or settings.basic_auth_user:
            ok = (bool(settings.webhook_secret)
                  and _same(request.headers.get("x-faceloop-secret", ""), settings.webhook_secret)) \
                or check_basic_auth(request)
            if not ok:
                raise HTTPException(401, "webhook needs header X-Faceloop-Secret (WEBHOOK_SECRET) or basic auth",
                                    headers={"WWW-Authenticate": "Basic"})
        else:
            loopback_only(request)

    @app.post("/webhook")
    async def webhook(request: Request):
        check_webhook_auth(request)
        raw = await request.body()
        try:
            payload = json.loads(raw or b"null")
        except RecursionError:
            raise HTTPException(400, "webhook body is nested too deeply")
        except ValueError:
            raise HTTPException(400, "webhook body is not JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("action"), str):
            raise HTTPException(400, "webhook body must be a JSON object with an 'action' string")
        action = payload["action"][:100]
        project = payload.get("project")
        pid = None
        if isinstance(project, dict) and "id" in project:
            pid = valid_id(project["id"])
            if pid is None:
                shown = repr(project["id"])[:60]
                raise HTTPException(422, f"project.id must be an integer id 1..2^63-1, got {shown}")
        label = action if action.isidentifier() and len(action) <= 40 else "other"
        if label not in hook_labels and len(hook_labels) >= 50:  # bounded metric cardinality
            label = "other"
        hook_labels.add(label)
        m_hooks.labels(label).inc()
        from fastapi.concurrency import run_in_threadpool

        from backend.events import handle_event

        def run():
            if pid is not None:
                with session_scope(settings.database_url) as s:
                    row = s.get(Project, pid)
                    known = row is not None
                    try:
                        registry.check_instance(row, settings.label_studio_instance)
                    except registry.ProjectOfAnotherLabelStudio as e:
                        if action == "START_TRAINING":
                            raise HTTPException(409, str(e))
                        return {"status": "ignored", "reason": str(e)}
                if not known:
                    if action == "START_TRAINING":
                        raise not_set_up(pid)
                    return {"status": "ignored", "reason": f"project {pid} is not set up in faceloop (no /setup)"}
            return handle_event(settings, action, payload)

        return await run_in_threadpool(run)

    @app.get("/versions")
    async def versions(request: Request, _=Depends(require_auth)):
        pid = request.query_params.get("project")
        if pid is None:
            try:
                body = json.loads((await request.body()) or b"{}")
                pid = body.get("project") if isinstance(body, dict) else None
            except (ValueError, RecursionError):
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

    from backend.acceptance import AcceptanceCollector
    from backend.status import make_router

    metrics.register(AcceptanceCollector(settings))  # pre-label acceptance per project and model version
    app.include_router(make_router(settings, require_auth))  # /status pages (issue 11)

    @app.get("/metrics")
    async def prom(_=Depends(require_auth)):
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc):  # pragma: no cover - last resort: clear JSON, server stays up
        log.exception("unhandled error")
        return JSONResponse({"detail": f"internal error: {exc.__class__.__name__}"}, status_code=500)

    app.state.settings = settings
    return app
