"""Celery application (broker and results on Redis). Queues: ``train`` (GPU worker), ``score``."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from backend.config import Settings, get_settings


@lru_cache(maxsize=8)
def _make(broker: str, backend: str, visibility_timeout_s: int = 3600) -> Celery:
    app = Celery("faceloop", broker=broker, backend=backend, include=["ml_worker.tasks"])
    app.conf.update(
        task_acks_late=True,               # a worker that dies mid-task gets the message redelivered
        task_reject_on_worker_lost=True,   # ... at once when a pool process dies (kill -9, OOM)
        worker_prefetch_multiplier=1,      # long training tasks: take one at a time
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        task_default_queue="score",
        task_routes={"faceloop.train": {"queue": "train"}},
        result_expires=7 * 24 * 3600,
        # redelivery of a message whose worker vanished; a redelivered training is harmless
        # (it waits on the project lock, then finds its job no longer queued)
        broker_transport_options={"visibility_timeout": visibility_timeout_s},
        task_serializer="json", result_serializer="json", accept_content=["json"],
    )
    return app


def make_celery(settings: Settings | None = None) -> Celery:
    """The Celery app for ``settings`` (cached per broker/backend URL)."""
    s = settings or get_settings()
    return _make(s.celery_broker_url, s.celery_result_backend, int(s.celery_visibility_timeout_s))


app = make_celery()
