"""A two-stage model version: a YOLO face detector finds the faces, a face-crop classifier names them.

One model version of a project is one *bundle*: a small JSON file that names its two weight files
(paths relative to the JSON's folder) with their SHA-256, and the classifier's classes::

    {"format": "faceloop-two-stage", "format_version": 1,
     "detector": "detector.pt", "detector_sha256": "...",
     "classifier": "classifier.pt", "classifier_sha256": "...",
     "classes": ["awake", "sleep"], "imgsz": 256, "nms_iou": 0.3, "face_threshold": 0.3}

``nms_iou`` (the detector's NMS IoU) and ``face_threshold`` (the face confidence at which a box is
shown) are optional; trained versions get a threshold tuned on the project's labelled images.

The shipped default is ``models/faceloop-default.json`` (``models/faceloop-face.pt`` +
``models/face_expression.pt``; provenance in ``models/MODEL_CARD.md``). A version written by the
worker lives in its own folder of the model store (``<model_dir>/project_<id>/<version>/``).

:class:`TwoStageModel` has the same ``detect()`` and ``names`` as :class:`facemodels.detector.FaceModel`,
so the serve and score stations use either; its detections carry the detector's face confidence
(``face_conf``) and the classifier's softmax probabilities over :attr:`names` (``class_scores``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from backend.hashing import file_sha256

FORMAT = "faceloop-two-stage"
FORMAT_VERSION = 1


def is_bundle(path: str | Path) -> bool:
    """True when ``path`` names a two-stage bundle (a ``.json`` file) rather than YOLO weights."""
    return str(path).endswith(".json")


def read_bundle(path: str | Path) -> dict:
    """Read a bundle and resolve its weight paths (absolute ``detector_path``/``classifier_path``).

    Raises:
        FileNotFoundError: the bundle or one of its weight files is missing.
        ValueError: not a faceloop two-stage bundle.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model bundle not found: {p}")
    try:
        b = json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p} is not a model bundle: {e}") from None
    if not isinstance(b, dict) or b.get("format") != FORMAT:
        raise ValueError(f"{p} is not a {FORMAT} bundle")
    for key in ("detector", "classifier"):
        w = (p.parent / b[key]).resolve()
        if not w.is_file():
            raise FileNotFoundError(f"{key} weights of {p.name} not found: {w}")
        b[f"{key}_path"] = str(w)
    return b


def write_bundle(folder: Path, detector: Path, classifier: Path, classes: list[str], **extra) -> Path:
    """Write a version folder atomically: copy both weight files and ``bundle.json`` into a
    temporary sibling folder, fsync, then rename it to ``folder`` (a crash never leaves a
    half-written version that could be served).

    Returns: the path of ``folder/bundle.json``.
    Raises: FileExistsError when ``folder`` exists already.
    """
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"model version folder exists already: {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        shutil.copyfile(detector, tmp / "detector.pt")
        shutil.copyfile(classifier, tmp / "classifier.pt")
        bundle = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "detector": "detector.pt", "detector_sha256": file_sha256(tmp / "detector.pt"),
                  "classifier": "classifier.pt", "classifier_sha256": file_sha256(tmp / "classifier.pt"),
                  "classes": list(classes), **extra}
        (tmp / "bundle.json").write_text(json.dumps(bundle, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "bundle.json"


class TwoStageModel:
    """Stage 1 (YOLO face detector) + stage 2 (face-crop classifier) behind one ``detect()``.

    Args:
        path: a bundle JSON (see module docstring).
        device: torch device for the detector ('' = ultralytics' default).
    Attributes:
        names: the classifier's class names, index order of ``class_scores``.
        detector: :class:`facemodels.detector.FaceModel`; classifier: :class:`facemodels.classifier.FaceClassifier`.
    Raises: FileNotFoundError / ValueError as :func:`read_bundle`.
    """

    def __init__(self, path: str | Path, device: str = ""):
        from facemodels.detector import FaceModel
        from facemodels.classifier import FaceClassifier

        self.path = str(path)
        self.bundle = read_bundle(path)
        self.detector = FaceModel(self.bundle["detector_path"], device)
        if self.bundle.get("nms_iou") is not None:  # tuned with the detector (docs/detector.md)
            self.detector.nms_iou = float(self.bundle["nms_iou"])
        self.classifier = FaceClassifier.load(self.bundle["classifier_path"])
        self.names: list[str] = list(self.classifier.classes)
        #: face confidence (0-1) tuned on the labelled images when this version was trained, or None
        self.face_threshold: float | None = self.bundle.get("face_threshold")
        self._lock = threading.Lock()

    def detect(self, images: list[np.ndarray], conf: float, imgsz: int = 256, batch: int = 16,
               embed: bool = False):
        """Faces of each image with the classifier's probabilities.

        Args:
            images: ``(H, W, 3)`` uint8 RGB arrays (EXIF orientation applied).
            conf: minimum face confidence (0-1) of a detection.
            imgsz: detector inference size, pixels.
            embed: also return the detector's image embedding (for diversity sampling).
        Returns: list of :class:`facemodels.detector.ImageDetections`; each detection's ``face_conf`` is
            the detector's confidence, ``class_scores`` the ``(K,)`` softmax probabilities over
            :attr:`names`, ``conf`` = ``face_conf * max(class_scores)``.
        """
        from facemodels.detector import Detection

        dets = self.detector.detect(images, conf=conf, imgsz=imgsz, batch=batch, embed=embed)
        with self._lock:
            for im, d in zip(images, dets):
                if not d.detections:
                    continue
                h, w = im.shape[:2]
                boxes = np.array([x.box for x in d.detections], dtype=np.float64)
                boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
                boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
                ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
                probs = np.full((len(boxes), len(self.names)), 1.0 / max(len(self.names), 1))
                if ok.any():
                    probs[ok] = self.classifier.predict_proba(im, boxes[ok])
                d.detections = [
                    Detection(x.box, float(x.conf * p.max()), int(p.argmax()), p.astype(np.float64), float(x.conf))
                    for x, p in zip(d.detections, probs)
                ]
        return dets
