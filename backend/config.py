"""One settings object for the whole of faceloop (backend, worker, CLI).

Every field is read from the environment (or a ``.env`` file in the working directory) by
pydantic-settings; the environment variable is the upper-cased field name, e.g.
``LABEL_STUDIO_URL``, ``DATABASE_URL``, ``CELERY_BROKER_URL``, ``MODEL_DIR``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The default model version every project starts from: a two-stage bundle (face detector +
#: face-crop classifier, ``facemodels.two_stage``; provenance in models/MODEL_CARD.md).
DEFAULT_MODEL_PATH = REPO_ROOT / "models" / "faceloop-default.json"
#: The single-stage YOLO expression model of the first release (the active-learning simulation's
#: starting point; no longer served by default).
SINGLE_STAGE_BASE_PATH = REPO_ROOT / "models" / "faceloop-base.pt"
LABEL_CONFIG_DIR = REPO_ROOT / "label_config"


class Settings(BaseSettings):
    """faceloop configuration; see the module docstring for how fields are read."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    # Label Studio
    label_studio_url: str = Field("http://127.0.0.1:8080", description="Base URL of Label Studio")
    label_studio_api_key: str = Field(
        "", description="Personal access token (a JWT refresh token) or legacy token"
    )
    label_studio_url_aliases: str = Field(
        "", description="Comma-separated other base URLs of the same Label Studio (e.g. http://localhost:8080 "
        "beside http://127.0.0.1:8080). Credentials go only to LABEL_STUDIO_URL and these; never to /setup's hostname")
    label_studio_instance: str = Field(
        "", description="Identity of the Label Studio this backend serves (`faceloop up` sets one per stack): "
        "a project row of another instance in the database is refused, never mixed; empty = no check")
    local_files_document_root: str = Field(
        "", description="If set, /data/local-files/?d=... URLs are read from this folder on disk"
    )

    # State
    var_dir: Path = Field(REPO_ROOT / "var", description="Folder for the database, models, jobs")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///<var_dir>/faceloop.db")
    model_dir: Path = Field(Path(""), description="Versioned weights; default <var_dir>/models")
    default_model_path: Path = Field(DEFAULT_MODEL_PATH, description="Model every project starts from")

    # Celery / Redis
    celery_broker_url: str = "redis://127.0.0.1:6379/0"
    celery_result_backend: str = ""

    # Backend HTTP
    basic_auth_user: str = Field("", description="Basic auth user for every route (set with BASIC_AUTH_PASS)")
    basic_auth_pass: str = ""
    webhook_secret: str = Field(
        "", description="If set, /webhook takes header X-Faceloop-Secret (or basic auth, as START_TRAINING has)")
    allow_remote_without_auth: bool = Field(
        False, description="Without BASIC_AUTH_USER the backend answers loopback clients only; true lifts that")
    max_body_bytes: int = Field(10 * 1024 * 1024, description="Largest request body (413 above)")
    max_json_depth: int = Field(64, description="Deepest JSON nesting accepted in a request body (400 above)")
    max_tasks_per_request: int = Field(1000, description="Most tasks in one /predict request (413 above)")

    # Model / inference
    imgsz: int = Field(256, description="Inference and training image size, pixels (the default model's)")
    score_threshold: float = Field(0.25, description="Min box confidence (0-1) for a pre-annotation")
    candidate_threshold: float = Field(0.01, description="Min confidence of low-score face candidates")
    max_image_bytes: int = Field(30 * 1024 * 1024, description="Largest image file, bytes")
    max_image_pixels: int = Field(
        40_000_000, description="Most pixels decoded per image (read from the header before decoding; a larger "
        "JPEG is decoded at 1/2, 1/4 or 1/8 scale to fit, other formats are refused)")
    min_image_side: int = Field(16, description="Images narrower or lower than this (pixels) are refused")
    max_image_side: int = Field(
        2048, description="Decoded images are reduced (integer factor, box filter) to this long side, pixels; "
        "bounds memory (the model sees IMGSZ anyway); 0 = keep full size")
    image_fetch_timeout_s: float = Field(10.0, description="Overall deadline of one image download, seconds")
    max_concurrent_fetches: int = Field(16, description="Image downloads at once per process")
    max_concurrent_decodes: int = Field(
        1, description="Image decodes at once per process: each may take 4 bytes x MAX_IMAGE_PIXELS (160 MB at 40 MP)")
    image_urls_allow_private: bool = Field(
        False, description="Fetch task images from private/loopback hosts other than Label Studio (off: refused)")
    device: str = Field("", description="torch device for training/inference; '' = cuda:0 if available")

    # Worker faults (issue 9 §6)
    job_heartbeat_ttl_s: float = Field(
        45.0, description="A running training job's lock and heartbeat expire this long after its worker dies; "
        "renewed every quarter of it while the worker lives")
    recovery_interval_s: float = Field(
        20.0, description="How often the backend and each worker look for lost jobs and re-send queued jobs "
        "never sent (0 = off). A job is declared lost after two checks without heartbeat")
    celery_visibility_timeout_s: int = Field(
        3600, description="Redis redelivers a task not acknowledged after this long (acks_late); safe below the "
        "longest job because a redelivered training waits on the project lock and then finds its job done")

    # Training
    train_epochs: int = 30
    train_batch: int = 16
    train_patience: int = 0
    detector_epochs: int = Field(10, description="Epochs of the face detector (stage 1) per retrain")
    classifier_epochs: int = Field(0, description="Epochs of the face-crop classifier (stage 2) per retrain; "
                                   "0 = the recipe's default (facemodels.classifier.RECIPE)")
    classifier_refit_epochs: int = Field(
        20, ge=0, description="After the promotion gate, fine-tune the promoted version's classifier this many more "
        "epochs on ALL labelled face crops (train + validation split; 0 = off; measured in docs/training.md). "
        "The next gate judges such a version by the classifier it had at its own gate")
    classifier_refit_from: Literal["candidate", "parent"] = Field(
        "candidate", description="Start of that pass: 'candidate' (continue from the gated classifier) or "
        "'parent' (the classifier the retrain started from, i.e. the whole recipe again on every face)")
    classifier_detector_crops: bool = Field(
        True, description="Stage 2 also learns from the retrained detector's box on each labelled face (IoU >= 0.5 "
        "with it, at the tuned face threshold): the crops it classifies when serving (measured in docs/classifier.md)")
    retrain_min_annotations: int = Field(
        10, description="New annotations that trigger a retrain (project setting wins if > 0)"
    )
    val_fraction: float = Field(0.2, description="Share of annotated tasks in the validation split")
    seed: int = 0

    # Sampling
    uncertainty_measure: str = Field("margin", description="least_confidence | margin | entropy (review-queue order)")
    aggregation: str = Field("max", description="How box uncertainties make an image's: max | mean | sum")
    query_batch_size: int = Field(20, ge=0, description="Images the sampler picks per round (QUERY_STRATEGY)")
    query_batch_rounds: int = Field(
        3, ge=1, description="Rounds of QUERY_BATCH_SIZE picks the query batch holds, each picked as if the rounds "
        "before it were labelled (ml_worker.scoring.pick_rounds): Label All Tasks serves them in order and keeps "
        "serving picks, not the most uncertain, when a retrain is rejected or still running")
    query_strategy: str = Field(
        "", description="Query-batch strategy (ml_worker.sampler.STRATEGIES); '' = ml_worker.sampler.DEFAULT_QUERY_STRATEGY")
    review_view_title: str = "Review queue"
    score_chunk_size: int = Field(
        64, ge=0, description="Tasks per chunk when a scoring run of the whole pool is split over workers (Celery chord, "
        "ml_worker.tasks); a pool of at most this many tasks is scored by one task; 0 = never split")

    @field_validator("uncertainty_measure", "aggregation", "query_strategy")
    @classmethod
    def _known_sampling_choice(cls, v: str, info) -> str:
        """A misspelt measure, aggregation or strategy fails at start-up with the valid choices,
        not later inside a scoring job (which would leave the pool unscored)."""
        from backend.uncertainty import AGGREGATIONS, MEASURES

        if info.field_name == "query_strategy":
            from ml_worker.sampler import STRATEGIES as choices

            if v == "":
                return v
        else:
            choices = MEASURES if info.field_name == "uncertainty_measure" else AGGREGATIONS
        if v not in choices:
            raise ValueError(f"{v!r} is not one of {', '.join(choices)}")
        return v

    def model_post_init(self, __context) -> None:  # noqa: D401 - pydantic hook
        self.var_dir = Path(self.var_dir).resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.var_dir / 'faceloop.db'}"
        if str(self.model_dir) in ("", "."):
            self.model_dir = self.var_dir / "models"
        if not self.celery_result_backend:
            self.celery_result_backend = self.celery_broker_url


@lru_cache
def get_settings() -> Settings:
    """Return the process-wide settings (cached; tests build their own ``Settings``)."""
    return Settings()


def configure_ultralytics(var_dir: Path | None = None) -> None:
    """Keep ultralytics offline and out of ``~/.config``.

    Sets ``YOLO_OFFLINE``, ``YOLO_CONFIG_DIR`` and ``MPLCONFIGDIR`` to folders of ours, and puts a
    TTF font where ultralytics' font check looks (``Arial.ttf``, ``Arial.Unicode.ttf``) so it never
    tries to download one. Must run before ``ultralytics`` is imported.
    """
    base = Path(var_dir or os.environ.get("VAR_DIR") or REPO_ROOT / "var").resolve()
    cfg = base / "ultralytics"
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install at run time
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cfg))
    os.environ.setdefault("MPLCONFIGDIR", str(base / "matplotlib"))
    os.environ.setdefault("YOLO_VERBOSE", "False")
    font_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    Path(os.environ["MPLCONFIGDIR"]).mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = font_dir / name
        if not target.exists():
            try:
                import matplotlib

                src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
                target.write_bytes(src.read_bytes())
            except Exception:  # pragma: no cover - matplotlib missing: ultralytics then warns
                pass
