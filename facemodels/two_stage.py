"""A two-stage model version: a YOLO face detector finds the faces, a face-crop classifier names them.

One model version of a project is one *bundle*: a small JSON file that names its two weight files
(paths relative to the JSON's folder) with their SHA-256, and the classifier's classes::

    {"format": "faceloop-two-stage", "format_version": 1,
     "detector": "detector.pt", "detector_sha256": "...",
     "classifier": "classifier.pt", "classifier_sha256": "...",
     "classes": ["awake", "sleep"], "imgsz": 256, "nms_iou": 0.3, "face_threshold": 0.3}

Optional ``classifier_init`` (+ ``classifier_init_sha256``): the classifier weights a retrain for
classes the served classifier does not know starts from (:func:`classifier_init_path`).

``nms_iou`` (the detector's NMS IoU) and ``face_threshold`` (the face confidence at which a box is
shown) are optional; trained versions get a threshold tuned on the project's labelled images.
A version written by :func:`write_bundle` also holds both stages exported to ONNX (``detector.onnx``,
``classifier.onnx``, recorded as ``detector_onnx``/``detector_onnx_sha256`` and
``classifier_onnx``/``classifier_onnx_sha256``); they are served with ONNX Runtime
(:mod:`facemodels.onnx_runtime`; ``INFERENCE_BACKEND=torch`` serves the ``.pt`` files instead).

The shipped default is ``models/faceloop-default.json`` (``models/faceloop-face.pt`` +
``models/face_expression_ft.pt``, with ``models/face_expression.pt`` as ``classifier_init``;
provenance in ``models/MODEL_CARD.md``). A version written by the
worker lives in its own folder of the model store (``<model_dir>/project_<id>/<version>/``).

:class:`TwoStageModel` has the same ``detect()`` and ``names`` as :class:`facemodels.detector.FaceModel`,
so the serve and score stations use either; its detections carry the detector's face confidence
(``face_conf``) and the classifier's softmax probabilities over :attr:`names` (``class_scores``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from backend.hashing import file_sha256

log = logging.getLogger("faceloop.models")

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
    for key in ("detector", "classifier", "classifier_init"):
        if key == "classifier_init" and not b.get(key):
            continue
        w = (p.parent / b[key]).resolve()
        if not w.is_file():
            raise FileNotFoundError(f"{key} weights of {p.name} not found: {w}")
        b[f"{key}_path"] = str(w)
    return b


def classifier_init_path(bundle: dict, labels) -> str:
    """The classifier weights a retrain's stage 2 starts from, for a project with ``labels``.

    ``bundle``: as returned by :func:`read_bundle`. A bundle may name, besides the ``classifier`` it
    serves, a ``classifier_init`` (the shipped default does: it serves ``face_expression_ft.pt``,
    the expression net fine-tuned on posed expressions, and names the original face-api.js port
    ``face_expression.pt`` as the start for new classes, which measured better there:
    ``docs/classifier.md``, "Fine-tuned default for expression projects"). The served classifier is
    the start when it knows at least one of ``labels`` by name (:func:`facemodels.classifier.canonical_class`:
    an expression project, whose config may add classes such as ``contempt``; the known classes keep
    its head rows), else ``classifier_init`` (only classes it does not know, e.g. awake/sleep).
    Without ``classifier_init`` it is always the served classifier.

    Returns: an absolute path (``classifier_path`` or ``classifier_init_path``).
    """
    init = bundle.get("classifier_init_path")
    if not init:
        return bundle["classifier_path"]
    from facemodels.classifier import canonical_class

    known = {canonical_class(c) for c in bundle.get("classes", [])}
    if any(canonical_class(x) in known for x in labels):
        return bundle["classifier_path"]
    return init


#: Values of a bundle's ``classifier_recipe``: how its project's retrains fine-tune stage 2.
CLASSIFIER_RECIPES = ("new", "known")


def classifier_recipe(bundle: dict, labels) -> str:
    """How a retrain from ``bundle`` fine-tunes stage 2 for a project with ``labels``.

    ``"known"``: the project's classes were known before its first label (an expression project
    served by the shipped expression classifier from day 0): stage 2 is fine-tuned gently, at its
    own crop margin (:func:`facemodels.classifier.stage2_settings`). ``"new"``: classes the
    project brought (awake/sleep, ...): the new-class recipe (:data:`facemodels.classifier.RECIPE`).
    A project's candidate bundles record the choice (``classifier_recipe``), so every later retrain
    of the project keeps it; the shipped default decides it from the labels as
    :func:`classifier_init_path` does (it names a ``classifier_init``); any other bundle without the
    key (a project's version from before the key existed) is ``"new"``, as it was trained.
    """
    mode = bundle.get("classifier_recipe")
    if mode in CLASSIFIER_RECIPES:
        return mode
    if bundle.get("classifier_init_path"):
        return "known" if classifier_init_path(bundle, labels) == bundle["classifier_path"] else "new"
    return "new"


def write_bundle(folder: Path, detector: Path, classifier: Path, classes: list[str], onnx: bool = True,
                 **extra) -> Path:
    """Write a version folder atomically: copy both weight files and ``bundle.json`` into a
    temporary sibling folder, fsync, then rename it to ``folder`` (a crash never leaves a
    half-written version that could be served).

    With ``onnx`` (default), both stages are exported to ONNX in the same folder
    (:func:`facemodels.onnx_runtime.export_version`; about 3 s), or copied from the source folder
    when its ``bundle.json`` records an intact export of the same weights (a candidate being
    registered). An export that fails is logged and left out: the version is then exported when
    first served, or served by torch.

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
        if onnx:
            bundle.update(_onnx_entries(tmp, Path(detector).parent, Path(classifier).parent, bundle,
                                        int(extra.get("imgsz") or 256)))
        (tmp / "bundle.json").write_text(json.dumps(bundle, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "bundle.json"


def _onnx_entries(tmp: Path, det_src: Path, clf_src: Path, bundle: dict, imgsz: int) -> dict:
    """ONNX files of a version being written in ``tmp``: copied from the sources' folder when it
    holds an intact export of the same weights, else exported; ``{}`` (logged) when export fails."""
    from facemodels import onnx_runtime as ox

    try:
        entries = {}
        todo = []
        for key, src in (("detector", det_src), ("classifier", clf_src)):
            old = ox.reusable_onnx(src, key, bundle[f"{key}_sha256"])
            if old is None:
                todo.append(key)
                continue
            shutil.copyfile(old, tmp / f"{key}.onnx")
            entries[f"{key}_onnx"] = f"{key}.onnx"
            entries[f"{key}_onnx_sha256"] = file_sha256(tmp / f"{key}.onnx")
        if todo:
            entries.update(ox.export_version(tmp, imgsz=imgsz, keys=tuple(todo)))
        return entries
    except Exception as e:  # noqa: BLE001 - a failed export must never lose a trained version
        log.warning("ONNX export of the version in %s failed (%s: %s); it will be exported when first "
                    "served or served by torch", tmp, e.__class__.__name__, e)
        for f in ("detector.onnx", "classifier.onnx"):
            (tmp / f).unlink(missing_ok=True)
        return {}


class TwoStageModel:
    """Stage 1 (YOLO face detector) + stage 2 (face-crop classifier) behind one ``detect()``.

    Args:
        path: a bundle JSON (see module docstring).
        device: torch device for the detector ('' = ultralytics' default); a GPU device is served by torch.
        backend: ``"onnx"`` or ``"torch"``; default ``INFERENCE_BACKEND`` (``onnx``). With ``onnx`` the
            bundle's ONNX files are used (exported into the cache first when it has none,
            :func:`facemodels.onnx_runtime.onnx_files`); if that fails, torch serves it and a warning is logged.
    Attributes:
        names: the classifier's class names, index order of ``class_scores``.
        backend: what serves it, ``"onnx"`` or ``"torch"``.
        detector: :class:`facemodels.detector.FaceModel` or :class:`facemodels.onnx_runtime.OnnxDetector`;
        classifier: :class:`facemodels.classifier.FaceClassifier` or :class:`facemodels.onnx_runtime.OnnxClassifier`.
    Raises: FileNotFoundError / ValueError as :func:`read_bundle`; ValueError for an unknown backend.
    """

    def __init__(self, path: str | Path, device: str = "", backend: str | None = None):
        from facemodels import onnx_runtime as ox

        self.path = str(path)
        self.bundle = read_bundle(path)
        want = backend or ox.inference_backend()
        if want not in ox.BACKENDS:
            raise ValueError(f"backend must be one of {ox.BACKENDS}, got {want!r}")
        #: "onnx" (ONNX Runtime on the CPU) or "torch": what serves this version
        self.backend = "torch"
        if want == "onnx" and device not in ("", "cpu"):
            log.info("device %r asked for: %s is served by torch", device, Path(path).name)
        elif want == "onnx":
            try:
                det_onnx, clf_onnx = ox.onnx_files(self.bundle)
                self.detector, self.classifier = ox.OnnxDetector(det_onnx), ox.OnnxClassifier(clf_onnx)
                self.backend = "onnx"
            except Exception as e:  # noqa: BLE001 - any failure: serve with torch, say why
                log.warning("ONNX Runtime cannot serve %s (%s: %s); serving it with torch", path,
                            e.__class__.__name__, e)
        if self.backend == "torch":
            from facemodels.classifier import FaceClassifier
            from facemodels.detector import FaceModel

            self.detector = FaceModel(self.bundle["detector_path"], device)
            self.classifier = FaceClassifier.load(self.bundle["classifier_path"])
        if self.bundle.get("nms_iou") is not None:  # tuned with the detector (docs/detector.md)
            self.detector.nms_iou = float(self.bundle["nms_iou"])
        self.names: list[str] = list(self.classifier.classes)
        #: face confidence (0-1) tuned on the labelled images when this version was trained, or None
        self.face_threshold: float | None = self.bundle.get("face_threshold")
        self._lock = threading.Lock()

    #: :func:`backend.predict.predict_tasks` may pass ``classify_min_conf`` to :meth:`detect`
    classifies_faces = True

    def detect(self, images: list[np.ndarray], conf: float, imgsz: int = 256, batch: int = 16,
               embed: bool = False, classify_min_conf: float | None = None):
        """Faces of each image with the classifier's probabilities.

        The classifier runs once for the faces of all ``images`` (one batched forward pass, not one
        per image).

        Args:
            images: ``(H, W, 3)`` uint8 RGB arrays (EXIF orientation applied).
            conf: minimum face confidence (0-1) of a detection.
            imgsz: detector inference size, pixels.
            embed: also return the detector's image embedding (for diversity sampling).
            classify_min_conf: when set, only faces with a face confidence at or above it, and each
                image's most confident face, are classified; the others keep uniform probabilities.
                Pre-annotations and task scores use no other face
                (:func:`backend.uncertainty.image_uncertainty`), so their result is the same;
                evaluation (mAP over all candidates) leaves it unset.
        Returns: list of :class:`facemodels.detector.ImageDetections`; each detection's ``face_conf`` is
            the detector's confidence, ``class_scores`` the ``(K,)`` softmax probabilities over
            :attr:`names`, ``conf`` = ``face_conf * max(class_scores)``.
        """
        from facemodels.detector import Detection

        dets = self.detector.detect(images, conf=conf, imgsz=imgsz, batch=batch, embed=embed)
        todo = []  # (image detections, all boxes, ok mask)
        items = []  # (image, ok boxes) for the classifier
        for im, d in zip(images, dets):
            if not d.detections:
                continue
            h, w = im.shape[:2]
            boxes = np.array([x.box for x in d.detections], dtype=np.float64)
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
            ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            if classify_min_conf is not None:
                face_conf = np.array([x.conf for x in d.detections])
                wanted = face_conf >= classify_min_conf
                wanted[int(np.argmax(face_conf))] = True
                ok &= wanted
            todo.append((d, boxes, ok))
            if ok.any():
                items.append((im, boxes[ok]))
        if not todo:
            return dets
        with self._lock:
            found = iter(self.classifier.predict_proba_many(items))
        for d, boxes, ok in todo:
            probs = np.full((len(boxes), len(self.names)), 1.0 / max(len(self.names), 1))
            if ok.any():
                probs[ok] = next(found)
            d.detections = [
                Detection(x.box, float(x.conf * p.max()), int(p.argmax()), p.astype(np.float64), float(x.conf))
                for x, p in zip(d.detections, probs)
            ]
        return dets
