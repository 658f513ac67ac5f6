"""Label Studio calls through label-studio-sdk: snapshot annotations, write predictions, views.

Part of the Label Studio adapter (with :mod:`backend.labels`); SDK behaviour and caveats are in
label-studio-protocol.md §4 (plain iteration of ``tasks.list`` pages safely; ``only_annotated``
is ignored by the open-source edition, so tasks are split here).
"""

from __future__ import annotations

import logging
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


def snapshot(client, project_id: int) -> list[SnapshotTask]:
    """All tasks of a project with their latest non-cancelled annotation (paged, 100 a page).

    An annotation with an empty ``result`` is kept as ``[]``: a background image (no face).
    """
    out = []
    for t in client.tasks.list(project=project_id, page_size=100, fields="all"):
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
    """Data Manager view: unlabelled tasks, lowest prediction score (= most uncertain) first."""
    return {
        "title": title,
        "ordering": ["tasks:predictions_score"],
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}]},
    }


def refresh_review_view(client, project_id: int, title: str) -> int:
    """Create the review-queue view, or reset an existing one of that title. Returns its id."""
    data = review_view_data(title)
    for v in client.views.list(project=project_id):
        if (_get(_get(v, "data") or {}, "title")) == title:
            client.views.update(id=v.id, project=project_id, data=data)
            return v.id
    return client.views.create(project=project_id, data=data).id


def review_queue(client, project_id: int, title: str, limit: int = 20) -> list[dict]:
    """The head of the review view as Label Studio serves it: ``[{"id", "score"}]``."""
    vid = refresh_review_view(client, project_id, title)
    out = []
    for t in client.tasks.list(project=project_id, view=vid, page_size=min(limit, 100), fields="all"):
        # predictions_score is computed over predictions of project.model_version
        out.append({"id": int(_get(t, "id")), "score": _get(t, "predictions_score")})
        if len(out) >= limit:
            break
    return out


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def create_project(client, title: str, label_config: str, description: str = "") -> int:
    """Create a Label Studio project; returns its id. The config is checked first.

    Raises: backend.labels.LabelConfigError for a config faceloop cannot serve.
    """
    from backend.labels import ProjectSchema

    ProjectSchema.parse(label_config)
    p = client.projects.create(title=title, label_config=label_config, description=description,
                               show_collab_predictions=True)
    return int(p.id)


def import_local_images(client, project_id: int, paths: list, document_root, value_key: str = "image") -> list[int]:
    """Import images that stay on disk as ``/data/local-files/?d=<path under document_root>`` tasks.

    Label Studio must serve local files from ``document_root``
    (``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true``, ``..._DOCUMENT_ROOT``). Returns task ids.
    Raises: ValueError for a path outside ``document_root``.
    """
    from pathlib import Path
    from urllib.parse import quote

    root = Path(document_root).resolve()
    tasks = []
    for p in paths:
        rel = Path(p).resolve().relative_to(root)
        tasks.append({"data": {value_key: f"/data/local-files/?d={quote(str(rel))}"}})
    ids: list[int] = []
    for i in range(0, len(tasks), 500):
        r = client.projects.import_tasks(id=project_id, request=tasks[i : i + 500], return_task_ids=True)
        ids.extend(_get(r, "task_ids") or [])
    return ids


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


def connect_backend(client, project_id: int, backend_url: str, title: str = "faceloop") -> int:
    """Add faceloop as the project's ML backend (Label Studio checks /health and /setup) and
    return the ML backend id. Label Studio also creates the ``<url>/webhook`` webhook."""
    ml = client.ml.create(project=project_id, url=backend_url, title=title, is_interactive=False)
    return int(ml.id)
