"""Drive the loop as a person would, from ground-truth YOLO labels (the demo and the e2e test).

Creates a project, imports images, connects the backend, retrieves pre-annotations, submits
annotations taken from a dataset's YOLO label files, presses *Start Training* (``ml.train``)
and waits for the new model version, all through label-studio-sdk.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from PIL import Image, ImageOps

from backend.labels import Box, ProjectSchema


def dataset_names(data_dir: Path) -> list[str]:
    """Class names of a YOLO dataset folder (``data.yaml`` ``names``, dict or list)."""
    names = yaml.safe_load((Path(data_dir) / "data.yaml").read_text())["names"]
    return [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)


def label_file_for(image: Path) -> Path:
    """``.../images/<split>/x.jpg`` -> ``.../labels/<split>/x.txt`` (YOLO layout)."""
    parts = list(Path(image).parts)
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def ground_truth_boxes(image: Path, names: list[str]) -> tuple[list[Box], int, int]:
    """Ground-truth boxes of a YOLO-layout image in pixels, with its (EXIF-oriented) size."""
    with Image.open(image) as im:
        w, h = ImageOps.exif_transpose(im).size
    boxes = []
    lf = label_file_for(image)
    for line in (lf.read_text().splitlines() if lf.exists() else []):
        parts = line.split()
        if len(parts) != 5:
            continue
        c, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:])
        boxes.append(Box((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h, label=names[c]))
    return boxes, w, h


def annotate_from_ground_truth(client, project_id: int, task_images: dict[int, Path], schema: ProjectSchema,
                               names: list[str]) -> int:
    """Submit one annotation per task from its ground-truth label file. Returns how many.

    A Choices project (``schema.is_choices``) gets the class of the image's largest ground-truth
    face as its choice (the face faceloop serves the image's class from; an image without a
    face gets an empty annotation)."""
    n = 0
    for tid, img in task_images.items():
        boxes, w, h = ground_truth_boxes(img, names)
        if schema.is_choices:
            main = max(boxes, key=lambda b: (b.x2 - b.x1) * (b.y2 - b.y1), default=None)
            result = [{k: v for k, v in schema.choice_region(main.label).items() if k != "score"}] if main else []
        else:
            result = [{k: v for k, v in schema.region(b, w, h).items() if k != "score"} for b in boxes]
        client.annotations.create(id=tid, result=result)
        n += 1
    return n


def retrieve_predictions(client, project_id: int, task_ids: list[int] | None = None) -> None:
    """Run the Data Manager action *Retrieve Predictions* (``retrieve_tasks_predictions``) on
    the given tasks (default all): Label Studio then calls the backend's ``/setup`` and
    ``/predict`` itself and stores the answers."""
    sel = {"all": False, "included": list(task_ids)} if task_ids else {"all": True, "excluded": []}
    client.actions.create(id="retrieve_tasks_predictions", project=project_id, selected_items=sel)


def wait_for_job(database_url: str, project_id: int, timeout: float, after_job: int = 0, poll: float = 2.0,
                 on_progress=None):
    """Wait until a training job of the project with id > ``after_job`` has finished, with the
    scoring runs it queued after a promotion (their scores stored and their Label Studio
    write-back delivered, or failed).

    Returns: the finished ``TrainingJob``. Raises: TimeoutError (with the last progress message).
    """
    from sqlmodel import select

    from backend.db import session_scope
    from backend.models import ScoringRun, TrainingJob

    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        with session_scope(database_url) as s:
            jobs = s.exec(select(TrainingJob).where(TrainingJob.project_id == project_id,
                                                    TrainingJob.id > after_job).order_by(TrainingJob.id)).all()
            done = [j for j in jobs if j.state in ("succeeded", "failed", "skipped")]
            live = [j for j in jobs if j.state in ("queued", "running")]
            runs = s.exec(select(ScoringRun).where(ScoringRun.training_job_id.in_([j.id for j in done]))).all()
            scoring = [r for r in runs if r.state in ("queued", "running") or r.write_state == "pending"]
            if done and not live and not scoring:
                return done[-1]
            if not live and scoring and on_progress:
                r = scoring[0]
                msg = f"scoring run {r.id} {r.state}, write-back {r.write_state or 'not started'}"
                if msg != last:
                    on_progress(msg)
                    last = msg
            if live and on_progress:
                msg = f"job {live[0].id} {live[0].state} {live[0].stage}: {live[0].message}"
                if msg != last:
                    on_progress(msg)
                    last = msg
        time.sleep(poll)
    raise TimeoutError(f"no finished training job for project {project_id} within {timeout:.0f} s (last: {last})")
