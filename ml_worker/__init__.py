"""faceloop worker: Celery tasks that train, evaluate, promote and score (plain functions inside)."""
