"""ONNX export of a model version and its serving with ONNX Runtime on the CPU (issue 12).

Each two-stage version (:mod:`facemodels.two_stage`) gets two ONNX files beside its ``.pt`` files:

* ``detector.onnx``: the YOLO face detector exported by ultralytics' own exporter
  (``YOLO(pt).export(format="onnx", dynamic=True, simplify=False)``: dynamic batch, height and
  width, so rectangular letterboxing works as in the torch path; ``simplify=False`` because
  ``onnxslim`` is not a dependency and ultralytics must never pip-install at run time). One output
  is added to the exported graph: ``embedding`` ``(B, C)``, the spatial mean of the SPPF layer's
  output (layer :data:`facemodels.detector.EMBED_LAYER`), the same image embedding the torch
  path takes with a forward hook.
* ``classifier.onnx``: the face-crop classifier (:class:`facemodels.classifier.FaceClassifier`)
  exported with ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch), outputs
  ``probs`` ``(N, K)`` softmax probabilities and ``features`` ``(N, 256)`` L2-normalised pooled
  features, its TF 'same' paddings merged into its convolutions (:func:`_fold_and_fuse_pads`;
  export format "2", :data:`EXPORT_FORMATS`: a classifier file of an older format is exported
  again on load). Its classes, crop margin and input size are stored in the file's metadata.

Both files carry ``faceloop_source_sha256`` (the SHA-256 of the ``.pt`` they were exported from) in
their metadata, so a stale export is never served. The bundle JSON records them with their own
SHA-256 (``detector_onnx``/``detector_onnx_sha256``, ``classifier_onnx``/``classifier_onnx_sha256``).
A version without them (the shipped default, versions written before this) is exported lazily on
its first load into ``$VAR_DIR/onnx_cache/<sha>/`` (about 3 s; ``scripts/export_onnx.py`` does it
ahead of time).

Serving: :class:`OnnxDetector` and :class:`OnnxClassifier` have the interfaces of
:class:`facemodels.detector.FaceModel` (``detect``, ``names``, ``nms_iou``) and ``FaceClassifier``
(``predict_proba``, ``embed``, ``*_many``, ``classes``) with the same pre- and post-processing:
ultralytics' ``LetterBox`` (rectangular when all images of a batch share one shape, as its
predictor does), ultralytics' ``non_max_suppression`` (class-agnostic, the bundle's ``nms_iou``)
and ``scale_boxes``; the classifier's crops are :func:`facemodels.preprocess.face_batch`.

Settings (environment):

* ``INFERENCE_BACKEND``: ``onnx`` (default) or ``torch``. With ``onnx``, a version whose ONNX
  files cannot be made or loaded is served by torch, with a logged warning.
* ``INFERENCE_THREADS``: ONNX Runtime intra-op threads of a session; default the number of cores
  this process may run on (``os.sched_getaffinity``), so one request uses every core it has and a
  worker pinned to one core (``taskset -c 0``) uses one thread. Parallel pool scoring runs several
  worker processes (``faceloop worker --concurrency N`` or one worker per core, each pinned); set
  ``INFERENCE_THREADS=1`` when N unpinned processes share N cores.
* ``INFERENCE_CLASSIFIER_THREADS``: intra-op threads of the classifier's session; default 1
  (:func:`classifier_threads`: one face is too small a pass to split over threads).
* ``INFERENCE_SPINNING``: ``1`` lets the intra-op threads spin during a run (shorter single
  images, more CPU; :func:`make_session`); default ``0``.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from backend.hashing import file_sha256
from facemodels.files import atomic_write
from facemodels.preprocess import face_batch

log = logging.getLogger("faceloop.onnx")

#: Metadata key holding the SHA-256 of the ``.pt`` an ONNX file was exported from.
SOURCE_KEY = "faceloop_source_sha256"
#: Metadata key holding how the file was exported (:data:`EXPORT_FORMATS`); a file without it is format "1".
FORMAT_KEY = "faceloop_export_format"
#: The export format each ONNX file must have to be served; an older one is exported again
#: (:func:`onnx_files`). Classifier "2": paddings merged into the convolutions (:func:`_fold_and_fuse_pads`).
EXPORT_FORMATS = {"detector": "1", "classifier": "2"}
#: Faces per classifier forward pass on ONNX Runtime. Small: up to 8 faces a pass cost about the
#: same CPU a face as one (0.63-0.66 ms), 16 cost 0.78 and 32-64 cost 1.1 (one thread; the
#: activations of a large batch no longer stay in cache; docs/benchmarks.md, run 10).
INFER_BATCH = 8
#: Opset of the classifier export.
CLASSIFIER_OPSET = 17
BACKENDS = ("onnx", "torch")


def inference_backend() -> str:
    """``INFERENCE_BACKEND`` (``onnx`` or ``torch``; default ``onnx``). ValueError for another value."""
    v = (os.environ.get("INFERENCE_BACKEND") or "onnx").strip().lower()
    if v not in BACKENDS:
        raise ValueError(f"INFERENCE_BACKEND must be one of {BACKENDS}, got {v!r}")
    return v


def _threads_env(name: str) -> int | None:
    """The whole number >= 1 in environment variable ``name``; None when unset or empty.
    ValueError for anything else."""
    v = os.environ.get(name, "").strip()
    if not v:
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
    return n


def intra_op_threads() -> int:
    """ONNX Runtime intra-op threads: ``INFERENCE_THREADS`` if set (> 0), else the cores this
    process may run on (its CPU affinity). ValueError for a bad ``INFERENCE_THREADS``."""
    n = _threads_env("INFERENCE_THREADS")
    if n:
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def classifier_threads() -> int:
    """ONNX Runtime intra-op threads of the face-crop classifier: ``INFERENCE_CLASSIFIER_THREADS``
    if set (> 0), else 1. One face is a 112×112 forward pass of about 0.5 ms, too small to split:
    on the 2 shared cores one thread took 0.56 ms of CPU a face against 0.67 with two, and no
    shorter wall time was seen with two (docs/benchmarks.md, run 10). ValueError for a bad value."""
    return _threads_env("INFERENCE_CLASSIFIER_THREADS") or 1


def inference_spinning() -> bool:
    """``INFERENCE_SPINNING``: true (``1``/``true``/``yes``) lets ONNX Runtime's intra-op threads
    spin between the operators of one run and stops them when the run ends
    (``session.force_spinning_stop``); default false. ValueError for another value."""
    v = (os.environ.get("INFERENCE_SPINNING") or "0").strip().lower()
    if v not in ("0", "1", "false", "true", "no", "yes"):
        raise ValueError(f"INFERENCE_SPINNING must be 0/1 (or true/false), got {v!r}")
    return v in ("1", "true", "yes")


def make_session(path: str | Path, threads: int | None = None, spinning: bool | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU with ``threads`` intra-op threads (default
    :func:`intra_op_threads`), one inter-op thread, sequential execution, all graph optimisations.

    Spinning (``spinning``, default :func:`inference_spinning`) is off by default, so that a
    request does not hold a core busy waiting between operators (the backend decodes the next
    image on the same cores). On: the pool threads spin during a run, which shortens one image's
    run (on 2 free cores the detector's 256×192 forward pass went from about 4.9 to 3.4 ms at
    best) for about 3 ms more CPU an image, and ``session.force_spinning_stop`` ends the spinning
    when the run returns (docs/benchmarks.md, run 7).
    """
    import onnxruntime as ort

    spin = inference_spinning() if spinning is None else spinning
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or intra_op_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _metadata(path: str | Path) -> dict[str, str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def _set_metadata(model, values: dict[str, str]) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props.update(values)
    del model.metadata_props[:]
    for k, v in props.items():
        e = model.metadata_props.add()
        e.key, e.value = k, str(v)


def _atomic_save(model, out: Path) -> None:
    """Write an ONNX ``ModelProto`` atomically (one serialised protobuf; models here are < 2 GB)."""
    with atomic_write(out) as f:
        f.write(model.SerializeToString())


# ---------------------------------------------------------------------------- export

def export_detector(pt: str | Path, out: str | Path, imgsz: int = 256) -> Path:
    """Export YOLO weights ``pt`` to ``out`` with ultralytics' exporter, plus the ``embedding`` output.

    ``imgsz`` (pixels) is only the tracing size: height, width and batch are dynamic. ultralytics
    runs offline (:func:`backend.config.configure_ultralytics`: no download, no pip install).
    Raises FileNotFoundError for missing weights; ultralytics/onnx errors pass through.
    """
    import onnx
    from onnx import helper

    from facemodels.detector import EMBED_LAYER, YOLO  # configures ultralytics offline first

    pt, out = Path(pt), Path(out)
    if not pt.is_file():
        raise FileNotFoundError(f"detector weights not found: {pt}")
    src_sha = file_sha256(pt)
    with tempfile.TemporaryDirectory(prefix="faceloop-onnx-") as tmp:
        local = Path(tmp) / "detector.pt"  # the exporter writes beside its input
        shutil.copyfile(pt, local)
        f = YOLO(str(local), task="detect").export(format="onnx", imgsz=imgsz, dynamic=True, simplify=False,
                                                    half=False, device="cpu", verbose=False)
        model = onnx.load(str(f))
    # the SPPF output (end of the backbone): ``/model.<EMBED_LAYER>/...`` nodes, the last one's output
    prefix = f"/model.{EMBED_LAYER}/"
    last = [n for n in model.graph.node if n.name.startswith(prefix)]
    if not last:
        raise ValueError(f"no layer {EMBED_LAYER} (SPPF) in the exported graph of {pt}")
    feat = last[-1].output[0]
    axes = helper.make_tensor("faceloop_embed_axes", onnx.TensorProto.INT64, [2], [2, 3])
    model.graph.initializer.append(axes)
    model.graph.node.append(helper.make_node("ReduceMean", [feat, "faceloop_embed_axes"], ["embedding"],
                                             name="faceloop_embedding", keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", None]))
    _set_metadata(model, {SOURCE_KEY: src_sha, "description": "faceloop face detector (ultralytics YOLO export)"})
    onnx.checker.check_model(model)
    _atomic_save(model, out)
    return out


def _fold_and_fuse_pads(model):
    """The classifier's exported graph with its shape arithmetic folded and each TF 'same' ``Pad``
    merged into the ``Conv`` it feeds (ONNX ``Conv`` takes asymmetric ``pads``).

    The TorchScript export writes each of the 16 paddings as a ``Pad`` fed by a chain of small
    nodes (``ConstantOfShape``, ``Concat``, ``Reshape``, ``Slice``, ``Transpose``, ``Cast``);
    ONNX Runtime's basic level (constant folding only; no layout or hardware-specific rewrite) folds
    them into constants, then a ``Pad`` in ``constant`` mode with value 0 that pads only the spatial
    axes and feeds one ``Conv`` (``auto_pad`` ``NOTSET``) is removed and its amounts added to the
    ``Conv``'s ``pads`` (``[top, left, bottom, right]``; ONNX ``Pad`` gives
    ``[n0, c0, top, left, n1, c1, bottom, right]``). The same function (zero padding then
    convolution); ONNX Runtime then runs the convolutions in its blocked layout without a
    reorder around each ``Pad``: one face 0.56 ms of CPU instead of 1.14 (one thread, loaded
    machine; docs/benchmarks.md, run 10), outputs within 4e-7 of the unfused export.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    with tempfile.TemporaryDirectory(prefix="faceloop-onnx-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "basic.onnx"
        src.write_bytes(model.SerializeToString())
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
        model = onnx.load(str(dst))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in g.output}

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def attr(node, name, default):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    fused = []
    for n in g.node:
        if n.op_type != "Pad" or attr(n, "mode", b"constant") not in (b"constant", "constant"):
            continue
        pads = const(n.input[1]) if len(n.input) > 1 else None
        value = const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(1)
        users = consumers.get(n.output[0], [])
        if (pads is None or value is None or np.any(value != 0) or len(n.input) > 3 and n.input[3]
                or len(users) != 1 or users[0].op_type != "Conv" or n.output[0] in outputs):
            continue
        pads, conv = [int(v) for v in pads], users[0]
        if (len(pads) != 8 or any(pads[k] for k in (0, 1, 4, 5)) or min(pads) < 0
                or attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or conv.input[0] != n.output[0]):
            continue
        old = list(attr(conv, "pads", [0, 0, 0, 0]))
        for a in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", [old[0] + pads[2], old[1] + pads[3],
                                                             old[2] + pads[6], old[3] + pads[7]]))
        conv.input[0] = n.input[0]
        fused.append(n)
    for n in fused:
        g.node.remove(n)
    return model


def export_classifier(pt: str | Path, out: str | Path) -> Path:
    """Export a face classifier ``.pt`` (:meth:`FaceClassifier.load`) to ``out`` with ``torch.onnx``,
    its paddings folded into the convolutions (:func:`_fold_and_fuse_pads`).

    Input ``input`` ``(N, 3, S, S)`` (S = the model's input size, 112), outputs ``probs`` ``(N, K)``
    and ``features`` ``(N, 256)``; dynamic N. Classes, crop margin, input size and the export format
    (:data:`EXPORT_FORMATS`) go to the metadata.
    Raises FileNotFoundError / ValueError as :meth:`FaceClassifier.load`.
    """
    import onnx
    import torch
    import torch.nn.functional as F

    from facemodels.classifier import FaceClassifier

    pt, out = Path(pt), Path(out)
    clf = FaceClassifier.load(pt)

    class _Head(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            f = self.net.features(x)
            return torch.softmax(self.net.fc(f), dim=1), F.normalize(f, dim=1)

    s = clf.input_size
    with tempfile.TemporaryDirectory(prefix="faceloop-onnx-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning: the TF 'same' padding is constant at a fixed input size
        f = Path(tmp) / "classifier.onnx"
        torch.onnx.export(_Head(clf.net.cpu()).eval(), (torch.zeros(2, 3, s, s),), str(f), input_names=["input"],
                          output_names=["probs", "features"], opset_version=CLASSIFIER_OPSET, dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}, "features": {0: "batch"}})
        model = _fold_and_fuse_pads(onnx.load(str(f)))
    _set_metadata(model, {SOURCE_KEY: file_sha256(pt), FORMAT_KEY: EXPORT_FORMATS["classifier"],
                          "faceloop_classes": json.dumps(clf.classes),
                          "faceloop_crop_margin": repr(clf.crop_margin), "faceloop_input_size": str(s),
                          "description": "faceloop face-crop classifier (face-api.js expression net, fine-tuned)"})
    onnx.checker.check_model(model)
    _atomic_save(model, out)
    return out


def export_version(folder: str | Path, detector: str = "detector.pt", classifier: str = "classifier.pt",
                   imgsz: int = 256, keys: tuple[str, ...] = ("detector", "classifier")) -> dict:
    """Export the ``.pt`` files of a version folder (both, or those named in ``keys``) to ``.onnx`` beside them.

    Returns the bundle entries: ``{"detector_onnx": "detector.onnx", "detector_onnx_sha256": ...,
    "classifier_onnx": "classifier.onnx", "classifier_onnx_sha256": ...}`` (names relative to ``folder``).
    """
    folder = Path(folder)
    entries = {}
    for key, name, fn in (("detector", detector, lambda p, o: export_detector(p, o, imgsz)),
                          ("classifier", classifier, export_classifier)):
        if key not in keys:
            continue
        out = folder / (Path(name).stem + ".onnx")
        fn(folder / name, out)
        entries[f"{key}_onnx"] = out.name
        entries[f"{key}_onnx_sha256"] = file_sha256(out)
    return entries


def reusable_onnx(src_folder: Path, key: str, source_sha: str) -> Path | None:
    """The ``.onnx`` of ``key`` (detector/classifier) recorded in ``src_folder/bundle.json`` when it
    was exported from weights with SHA-256 ``source_sha`` and is intact; else None (used by
    :func:`facemodels.two_stage.write_bundle` to copy a candidate's export instead of exporting again)."""
    try:
        b = json.loads((src_folder / "bundle.json").read_text())
        if b.get(f"{key}_sha256") != source_sha or not b.get(f"{key}_onnx"):
            return None
        p = src_folder / b[f"{key}_onnx"]
        if p.is_file() and file_sha256(p) == b.get(f"{key}_onnx_sha256") and _current(_metadata(p), key):
            return p
    except Exception:  # noqa: BLE001 - unreadable bundle or ONNX file: export again
        pass
    return None


def _current(meta: dict[str, str], key: str) -> bool:
    """Whether ONNX metadata ``meta`` of a ``key`` (detector/classifier) file is of the export
    format served now (:data:`EXPORT_FORMATS`)."""
    return meta.get(FORMAT_KEY, "1") == EXPORT_FORMATS[key]


def cache_dir() -> Path:
    """Where lazily exported ONNX files live: ``$VAR_DIR/onnx_cache`` (default ``<repo>/var``)."""
    from backend.config import REPO_ROOT

    return Path(os.environ.get("VAR_DIR") or REPO_ROOT / "var").resolve() / "onnx_cache"


_export_lock = threading.Lock()


def onnx_files(bundle: dict) -> tuple[Path, Path]:
    """The detector and classifier ONNX files of a bundle read by :func:`facemodels.two_stage.read_bundle`.

    The files the bundle records are used when their SHA-256 matches the bundle, their
    ``faceloop_source_sha256`` matches the ``.pt`` files and their export format is the current
    one (:data:`EXPORT_FORMATS`); otherwise the ``.pt`` files are exported into :func:`cache_dir`
    (``<cache>/<pt sha256>/{detector,classifier}.onnx``), once.
    """
    out = []
    for key, fn in (("detector", export_detector), ("classifier", export_classifier)):
        pt = Path(bundle[f"{key}_path"])
        src_sha = bundle.get(f"{key}_sha256") or file_sha256(pt)
        rec = bundle.get(f"{key}_onnx")
        if rec:
            p = (pt.parent / rec).resolve()
            meta = _metadata(p) if p.is_file() and file_sha256(p) == bundle.get(f"{key}_onnx_sha256") else {}
            if meta.get(SOURCE_KEY) == src_sha and _current(meta, key):
                out.append(p)
                continue
            if meta.get(SOURCE_KEY) == src_sha:
                log.info("%s ONNX file %s is of an older export format; exporting again", key, p)
            else:
                log.warning("%s ONNX file %s is missing or does not match its bundle; exporting again", key, p)
        cached = cache_dir() / src_sha / f"{key}.onnx"
        with _export_lock:
            meta = _metadata(cached) if cached.is_file() else {}
            if not (meta.get(SOURCE_KEY) == src_sha and _current(meta, key)):
                log.info("exporting %s %s to ONNX (%s)", key, pt.name, cached)
                fn(pt, cached)
        out.append(cached)
    return out[0], out[1]


# ---------------------------------------------------------------------------- serving

#: ultralytics' ``non_max_suppression`` defaults that :func:`nms_numpy` follows.
MAX_NMS = 30000


def nms_numpy(raw: np.ndarray, conf: float, iou: float, max_det: int = 300) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class-agnostic NMS of YOLO outputs, in NumPy: the steps of ultralytics'
    ``non_max_suppression(raw, conf, iou, agnostic=True, multi_label=False, return_idxs=True)``
    (``ultralytics/utils/nms.py``) with ``torchvision.ops.nms``'s greedy suppression
    (boxes by descending score, stable order for ties; a box is dropped when its IoU with a kept
    one is above ``iou``), computed in float32 as they are.

    About 0.1 ms for one image instead of about 0.8 ms of CPU through torch's per-operation
    overhead on a few candidates (issue 12, single-task ``/predict``).

    Args:
        raw: ``(B, 4 + nc, A)`` float32: per anchor ``(cx, cy, w, h)`` in pixels of the network
            input, then ``nc`` class scores 0-1.
        conf: a box is a candidate when its best class score is above it (0-1).
        iou: IoU threshold (0-1).
        max_det: most boxes kept per image.
    Returns: per image ``(dets, idx)``: ``dets`` ``(n, 6)`` float32 rows ``x1, y1, x2, y2, score,
        class`` by descending score, ``idx`` ``(n,)`` int64 anchor index of each row.
    """
    out = []
    nc = raw.shape[1] - 4
    for pred in raw:
        cls = pred[4 : 4 + nc]
        best = cls.max(0)
        cand = np.flatnonzero(best > conf)
        if len(cand) > MAX_NMS:
            cand = cand[np.argsort(-best[cand], kind="stable")[:MAX_NMS]]
        if not len(cand):
            out.append((np.zeros((0, 6), np.float32), np.zeros(0, np.int64)))
            continue
        xywh = pred[:4, cand].T
        half = xywh[:, 2:] / np.float32(2)
        boxes = np.empty_like(xywh)
        boxes[:, :2] = xywh[:, :2] - half
        boxes[:, 2:] = xywh[:, :2] + half
        scores = best[cand]
        x1, y1, x2, y2 = boxes.T
        areas = (x2 - x1) * (y2 - y1)
        order = np.argsort(-scores, kind="stable")
        keep = []
        while len(order) and len(keep) < max_det:
            i, rest = order[0], order[1:]
            keep.append(i)
            w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
            h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
            inter = w * h
            order = rest[~(inter / (areas[i] + areas[rest] - inter) > iou)]
        keep = np.asarray(keep, dtype=np.int64)
        dets = np.concatenate([boxes[keep], scores[keep, None], cls[:, cand[keep]].argmax(0)[:, None].astype(np.float32)],
                              axis=1)
        out.append((dets, cand[keep].astype(np.int64)))
    return out



class OnnxDetector:
    """The YOLO face detector on ONNX Runtime; same ``detect()`` as :class:`facemodels.detector.FaceModel`.

    Args:
        path: an ONNX file written by :func:`export_detector`.
        threads: intra-op threads (default :func:`intra_op_threads`).
    Attributes: ``names`` (class names in index order, from ultralytics' metadata), ``nms_iou``
        (0-1, default ultralytics' 0.7), ``stride`` (pixels), ``threads``.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = str(path)
        meta = _metadata(path)
        names = ast.literal_eval(meta.get("names", "{0: 'face'}"))
        self.names: list[str] = [names[i] for i in sorted(names)]
        self.stride = int(meta.get("stride", 32))
        self.threads = int(threads or intra_op_threads())
        self.session = make_session(path, self.threads)
        outs = [o.name for o in self.session.get_outputs()]
        self._outputs = ["output0"] + (["embedding"] if "embedding" in outs else [])
        self.nms_iou = 0.7
        self.max_det = 300  # ultralytics' predictor default

    def _letterbox(self, images: list[np.ndarray], imgsz: int) -> np.ndarray:
        """``(B, 3, h, w)`` float32 0-1 network input of RGB ``images``: ultralytics' ``LetterBox``
        (padding 114, rectangular ``auto`` when all images of the batch share one shape, as its
        predictor does with ``rect=True``), then ``/ 255``."""
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils.checks import check_imgsz

        size = check_imgsz(imgsz, stride=self.stride, min_dim=2)
        same = len({im.shape for im in images}) == 1
        lb = LetterBox(size, auto=same, stride=self.stride)
        x = np.stack([lb(image=im) for im in images])  # (B, h, w, 3) RGB uint8; pad 114 on every channel
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)

    def detect(self, images: list[np.ndarray], conf: float, imgsz: int = 320, batch: int = 16, embed: bool = False,
               iou: float | None = None):
        """Detect faces in RGB images; arguments and result as :meth:`facemodels.detector.FaceModel.detect`."""
        from ultralytics.utils import ops

        from facemodels.detector import Detection, ImageDetections

        out = []
        iou = self.nms_iou if iou is None else iou
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            x = self._letterbox(chunk, imgsz)
            res = self.session.run(self._outputs if embed else ["output0"], {"images": x})
            raw = res[0]
            for i, (im, (d, idx)) in enumerate(zip(chunk, nms_numpy(raw, conf, iou, self.max_det))):
                h, w = im.shape[:2]
                boxes = ops.scale_boxes(x.shape[2:], d[:, :4].copy(), im.shape) if len(d) else np.zeros((0, 4))
                confs, clss = d[:, 4], d[:, 5].astype(int)
                scores = raw[i][4:, idx].T if len(idx) else np.zeros((0, raw.shape[1] - 4))  # (n, nc)
                found = [Detection(tuple(float(v) for v in boxes[j]), float(confs[j]), int(clss[j]),
                                   scores[j].astype(np.float64)) for j in np.argsort(-confs, kind="stable")]
                emb = None
                if embed and len(res) > 1:
                    v = res[1][i].astype(np.float32)
                    emb = v / (np.linalg.norm(v) + 1e-12)
                out.append(ImageDetections(w, h, found, emb))
        return out


class OnnxClassifier:
    """The face-crop classifier on ONNX Runtime; the inference interface of
    :class:`facemodels.classifier.FaceClassifier` (``predict_proba``, ``embed``,
    ``predict_proba_many``, ``embed_many``; same crops, :func:`facemodels.preprocess.face_batch`).

    Args: ``path`` (written by :func:`export_classifier`), ``threads`` (intra-op threads; default
        :func:`classifier_threads`, 1).
    Attributes: ``classes``, ``crop_margin``, ``input_size`` (from the file's metadata).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = str(path)
        meta = _metadata(path)
        try:
            self.classes: list[str] = list(json.loads(meta["faceloop_classes"]))
            self.crop_margin = float(meta["faceloop_crop_margin"])
            self.input_size = int(meta["faceloop_input_size"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a faceloop classifier export (metadata {e})") from None
        self.session = make_session(path, threads or classifier_threads())

    def inputs(self, image: np.ndarray, boxes) -> np.ndarray:
        """(n, 3, S, S) float32 input of the boxes of one image (ValueError for bad boxes)."""
        return face_batch(image, boxes, self.crop_margin, self.input_size)

    def _run(self, x: np.ndarray, what: str) -> np.ndarray:
        k = len(self.classes) if what == "proba" else 256
        if len(x) == 0:
            return np.zeros((0, k), dtype=np.float32)
        name = "probs" if what == "proba" else "features"
        return np.concatenate([self.session.run([name], {"input": x[i : i + INFER_BATCH]})[0]
                               for i in range(0, len(x), INFER_BATCH)]).astype(np.float32)

    def predict_proba(self, image: np.ndarray, boxes) -> np.ndarray:
        """(n, K) softmax probabilities of the faces ``boxes`` (x1, y1, x2, y2 pixels) of one RGB image."""
        return self._run(self.inputs(image, boxes), "proba")

    def embed(self, image: np.ndarray, boxes) -> np.ndarray:
        """(n, 256) L2-normalised pooled features of each face."""
        return self._run(self.inputs(image, boxes), "embed")

    def predict_proba_many(self, items) -> list[np.ndarray]:
        """``[(image, boxes), ...]`` -> ``[(n_i, K) probabilities, ...]``, in one batched run."""
        return self._many(items, "proba")

    def embed_many(self, items) -> list[np.ndarray]:
        """``[(image, boxes), ...]`` -> ``[(n_i, 256) features, ...]``, in one batched run."""
        return self._many(items, "embed")

    def _many(self, items, what):
        xs = [self.inputs(im, bx) for im, bx in items]
        if not xs:
            return []
        out = self._run(np.concatenate(xs), what)
        return list(np.split(out, np.cumsum([len(x) for x in xs])[:-1]))
