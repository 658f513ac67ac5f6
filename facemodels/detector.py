"""Stage 1 and the one place that knows ultralytics: load a YOLO model, detect faces with full
class-score vectors. Used by the backend (serve) and the worker (train, score), so it lives here.

Everything here speaks pixels of the EXIF-oriented image and model class indices; mapping to
Label Studio's labels and percent coordinates lives in :mod:`backend.labels` and
:mod:`backend.geometry`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend.config import configure_ultralytics

configure_ultralytics()

from ultralytics import YOLO  # noqa: E402
from ultralytics.models.yolo.detect import DetectionPredictor  # noqa: E402
from ultralytics.utils import nms  # noqa: E402

#: Index of the SPPF layer (end of the backbone) in ultralytics' ``yolov5nu.yaml``; its pooled
#: output is the image embedding used for diversity sampling.
EMBED_LAYER = 9


@dataclass
class Detection:
    """One detected face.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in pixels of the EXIF-oriented image.
        conf: the model's confidence (0-1), the max of ``class_scores``.
        cls: index of the best class in the model's class list.
        class_scores: ``(nc,)`` independent sigmoid scores (0-1) of every model class; for a
            two-stage model, the face-crop classifier's softmax probabilities (sum 1).
        face_conf: two-stage models only: the face detector's confidence (0-1) that this box is a
            face, independent of its class; None for a single-stage model.
    """

    box: tuple[float, float, float, float]
    conf: float
    cls: int
    class_scores: np.ndarray
    face_conf: float | None = None


@dataclass
class ImageDetections:
    """Detections of one image, sorted by confidence (highest first).

    Attributes:
        width, height: image size in pixels (after EXIF orientation).
        detections: boxes at or above the candidate threshold.
        embedding: ``(C,)`` L2-normalised mean-pooled backbone features (for diversity).
    """

    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)
    embedding: np.ndarray | None = None


class ScoringPredictor(DetectionPredictor):
    """DetectionPredictor that keeps each kept box's full class-score vector.

    ultralytics' ``Results.boxes`` hold only the top class and its score; the detect head's raw
    output is ``(B, 4 + nc, anchors)`` with independent sigmoid class scores, and
    ``non_max_suppression(..., return_idxs=True)`` gives the kept anchors, so the vectors can be
    gathered from the raw output. The result gets ``class_scores`` ``(n, nc)`` and, where an
    embedding hook is set, ``embedding``.
    """

    def postprocess(self, preds, img, orig_imgs, **kwargs):  # noqa: D102 - see class docstring
        raw = preds[0] if isinstance(preds, (list, tuple)) else preds
        dets, keep = nms.non_max_suppression(
            raw, self.args.conf, self.args.iou, self.args.classes, self.args.agnostic_nms,
            max_det=self.args.max_det, return_idxs=True,
        )
        if not isinstance(orig_imgs, list):
            from ultralytics.utils import ops

            orig_imgs = ops.convert_torch2numpy_batch(orig_imgs)[..., ::-1]
        results = self.construct_results(dets, img, orig_imgs)
        nc = raw.shape[1] - 4
        for b, (r, idx) in enumerate(zip(results, keep)):
            idx = idx.view(-1).long()
            r.class_scores = raw[b, 4 : 4 + nc, idx].T.float().cpu().numpy() if idx.numel() else np.zeros((0, nc))
        return results


class FaceModel:
    """A loaded YOLO face/expression detector.

    Args:
        path: ``.pt`` weights, or a model yaml such as ``yolov5nu.yaml`` (untrained).
        device: torch device string, '' for ultralytics' default (first GPU if any, else CPU).
    Attributes:
        names: model class names in index order.
    Raises:
        FileNotFoundError: the weights file does not exist.
    """

    def __init__(self, path: str | Path, device: str = ""):
        p = Path(path)
        if p.suffix == ".pt" and not p.exists():
            raise FileNotFoundError(f"model weights not found: {p}")
        self.path = str(path)
        self.device = device or None
        self.yolo = YOLO(self.path, task="detect")
        self.names: list[str] = [self.yolo.names[i] for i in sorted(self.yolo.names)]
        self._lock = threading.Lock()
        #: NMS IoU (0-1) of :meth:`detect`; a two-stage bundle sets its detector's tuned value
        self.nms_iou = 0.7
        self._pooled: list[np.ndarray] = []
        self._hooked = False

    def _hook(self, _module, _inp, out):
        self._pooled.append(out.detach().float().mean(dim=(2, 3)).cpu().numpy())

    def _ensure_hook(self):
        if not self._hooked and self.yolo.predictor is not None:
            self.yolo.predictor.model.model.model[EMBED_LAYER].register_forward_hook(self._hook)
            self._hooked = True

    def detect(
        self, images: list[np.ndarray], conf: float, imgsz: int = 320, batch: int = 16, embed: bool = False,
        iou: float | None = None,
    ) -> list[ImageDetections]:
        """Detect faces in RGB images.

        Args:
            images: list of ``(H, W, 3)`` uint8 RGB arrays (EXIF orientation already applied).
            conf: minimum box confidence (0-1).
            imgsz: inference size in pixels (letterboxed square).
            batch: images per forward pass.
            embed: also compute the backbone embedding of each image.
            iou: NMS IoU (0-1) above which the lower-scored of two boxes is dropped; default
                :attr:`nms_iou` (ultralytics' 0.7 unless set).
        Returns: one :class:`ImageDetections` per image, in order.
        """
        out: list[ImageDetections] = []
        with self._lock:  # one predictor per model; ultralytics predictors are not re-entrant
            for start in range(0, len(images), batch):
                chunk = images[start : start + batch]
                bgr = [np.ascontiguousarray(im[..., ::-1]) for im in chunk]
                self._pooled = []
                if embed and self.yolo.predictor is None:
                    self.yolo.predict(bgr[:1], conf=conf, imgsz=imgsz, device=self.device, verbose=False,
                                      predictor=ScoringPredictor, batch=batch, agnostic_nms=True)
                if embed:
                    self._ensure_hook()
                self._pooled = []
                results = self.yolo.predict(
                    bgr, conf=conf, imgsz=imgsz, device=self.device, verbose=False,
                    predictor=ScoringPredictor, batch=batch, agnostic_nms=True,
                    iou=self.nms_iou if iou is None else iou,
                )
                pooled = np.concatenate(self._pooled, 0) if (embed and self._pooled) else None
                for i, (im, r) in enumerate(zip(chunk, results)):
                    h, w = im.shape[:2]
                    dets = []
                    xyxy = r.boxes.xyxy.cpu().numpy() if len(r.boxes) else np.zeros((0, 4))
                    confs = r.boxes.conf.cpu().numpy() if len(r.boxes) else np.zeros(0)
                    clss = r.boxes.cls.cpu().numpy().astype(int) if len(r.boxes) else np.zeros(0, int)
                    for j in np.argsort(-confs):
                        dets.append(Detection(tuple(float(v) for v in xyxy[j]), float(confs[j]), int(clss[j]),
                                              r.class_scores[j].astype(np.float64)))
                    emb = None
                    if pooled is not None and i < len(pooled):
                        v = pooled[i]
                        emb = v / (np.linalg.norm(v) + 1e-12)
                    out.append(ImageDetections(w, h, dets, emb))
        return out


class ModelCache:
    """Loaded models keyed by weights path (and file mtime), so a promoted version is picked up
    on the next request without a restart and unchanged ones are never reloaded."""

    def __init__(self, device: str = "", max_models: int = 4):
        self.device = device
        self.max_models = max_models
        self._models: dict[tuple[str, float], FaceModel] = {}
        self._lock = threading.Lock()

    def get(self, path: str | Path):
        """Return the model at ``path`` (YOLO ``.pt`` weights: :class:`FaceModel`; a two-stage
        bundle ``.json``: :class:`facemodels.two_stage.TwoStageModel`), loading it on first use.
        Raises FileNotFoundError."""
        p = Path(path)
        key = (str(p.resolve()) if p.exists() else str(p), p.stat().st_mtime if p.exists() else 0.0)
        with self._lock:
            m = self._models.get(key)
            if m is None:
                from facemodels.two_stage import TwoStageModel, is_bundle

                m = TwoStageModel(p, self.device) if is_bundle(p) else FaceModel(p, self.device)
                if len(self._models) >= self.max_models:
                    self._models.pop(next(iter(self._models)))
                self._models[key] = m
            return m
