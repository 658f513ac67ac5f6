"""Label Studio calls through label-studio-sdk: snapshot annotations, write predictions, views.

Part of the Label Studio adapter (with :mod:`backend.labels`); SDK behaviour and caveats are in
label-studio-protocol.md §4 (plain iteration of ``tasks.list`` pages safely; ``only_annotated``
is ignored by the open-source edition, so tasks are split here).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

log = logging.getLogger("faceloop.lsapi")

PREDICTION_CHUNK = 200


@dataclass
class SnapshotTask:
    """One task of a project snapshot.

    Attributes:
        id: task id.
        data: task data (image URL under the schema's value key).
        result: regions of the latest non-cancelled annotation, or None when unlabelled.
        prediction_versions: model versions the task already has predictions of.
    """

    id: int
    data: dict
    result: list | None = None
    prediction_versions: set[str] = field(default_factory=set)


def _get(obj, key, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def latest_annotation(annotations: list) -> dict | list | None:
    """The latest non-cancelled annotation (by ``updated_at``/``created_at``, then id), or None."""
    live = [a for a in annotations or [] if not _get(a, "was_cancelled", False)]
    if not live:
        return None
    return max(live, key=lambda a: (str(_get(a, "updated_at") or _get(a, "created_at") or ""), _get(a, "id") or 0))


def all_pages(list_page, page_size: int = 100, **params):
    """Every item of a paged Label Studio list, page by page, never asking for a page past the last.

    Args:
        list_page: an SDK list method that takes ``page`` and ``page_size`` (``client.tasks.list``,
            ``client.projects.list``); ``params`` go with every call.
        page_size: items a request (Label Studio's default for tasks is 100).
    Yields: the items (SDK objects) in Label Studio's order.

    The SDK's own pager asks for page n + 1 until one comes back empty, and Label Studio 1.23.2
    answers a page past the last with 404 ("Invalid page", Django REST framework's
    ``PageNumberPagination``) after logging it with a traceback (``core.utils.common.custom_exception_handler``
    logs every API error with ``exc_info``). So the pages are asked for here: the listing stops
    once the count the first page gave (tasks: ``total``, projects: ``count``) is reached, at an
    empty page, or at a short page when no count came back.
    """
    page, seen = 1, 0
    while True:
        pager = list_page(page=page, page_size=page_size, **params)
        items = list(pager.items or [])
        yield from items
        seen += len(items)
        total = getattr(pager.response, "total", None)
        if total is None:
            total = getattr(pager.response, "count", None)
        if not items or (seen >= total if isinstance(total, int) else len(items) < page_size):
            return
        page += 1


def snapshot(client, project_id: int) -> list[SnapshotTask]:
    """All tasks of a project with their latest non-cancelled annotation (paged, 100 a page).

    An annotation with an empty ``result`` is kept as ``[]``: a background image (no face).
    """
    out = []
    for t in all_pages(client.tasks.list, project=project_id, fields="all"):
        ann = latest_annotation(list(_get(t, "annotations") or []))
        result = None
        if ann is not None:
            result = [r if isinstance(r, dict) else r.dict() for r in (_get(ann, "result") or [])]
        versions = {str(_get(p, "model_version")) for p in (_get(t, "predictions") or [])}
        out.append(SnapshotTask(id=int(_get(t, "id")), data=dict(_get(t, "data") or {}), result=result,
                                prediction_versions=versions))
    return out


def write_predictions(client, project_id: int, predictions: list[dict]) -> int:
    """Import predictions in bulk (``POST /api/projects/{id}/import/predictions``), 200 a call.

    Args:
        predictions: dicts ``{"task": id, "model_version": v, "score": s, "result": [...]}``.
    Returns: how many were sent.
    """
    n = 0
    for i in range(0, len(predictions), PREDICTION_CHUNK):
        chunk = predictions[i : i + PREDICTION_CHUNK]
        client.projects.import_predictions(id=project_id, request=chunk)
        n += len(chunk)
    return n


def set_project_model_version(client, project_id: int, version: str) -> None:
    """Point ``project.model_version`` at ``version`` so the prediction-score column, its
    ordering and uncertainty sampling count those predictions (protocol doc §2)."""
    client.projects.update(id=project_id, model_version=version)


def review_view_data(title: str) -> dict:
    """Data Manager view: unlabelled tasks not skipped, lowest prediction score first (the query
    batch, then the most uncertain: :func:`ml_worker.scoring.ls_task_score`).

    A skipped task holds a cancelled annotation, which ``total_annotations`` does not count
    (Label Studio 1.23.2): without the second filter a skipped query-batch task stayed at the top
    of the tab although Label Studio no longer serves it to that person (found in a new user's trial).
    """
    return {
        "title": title,
        "ordering": ["tasks:predictions_score"],
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
            {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0}]},
    }


#: Data of the tab Label Studio's Data Manager creates itself when a project has no view
#: (``createDefaultView`` in LS 1.23's frontend: title "Default", no filter, no ordering).
DEFAULT_VIEW_DATA = {"title": "Default", "ordering": [], "filters": {"conjunction": "and", "items": []}}


def refresh_review_view(client, project_id: int, title: str) -> int:
    """Create the review-queue view, or reset an existing one of that title. Returns its id.

    Label Studio's Data Manager creates its own *Default* tab (every task, id order) only when a
    project has no view at all; so when the review queue is the project's first view, the Default
    tab is created first, and the person keeps it next to the Review queue (issue 11). A Default
    tab the person deleted later is not brought back.
    """
    data = review_view_data(title)
    views = list(client.views.list(project=project_id))
    for v in views:
        if (_get(_get(v, "data") or {}, "title")) == title:
            client.views.update(id=v.id, project=project_id, data=data)
            return v.id
    if not views:
        client.views.create(project=project_id, data=dict(DEFAULT_VIEW_DATA))
    return client.views.create(project=project_id, data=data).id


def review_queue(client, project_id: int, title: str, limit: int = 20) -> list[dict]:
    """The head of the review view as Label Studio serves it: ``[{"id", "score"}]``."""
    vid = refresh_review_view(client, project_id, title)
    out = []
    for t in all_pages(client.tasks.list, min(limit, 100), project=project_id, view=vid, fields="all"):
        # predictions_score is computed over predictions of project.model_version
        out.append({"id": int(_get(t, "id")), "score": _get(t, "predictions_score")})
        if len(out) >= limit:
            break
    return out


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


#: Label Studio's task sampling that makes *Label All Tasks* follow the review queue. Label Studio
#: 1.23.2's Data Manager asks for the next task with ``tabID=<view>`` in the query and no filters or
#: ordering in the body, and its API reads only ``view``: the labeling stream ignores the tab it was
#: started from (measured in a browser: the Review queue tab's *Label All Tasks* served task 1, not
#: the head of the queue). With this sampling Label Studio serves the unlabelled task with the
#: lowest ``predictions__score`` among the predictions of ``project.model_version``
#: (``projects/functions/next_task.py::_try_uncertainty_sampling``): the review queue's order, from
#: any tab.
QUEUE_SAMPLING = "Uncertainty sampling"


def use_queue_sampling(client, project_id: int) -> bool:
    """Set the project's task sampling to :data:`QUEUE_SAMPLING` unless it already is.

    Returns: True when this call changed it. Raises: the SDK's ApiError when Label Studio refuses.
    """
    if _get(client.projects.get(id=project_id), "sampling") == QUEUE_SAMPLING:
        return False
    client.projects.update(id=project_id, sampling=QUEUE_SAMPLING)
    return True


def create_project(client, title: str, label_config: str, description: str = "") -> int:
    """Create a Label Studio project; returns its id. The config is checked first.

    Raises: backend.labels.LabelConfigError for a config faceloop cannot serve.
    """
    from backend.labels import ProjectSchema

    ProjectSchema.parse(label_config)
    # show_instruction: the instructions (where faceloop puts the status page's link,
    # set_status_link) open by themselves when a person starts labeling (Label All Tasks), so the
    # status page is one click away; the person can switch it off in Settings -> Instructions.
    # sampling: Label All Tasks serves the review queue's order (QUEUE_SAMPLING)
    p = client.projects.create(title=title, label_config=label_config, description=description,
                               show_collab_predictions=True, show_instruction=True, sampling=QUEUE_SAMPLING)
    return int(p.id)


IMAGE_REGEX = r"(?i).*\.(jpe?g|png|bmp|webp)$"


def storage_title(folder) -> str:
    """Title faceloop gives the Local Files storage of ``folder`` (shown in Settings -> Cloud Storage)."""
    return f"faceloop: {folder}"[:256]


def sync_local_storage(client, project_id: int, folder, storage_id: int | None = None) -> tuple[int, int]:
    """Make the images under ``folder`` (nested folders too) tasks of the project, in place.

    Label Studio 1.23 serves ``/data/local-files/?d=X`` only when a Local Files import storage of
    the project has a path containing X, and that path must be a strict subfolder of its
    ``LOCAL_FILES_DOCUMENT_ROOT`` (label-studio-protocol.md §1). So the storage is created on
    ``folder`` (``recursive_scan``, image files only by :data:`IMAGE_REGEX`, ``use_blob_urls``:
    one task per image, data ``{"image": "/data/local-files/?d=<path under the root>"}``) and
    synced; Label Studio creates one task per new file and skips files it already linked, so
    running it again after images were added creates only the new tasks.

    Args:
        folder: folder of images, or a symlink to one (must be under Label Studio's document root;
            kept as given, not resolved).
        storage_id: the storage made earlier for this folder, if known (else looked up by path).
    Returns: ``(storage_id, tasks_created)``.
    Raises: label_studio_sdk ApiError when Label Studio refuses the storage (e.g. outside the root).
    """
    import os

    # absolute, symlinks kept: a link under the document root is a valid storage path
    # (Label Studio checks it lexically), its real target may lie outside the root
    path = os.path.abspath(folder)
    sid = None
    for stg in client.import_storage.local.list(project=project_id):
        if (storage_id is not None and int(stg.id) == int(storage_id)) or (storage_id is None and _get(stg, "path") == path):
            sid = int(stg.id)
            break
    if sid is None:
        sid = int(client.import_storage.local.create(
            project=project_id, path=path, regex_filter=IMAGE_REGEX, use_blob_urls=True, recursive_scan=True,
            title=storage_title(path)).id)
    before = _count_tasks(client, project_id)
    client.import_storage.local.sync(id=sid)
    return sid, _count_tasks(client, project_id) - before


def _count_tasks(client, project_id: int) -> int:
    p = client.projects.get(id=project_id)
    return int(_get(p, "task_number") or 0)


def upload_images(client, ls_url: str, project_id: int, paths: list) -> list[int]:
    """Upload image files into Label Studio (``POST /api/projects/{id}/import``, multipart, one
    field name per file, 50 files a request). Returns the new task ids."""
    import httpx

    headers = {"Authorization": client._client_wrapper.get_headers()["Authorization"]}
    ids: list[int] = []
    for i in range(0, len(paths), 50):
        files = []
        handles = []
        try:
            for j, p in enumerate(paths[i : i + 50]):
                h = open(p, "rb")
                handles.append(h)
                files.append((f"file{j}", (str(p).rsplit("/", 1)[-1], h, "image/jpeg")))
            r = httpx.post(f"{ls_url.rstrip('/')}/api/projects/{project_id}/import", files=files,
                           params={"return_task_ids": "true"}, headers=headers, timeout=120)
        finally:
            for h in handles:
                h.close()
        r.raise_for_status()
        ids.extend(r.json().get("task_ids") or [])
    return ids


#: Webhook actions faceloop's backend acts on (backend.events.handle_event).
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                   "TASKS_CREATED", "PROJECT_UPDATED"]
SECRET_HEADER = "X-Faceloop-Secret"


def ensure_webhook(client, project_id: int, backend_url: str, secret: str, replace_urls: tuple = ()) -> int:
    """Exactly one project webhook to ``<backend_url>/webhook`` carrying the secret header.

    Label Studio's ordinary webhooks carry no auth, so the backend (with ``WEBHOOK_SECRET`` set)
    only accepts those with header ``X-Faceloop-Secret`` (label-studio-protocol.md §0.3). A
    webhook to that URL or to one of ``replace_urls`` (the backend's earlier address), or one
    already carrying the header, is updated in place (URL, header, actions); further copies,
    such as the unauthenticated ``<url>/webhook`` Label Studio creates with an ML backend, are
    deleted. Returns the webhook id.
    """
    url = backend_url.rstrip("/") + "/webhook"
    targets = {url, *(u.rstrip("/") + "/webhook" for u in replace_urls)}
    ours = [w for w in client.webhooks.list(project=str(project_id))
            if _get(w, "project") == project_id
            and (_get(w, "url") in targets or SECRET_HEADER in (_get(w, "headers") or {}))]
    spec = dict(url=url, headers={SECRET_HEADER: secret}, actions=WEBHOOK_ACTIONS, send_payload=True,
                send_for_all_actions=False, is_active=True)
    if not ours:
        return int(client.webhooks.create(project=project_id, **spec).id)
    keep, extra = ours[0], ours[1:]
    client.webhooks.update(id=keep.id, **spec)
    for w in extra:
        client.webhooks.delete(id=w.id)
    return int(keep.id)


def connect_backend(client, project_id: int, backend_url: str, title: str = "faceloop",
                    basic_auth: tuple[str, str] | None = None, webhook_secret: str | None = None) -> int:
    """Make faceloop the project's ML backend (Label Studio checks /health and /setup) and
    return the ML backend id; reconnects an existing faceloop backend instead of adding one.

    With ``basic_auth`` (user, password) Label Studio sends it on /health, /setup, /predict and
    START_TRAINING (``auth_method="BASIC_AUTH"``). With ``webhook_secret`` the product's webhook
    is registered first (:func:`ensure_webhook`), so Label Studio, which skips creating its own
    ``<url>/webhook`` when one to that URL exists, leaves no unauthenticated copy. An existing ML
    backend titled ``title`` (e.g. at the port of an earlier run) gets the new URL and auth.
    """
    auth = {}
    if basic_auth:
        auth = dict(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
    existing = [m for m in client.ml.list(project=project_id) if _get(m, "title") == title]
    old_urls = tuple(str(_get(m, "url")) for m in existing if _get(m, "url") != backend_url)
    if webhook_secret:
        ensure_webhook(client, project_id, backend_url, webhook_secret, replace_urls=old_urls)
    if existing:
        # ``project`` is needed: Label Studio 1.23.2's PATCH without it fails (500, setup_() missing project)
        ml = client.ml.update(id=existing[0].id, project=project_id, url=backend_url, is_interactive=False, **auth)
    else:
        ml = client.ml.create(project=project_id, url=backend_url, title=title, is_interactive=False, **auth)
    if webhook_secret:  # a webhook Label Studio made anyway (e.g. added by hand earlier) goes
        ensure_webhook(client, project_id, backend_url, webhook_secret, replace_urls=old_urls)
    return int(ml.id)


def ml_backend_state(client, project_id: int) -> str | None:
    """State Label Studio shows for the project's first ML backend (``CO`` connected, ``DI``
    disconnected, ``ER`` error, ``TR`` training), or None without one. Listing makes Label
    Studio call /health (protocol doc §1)."""
    mls = client.ml.list(project=project_id)
    return str(_get(mls[0], "state")) if mls else None


def api_error_text(e: Exception) -> str:
    """An SDK/HTTP error as one line without headers or cookies: ``HTTP <status>: <detail>``."""
    status = getattr(e, "status_code", None)
    body = getattr(e, "body", None)
    if status is None:
        return f"{e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    detail = body.get("detail") or body.get("validation_errors") or body if isinstance(body, dict) else body
    return f"HTTP {status}: {str(detail)[:300]}"


#: Text of the status link faceloop writes into a project's instructions and description; an
#: earlier link (with or without the new-tab hint after it) is found by it and replaced at each
#: ``faceloop up`` (Label Studio strips HTML comments and ``target`` from instructions, so no
#: markers survive).
_STATUS_LINE = "faceloop status: "
#: Shown after the link: Label Studio drops ``target="_blank"`` (see :func:`set_status_link`).
_NEW_TAB_HINT = "(Ctrl/⌘-click or middle-click: opens in a new tab and keeps unsaved edits here)"
_STATUS_LINK = re.compile(r'<p><a href="[^"]*"[^>]*>faceloop status:[^<]*</a>[^<]*</p>\n?')


def set_status_link(client, project_id: int, status_url: str) -> None:
    """Link the project's faceloop status page from Label Studio (issue 11).

    Writes the link at the top of the project's instructions (``expert_instruction``, HTML; shown by
    the *Instructions* button of the labeling view, and before labeling when the project's "Show
    before labeling" is on) and as a line ``faceloop status: <url>`` of its ``description`` (the
    project card). The person's own instructions and description are kept; an earlier faceloop
    link is replaced. ``show_instruction`` is left as it is (:func:`create_project` turns it on
    for the projects faceloop creates: then the instructions open when a person starts labeling,
    and the status page is one click away).

    Args:
        status_url: absolute URL of ``/status/<project_id>`` as the person's browser reaches the backend.
    Raises: ValueError for a URL that is not http(s); the SDK's ApiError when Label Studio refuses.
    """
    import html

    if not re.match(r"^https?://[^\s\"'<>]+$", status_url or ""):
        raise ValueError(f"status URL must be an http(s) URL without spaces or quotes, got {status_url!r}")
    p = client.projects.get(id=project_id)
    instr = _STATUS_LINK.sub("", _get(p, "expert_instruction") or "")
    # Label Studio 1.23.2 keeps ``rel`` but strips ``target`` (projects/serializers.py cleans the
    # instructions with bleach and constants.SAFE_HTML_ATTRIBUTES has no ``target``): a plain click
    # opens the page in the labeling tab, so the link says how to open it in a new one (``target``
    # is sent all the same, for a Label Studio that keeps it)
    link = (f'<p><a href="{html.escape(status_url)}" target="_blank" rel="noopener noreferrer">'
            f"{_STATUS_LINE}training, model versions, pre-label acceptance</a> {_NEW_TAB_HINT}</p>\n")
    desc_lines = [ln for ln in (_get(p, "description") or "").splitlines() if not ln.startswith(_STATUS_LINE)]
    desc = "\n".join([*desc_lines, _STATUS_LINE + status_url]).strip()
    client.projects.update(id=project_id, expert_instruction=link + instr, description=desc)
