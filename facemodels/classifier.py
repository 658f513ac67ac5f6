"""Stage 2 of the pre-labels: a face-crop classifier on the detector's boxes.

Initialised from the face-api.js expression net (``@vladmandic/face-api`` 1.7.15, MIT) ported to
PyTorch (:mod:`facemodels.faceapi_net`, converted by ``scripts/convert_faceapi.py``; provenance in
``models/MODEL_CARD.md``). Crops follow face-api's preprocessing exactly
(:mod:`facemodels.preprocess`), with an optional margin around the box.

Bad boxes: a box that is not finite, has zero or negative width/height (x2 <= x1 or y2 <= y1),
or lies entirely outside the image raises ``ValueError``; a box partly outside the image is
clipped at the image borders.

Threads: nothing here calls ``torch.set_num_threads``; the caller decides.

The fine-tuning recipe (``fine_tune``'s defaults) and its measurements: ``docs/classifier.md``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from facemodels.files import atomic_write
from facemodels.faceapi_net import FEATURE_DIM, POOLS, FaceExpressionNet, make_pool
from facemodels.preprocess import (INPUT_SIZE, MEAN_RGB, check_boxes, check_image, crop_region, face_batch,
                                   resize_bilinear_tf_legacy, square_padding)

#: File format tag of our ``.pt`` files.
FORMAT = "faceloop-face-classifier"
FORMAT_VERSION = 1
#: Class names of face-api.js's expression net, in its output order (``FaceExpressions.ts``).
FACEAPI_CLASSES = ["neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised"]
#: face-api's expression names -> the names used by faceloop's label configs / datasets.
FACEAPI_TO_DATASET = {"neutral": "neutral", "happy": "happy", "sad": "sad", "angry": "angry",
                      "fearful": "fear", "disgusted": "disgust", "surprised": "surprise"}
#: Synonyms matched when classes are mapped by name (lower-case; value = canonical name).
CLASS_ALIASES = {"fearful": "fear", "scared": "fear", "disgusted": "disgust", "surprised": "surprise",
                 "anger": "angry", "happiness": "happy", "sadness": "sad"}
#: Crop margin (fraction of the box side added on each side) used by a freshly converted model.
DEFAULT_MARGIN = 0.0
#: Boxes per forward pass in inference.
INFER_BATCH = 64


def canonical_class(name: str) -> str:
    """Name used to match classes between models and label configs: lower-case, synonyms folded
    (``CLASS_ALIASES``: e.g. face-api's ``fearful`` matches a project's ``Fear``)."""
    n = str(name).strip().lower()
    return CLASS_ALIASES.get(n, n)


def default_classifier_path() -> Path:
    """``models/face_expression.pt`` in the repository (the converted face-api.js expression net)."""
    return Path(__file__).resolve().parent.parent / "models" / "face_expression.pt"


class FaceClassifier:
    """Face-crop classifier: (image, boxes) -> class probabilities / embeddings.

    Attributes: ``classes`` (class names, index order of the probabilities), ``crop_margin``
    (fraction of the box's width/height added on each side before cropping), ``meta`` (provenance
    and training information, JSON-serialisable), ``net`` (:class:`FaceExpressionNet`).
    """

    def __init__(self, net: FaceExpressionNet, classes: Sequence[str], *, crop_margin: float = DEFAULT_MARGIN,
                 input_size: int = INPUT_SIZE, meta: dict | None = None, device: str | torch.device = "cpu"):
        classes = [str(c) for c in classes]
        if len(classes) != net.fc.out_features:
            raise ValueError(f"{len(classes)} class names for a head with {net.fc.out_features} outputs")
        if len(set(classes)) != len(classes) or not classes:
            raise ValueError(f"class names must be non-empty and unique: {classes}")
        if not (-0.4 <= crop_margin <= 1.0):
            raise ValueError(f"crop_margin must be in [-0.4, 1], got {crop_margin}")
        if not (32 <= int(input_size) <= 512) or int(input_size) % 16:
            raise ValueError(f"input_size must be a multiple of 16 in 32..512 pixels, got {input_size}")
        self.input_size = int(input_size)
        self.classes = classes
        self.crop_margin = float(crop_margin)
        self.meta = dict(meta or {})
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    def class_columns(self, names: Sequence[str]) -> list[int | None]:
        """For each name (e.g. a project's labels), the column of ``predict_proba`` with the same
        class (matched by :func:`canonical_class`), or None when this model does not know it."""
        cols = {canonical_class(c): i for i, c in enumerate(self.classes)}
        return [cols.get(canonical_class(n)) for n in names]

    # ---------------------------------------------------------------- files
    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "FaceClassifier":
        """Load our ``.pt`` format (written by :meth:`save` or ``scripts/convert_faceapi.py``).

        Raises FileNotFoundError for a missing file and ValueError for a file of another format.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no face classifier at {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling error means "not our file"
            raise ValueError(f"{path} is not a readable face classifier file: {e}") from e
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file (format={ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt)})")
        if ckpt.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {ckpt['format_version']}; this code reads <= {FORMAT_VERSION}")
        pool = ckpt.get("pool", "mean")
        if pool not in POOLS:
            raise ValueError(f"{path}: unknown pooling {pool!r} (this code knows {POOLS})")
        net = FaceExpressionNet(len(ckpt["classes"]), pool=pool)
        net.load_state_dict(ckpt["state_dict"])
        return cls(net, ckpt["classes"], crop_margin=ckpt.get("crop_margin", DEFAULT_MARGIN),
                   input_size=ckpt.get("input_size", INPUT_SIZE), meta=json.loads(ckpt.get("meta_json", "{}")), device=device)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model atomically (temporary file in the same folder, then ``os.replace``)."""
        ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": "faceapi_expression_net",
                "pool": getattr(self.net.features, "pool_name", "mean"), "input_size": self.input_size, "classes": list(self.classes), "crop_margin": self.crop_margin,
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
                "meta_json": json.dumps(self.meta, sort_keys=True)}
        with atomic_write(path) as f:
            torch.save(ckpt, f)

    # ---------------------------------------------------------------- inference
    def inputs(self, image: np.ndarray, boxes) -> np.ndarray:
        """(n, 3, S, S) float32 network input (S = ``input_size``, 112 for face-api) for the boxes of one image."""
        return face_batch(image, boxes, self.crop_margin, self.input_size)

    @torch.no_grad()
    def _run(self, x: np.ndarray, what: str) -> np.ndarray:
        k = len(self.classes) if what == "proba" else FEATURE_DIM
        if len(x) == 0:
            return np.zeros((0, k), dtype=np.float32)
        self.net.eval()
        outs = []
        for i in range(0, len(x), INFER_BATCH):
            xb = torch.from_numpy(x[i:i + INFER_BATCH]).to(self.device)
            f = self.net.features(xb)
            if what == "proba":
                outs.append(torch.softmax(self.net.fc(f), dim=1))
            else:
                outs.append(F.normalize(f, dim=1))
        return torch.cat(outs).cpu().numpy().astype(np.float32)

    def predict_proba(self, image: np.ndarray, boxes) -> np.ndarray:
        """Class probabilities of each face.

        ``image``: (H, W, 3) uint8 RGB; ``boxes``: (n, 4) x1, y1, x2, y2 in pixels.
        Returns (n, K) float32 softmax probabilities (0-1, rows sum to 1), columns in ``classes``
        order. Raises ValueError for a bad image or box (see the module docstring).
        """
        return self._run(self.inputs(image, boxes), "proba")

    def embed(self, image: np.ndarray, boxes) -> np.ndarray:
        """(n, 256) float32 L2-normalised pooled features of each face (for diversity sampling)."""
        return self._run(self.inputs(image, boxes), "embed")

    def predict_proba_many(self, items: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Batched over many images: ``[(image, boxes), ...]`` -> ``[(n_i, K) probabilities, ...]``."""
        return self._many(items, "proba")

    def embed_many(self, items: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Batched over many images: ``[(image, boxes), ...]`` -> ``[(n_i, 256) embeddings, ...]``."""
        return self._many(items, "embed")

    def _many(self, items, what):
        xs = [self.inputs(im, bx) for im, bx in items]
        sizes = [len(x) for x in xs]
        allx = np.concatenate(xs) if xs else np.zeros((0, 3, self.input_size, self.input_size), np.float32)
        out = self._run(allx, what)
        return list(np.split(out, np.cumsum(sizes)[:-1])) if xs else []


# ---------------------------------------------------------------------------- fine-tuning

#: The recipe: ``fine_tune``'s defaults (measured in docs/classifier.md, benchmarks/classifier_awake_sleep.py).
RECIPE = dict(epochs=40, lr=1e-3, backbone_lr_scale=1.0, train_blocks=4, weight_decay=1e-4, batch_size=16,
              crop_margin=-0.1, head_init="mean", flip=True, scale_jitter=0.15, shift_jitter=0.08,
              brightness=0.3, contrast=0.3, label_smoothing=0.1, input_size=112, mixup=0.0,
              balanced=False, grayscale=0.0, rotate=0.0, swa_epochs=0, head_epochs=0, l2sp=0.0, bss=0.0, bss_k=1,
              pool="mean", gem_p=3.0)


#: ``fine_tune`` settings, on top of :data:`RECIPE`, for a classifier that already knows the
#: project's classes (an expression project continuing from the shipped expression classifier,
#: ``facemodels.two_stage.classifier_recipe`` "known"). The recipe above is for new classes (its
#: crop margin -0.1 and lr 1e-3 were measured on awake/sleep from the port); run on the expression
#: classifier it re-learns the crop and forgets: accepted as is 0.653 at day 0, 0.41-0.48 after
#: 10-40 labels (``faceloop bench-accept --data ../shared/data/expressions``). Measured:
#: docs/classifier.md, "Retraining a classifier that already knows the classes"
#: (``benchmarks/stage2_known_classes.py``).
KNOWN_CLASSES_RECIPE = dict(lr=1e-4)


def stage2_settings(recipe: str, init: "FaceClassifier") -> dict:
    """``fine_tune`` overrides for a retrain's stage 2 (``recipe``: a bundle's ``classifier_recipe``,
    ``facemodels.two_stage.classifier_recipe``). ``"known"``, fine-tuning ``init`` on classes it
    already knows: its own crop margin (the crops its features were trained on; fraction of the box
    side, each side) and :data:`KNOWN_CLASSES_RECIPE`; ``"new"``: none (:data:`RECIPE` as it is)."""
    return {**KNOWN_CLASSES_RECIPE, "crop_margin": float(init.crop_margin)} if recipe == "known" else {}


class _Patch:
    """A training face: a sub-image around the box (enough context for jitter) and the box in it."""

    __slots__ = ("img", "box", "label")

    def __init__(self, image: np.ndarray, box: np.ndarray, label: int, context: float, size: int):
        H, W = image.shape[:2]
        x1, y1, x2, y2 = crop_region(box, (H, W), context)
        img = image[y1:y2, x1:x2]
        b = np.array(box, dtype=np.float64) - [x1, y1, x1, y1]
        # keep at most ~3x the net input on the long side: enough for the 112 px resize
        side = max(img.shape[:2])
        limit = 3 * size * (1 + 2 * context)
        if side > limit:
            s = limit / side
            h, w = max(1, round(img.shape[0] * s)), max(1, round(img.shape[1] * s))
            img = resize_bilinear_tf_legacy(img, (h, w)).round().clip(0, 255).astype(np.uint8)
            b = b * [w / (x2 - x1), h / (y2 - y1), w / (x2 - x1), h / (y2 - y1)]
        self.img, self.box, self.label = np.ascontiguousarray(img), b, int(label)


def _pixels(img: np.ndarray, box, margin: float, size: int) -> np.ndarray:
    """(size, size, 3) float32 pixels 0-255 of one crop, before normalisation."""
    x1, y1, x2, y2 = crop_region(box, img.shape[:2], margin)
    crop = img[y1:y2, x1:x2]
    t, b, l, r = square_padding(*crop.shape[:2])
    crop = np.pad(crop.astype(np.float32), ((t, b), (l, r), (0, 0)))
    if crop.shape[0] != size:
        crop = resize_bilinear_tf_legacy(crop, size)
    return crop


def _augmented_batch(patches: list[_Patch], rng: np.random.Generator, margin: float, cfg: dict) -> np.ndarray:
    size = int(cfg["input_size"])
    out = np.empty((len(patches), 3, size, size), dtype=np.float32)
    for i, p in enumerate(patches):
        x1, y1, x2, y2 = p.box
        w, h = x2 - x1, y2 - y1
        s = 1.0 + rng.uniform(-cfg["scale_jitter"], cfg["scale_jitter"])
        cx = (x1 + x2) / 2 + rng.uniform(-cfg["shift_jitter"], cfg["shift_jitter"]) * w
        cy = (y1 + y2) / 2 + rng.uniform(-cfg["shift_jitter"], cfg["shift_jitter"]) * h
        box = [cx - s * w / 2, cy - s * h / 2, cx + s * w / 2, cy + s * h / 2]
        try:
            px = _pixels(p.img, box, margin, size)
        except ValueError:  # jitter pushed the box out of the patch: use the plain box
            px = _pixels(p.img, p.box, margin, size)
        if cfg["flip"] and rng.random() < 0.5:
            px = px[:, ::-1]
        if cfg["rotate"]:  # in-plane rotation about the crop centre, degrees uniform in ±rotate
            import cv2

            a = rng.uniform(-cfg["rotate"], cfg["rotate"])
            m = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), a, 1.0)
            px = cv2.warpAffine(np.ascontiguousarray(px), m, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT_101)
        if cfg["grayscale"] and rng.random() < cfg["grayscale"]:  # ITU-R BT.601 luma, as in IR/night cameras
            px = np.repeat((px @ np.float32([0.299, 0.587, 0.114]))[..., None], 3, axis=2)
        if cfg["brightness"] or cfg["contrast"]:
            b = 1.0 + rng.uniform(-cfg["brightness"], cfg["brightness"])
            c = 1.0 + rng.uniform(-cfg["contrast"], cfg["contrast"])
            m = px.mean()
            px = np.clip((px - m) * c + m * b, 0, 255)
        out[i] = ((px - MEAN_RGB) / np.float32(255.0)).transpose(2, 0, 1)
    return out


def _plain_batch(patches: list[_Patch], margin: float, size: int) -> np.ndarray:
    return np.stack([((_pixels(p.img, p.box, margin, size) - MEAN_RGB) / np.float32(255.0)).transpose(2, 0, 1)
                     for p in patches]).astype(np.float32)


def _check_samples(samples, classes, what):
    if not isinstance(samples, (list, tuple)):
        raise ValueError(f"{what} must be a list of (image, box, class index) tuples")
    for i, s in enumerate(samples):
        if len(s) != 3:
            raise ValueError(f"{what}[{i}] must be (image, box, class index), got {len(s)} items")
        check_image(s[0])
        check_boxes(s[1])
        if not (0 <= int(s[2]) < len(classes)):
            raise ValueError(f"{what}[{i}]: class index {s[2]} is not in 0..{len(classes) - 1} ({classes})")


def evaluate(model: FaceClassifier, samples: list[tuple[np.ndarray, np.ndarray, int]]) -> dict:
    """Accuracy of ``model`` on ``(image, box, class index)`` samples: ``{"accuracy", "n", "per_class"}``."""
    if not samples:
        return {"accuracy": float("nan"), "n": 0, "per_class": {}}
    probs = np.concatenate([model.predict_proba(im, np.asarray(b, dtype=np.float64).reshape(1, 4)) for im, b, _ in samples])
    y = np.array([int(s[2]) for s in samples])
    pred = probs.argmax(1)
    per = {model.classes[c]: float((pred[y == c] == c).mean()) for c in np.unique(y)}
    return {"accuracy": float((pred == y).mean()), "n": int(len(y)), "per_class": per}


def fine_tune(init: FaceClassifier, samples: list[tuple[np.ndarray, np.ndarray, int]], classes: list[str], *,
              epochs: int = RECIPE["epochs"], seed: int = 0, val: list | None = None,
              on_epoch: Callable[[int, int, float], None] | None = None, anchor: FaceClassifier | None = None,
              **overrides) -> tuple[FaceClassifier, dict]:
    """Fine-tune a copy of ``init`` on face crops for ``classes``.

    ``samples``: ``[(image (H,W,3) uint8 RGB, box (4,) x1,y1,x2,y2 pixels, class index into classes), ...]``.
    The head is rebuilt for ``classes``: a class that ``init`` already has (same name) keeps its
    row of the fully connected layer; a new class's row is initialised from the mean pooled
    feature of its training crops (``head_init="mean"``: a nearest-class-mean classifier, logits
    ``f·μ_c − |μ_c|²/2`` scaled) or zeros (``head_init="zero"``); a new class without any crop gets
    a zero row and bias −10. Then the last ``train_blocks``
    dense blocks (0-4) and the head are trained with AdamW (backbone lr × ``backbone_lr_scale``),
    a cosine schedule, label smoothing, and augmentation (horizontal flip, box scale/shift
    jitter, brightness/contrast; mixup optional, off by default). ``init`` is not modified. Keyword ``overrides`` change any
    :data:`RECIPE` entry. ``val``: optional samples in the same form, scored after training.

    Regularisers (off in the recipe): ``l2sp=α`` adds ``α/2·‖w − w_anchor‖²`` (sum over the trained
    backbone weights) to the mean cross-entropy, and the backbone then gets no decoupled weight decay
    towards zero (the head keeps ``weight_decay``): L2-SP, Li et al. 2018, "Explicit inductive bias
    for transfer learning with convolutional networks" (ICML). ``anchor`` is the classifier
    whose backbone is the starting point (default ``init``; it must have the same architecture).
    ``bss=η`` adds ``η·Σ σ_i²`` over the ``bss_k`` smallest singular values of the batch's pooled
    features (batch × 256): Batch Spectral Shrinkage, Chen et al. 2019, "Catastrophic forgetting
    meets negative transfer" (NeurIPS).
    Pooling (``pool``, default ``"mean"``: face-api's global mean; see :mod:`facemodels.faceapi_net`):
    ``"gem"`` (generalized mean, learnable exponent starting at ``gem_p``) or ``"attn"`` (spatial
    softmax attention from a 1x1 conv starting at zero = the mean). When ``init``'s pooling is
    another one, a fresh pooling of the requested kind replaces it (an init with the same kind keeps
    its trained pooling); its parameters train with the head's lr. Measured: docs/classifier.md, "Sixth round".
    ``on_epoch(epoch, epochs, mean_loss)`` is called after every epoch (1-based).

    Returns ``(model, metrics)``; metrics: ``loss`` (per-epoch mean training loss), ``train_seconds``,
    ``n_train``, ``recipe`` (the settings used), ``classes``, ``kept_classes`` (rows taken from
    ``init``), and ``val_accuracy`` / ``val_per_class`` when ``val`` is given.
    Raises ValueError for no samples, bad classes, bad images/boxes or class indices.
    """
    cfg = dict(RECIPE)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown fine_tune settings: {sorted(unknown)} (known: {sorted(cfg)})")
    cfg.update(overrides)
    cfg["epochs"] = int(epochs)
    classes = [str(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be non-empty and unique: {classes}")
    if not samples:
        raise ValueError("fine_tune needs at least one labelled face")
    _check_samples(samples, classes, "samples")
    if val:
        _check_samples(val, classes, "val")
    if cfg["head_init"] not in ("mean", "zero"):
        raise ValueError(f"head_init must be 'mean' or 'zero', got {cfg['head_init']!r}")
    if not 0 <= cfg["train_blocks"] <= 4:
        raise ValueError(f"train_blocks must be 0..4, got {cfg['train_blocks']}")

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    margin = float(cfg["crop_margin"])
    size = int(cfg["input_size"])
    context = max(0.0, margin + cfg["scale_jitter"] + cfg["shift_jitter"] + 0.05)
    patches = [_Patch(im, check_boxes(b)[0], y, context, size) for im, b, y in samples]
    dev = init.device  # train where the init model lives (CPU here)
    labels = torch.tensor([p.label for p in patches], device=dev)

    if cfg["pool"] not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {cfg['pool']!r}")
    net = copy.deepcopy(init.net).to(dev)
    if getattr(net.features, "pool_name", "mean") != cfg["pool"]:
        net.features.pool_name = cfg["pool"]
        net.features.pool = make_pool(cfg["pool"], float(cfg["gem_p"]))
        if net.features.pool is not None:
            net.features.pool.to(dev)
    old_cols = init.class_columns(classes)  # row of init's head for each class, matched by name
    kept = [c for c, j in zip(classes, old_cols) if j is not None]
    fc = torch.nn.Linear(FEATURE_DIM, len(classes)).to(dev)
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.zero_()
        new_idx = [i for i, j in enumerate(old_cols) if j is None]
        if new_idx and cfg["head_init"] == "mean":
            net.eval()
            feats = net.features(torch.from_numpy(_plain_batch(patches, margin, size)).to(dev))
            # nearest class mean on the pooled features, scaled so that logits spread ~ a few units:
            # scale = 2 / (mean over classes of the mean squared distance of a crop to its class mean),
            # else to the overall mean
            present = [i for i in new_idx if bool((labels == i).any())]
            mus = {i: feats[labels == i].mean(0) for i in present}
            within = [float(feats[labels == i].sub(mus[i]).pow(2).sum(1).mean()) for i in present]
            spread = float(np.mean(within)) if within and len(labels) > 1 else 0.0
            if spread < 1e-6:
                spread = float(feats.sub(feats.mean(0)).pow(2).sum(1).mean())
            scale = 2.0 / spread if spread > 1e-6 else 1.0
            for i in present:
                fc.weight[i] = scale * mus[i]
                fc.bias[i] = -scale * mus[i].pow(2).sum() / 2
            for i in set(new_idx) - set(present):  # a class without crops: never predicted until it has some
                fc.bias[i] = -10.0
        for i, j in enumerate(old_cols):
            if j is not None:
                fc.weight[i] = net.fc.weight[j]
                fc.bias[i] = net.fc.bias[j]
    net.fc = fc

    blocks = [net.features.dense0, net.features.dense1, net.features.dense2, net.features.dense3]
    trainable = blocks[4 - cfg["train_blocks"]:] if cfg["train_blocks"] else []
    for p in net.features.parameters():
        p.requires_grad_(False)
    back = [p for b in trainable for p in b.parameters()]
    for p in back:
        p.requires_grad_(True)
    pool_params = list(net.features.pool.parameters()) if net.features.pool is not None else []
    for p in pool_params:
        p.requires_grad_(True)
    groups = [{"params": list(net.fc.parameters()) + pool_params, "lr": cfg["lr"]}]
    if back:
        groups.append({"params": back, "lr": cfg["lr"] * cfg["backbone_lr_scale"],
                       # L2-SP replaces the backbone's decay towards zero by its penalty towards the anchor
                       **({"weight_decay": 0.0} if cfg["l2sp"] else {})})
    opt = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    sp_pairs = []  # (trained backbone weight, its starting point) for L2-SP
    if cfg["l2sp"] and back:
        ref = dict((anchor or init).net.features.named_parameters())
        for name, p in net.features.named_parameters():
            if p.requires_grad and not name.startswith("pool."):  # the backbone only
                if name not in ref or ref[name].shape != p.shape:
                    raise ValueError(f"l2sp anchor has no weight {name} of shape {tuple(p.shape)}")
                sp_pairs.append((p, ref[name].detach().to(dev).clone()))

    def regularised(loss, feats):
        """The cross-entropy plus the optional L2-SP and BSS terms (the loss that is minimised)."""
        if sp_pairs:
            loss = loss + cfg["l2sp"] / 2 * sum((p - p0).pow(2).sum() for p, p0 in sp_pairs)
        if cfg["bss"] and feats.shape[0] > 1:
            sv = torch.linalg.svdvals(feats)  # descending
            loss = loss + cfg["bss"] * sv[-int(cfg["bss_k"]):].pow(2).sum()
        return loss
    bs = max(1, int(cfg["batch_size"]))
    steps_per_epoch = math.ceil(len(patches) / bs)
    total = max(1, steps_per_epoch * cfg["epochs"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    losses = []
    counts = np.bincount([p.label for p in patches], minlength=len(classes)).astype(np.float64)
    draw_p = (1.0 / counts[[p.label for p in patches]]) if cfg["balanced"] else None
    if draw_p is not None:
        draw_p /= draw_p.sum()
    swa_n, swa_state = 0, None
    if cfg["head_epochs"]:
        # linear probe, then fine-tune ("LP-FT", Kumar et al. 2022): the head alone first, on
        # augmented crops through the frozen backbone, so the backbone's update starts from a fitted head
        opt_h = torch.optim.AdamW(net.fc.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        for _ in range(int(cfg["head_epochs"])):
            order = rng.permutation(len(patches))
            for k in range(0, len(order), bs):
                idx = order[k:k + bs]
                x = torch.from_numpy(_augmented_batch([patches[i] for i in idx], rng, margin, cfg)).to(dev)
                with torch.no_grad():
                    f = net.features(x)
                loss = F.cross_entropy(net.fc(f), labels[idx], label_smoothing=cfg["label_smoothing"])
                opt_h.zero_grad()
                loss.backward()
                opt_h.step()
    for ep in range(cfg["epochs"]):
        net.train()
        # class-balanced: an epoch draws len(patches) crops with replacement, each class equally likely
        order = (rng.choice(len(patches), size=len(patches), p=draw_p) if draw_p is not None
                 else rng.permutation(len(patches)))
        tot, n = 0.0, 0
        for k in range(0, len(order), bs):
            idx = order[k:k + bs]
            x = torch.from_numpy(_augmented_batch([patches[i] for i in idx], rng, margin, cfg)).to(dev)
            y = labels[idx]
            if cfg["mixup"] > 0 and len(idx) > 1:  # mixup (Zhang et al. 2018): convex pairs of crops and targets
                lam = float(rng.beta(cfg["mixup"], cfg["mixup"]))
                perm = torch.from_numpy(rng.permutation(len(idx))).to(dev)
                feats = net.features(lam * x + (1 - lam) * x[perm])
                logits = net.fc(feats)
                loss = (lam * F.cross_entropy(logits, y, label_smoothing=cfg["label_smoothing"])
                        + (1 - lam) * F.cross_entropy(logits, y[perm], label_smoothing=cfg["label_smoothing"]))
            else:
                feats = net.features(x)
                loss = F.cross_entropy(net.fc(feats), y, label_smoothing=cfg["label_smoothing"])
            opt.zero_grad()
            regularised(loss, feats).backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            n += len(idx)
        losses.append(tot / n)
        if cfg["swa_epochs"] and ep >= cfg["epochs"] - int(cfg["swa_epochs"]):
            # stochastic weight averaging (Izmailov et al. 2018) of the last swa_epochs epochs' weights
            cur = {k: v.detach().clone() for k, v in net.state_dict().items()}
            swa_state = cur if swa_state is None else {k: swa_state[k] + (cur[k] - swa_state[k]) / (swa_n + 1)
                                                       for k in cur}
            swa_n += 1
        if on_epoch:
            on_epoch(ep + 1, cfg["epochs"], losses[-1])
    if swa_state is not None:
        net.load_state_dict(swa_state)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(True)
    train_s = time.perf_counter() - t0
    meta = dict(init.meta)
    meta["fine_tune"] = {"n_train": len(patches), "seed": seed, "recipe": cfg, "classes": classes,
                         "kept_classes": kept, "train_seconds": round(train_s, 2),
                         "parent": init.meta.get("sha256") or init.meta.get("source", {}).get("package")}
    model = FaceClassifier(net, classes, crop_margin=margin, input_size=size, meta=meta, device=init.device)
    metrics = {"loss": losses, "train_seconds": train_s, "n_train": len(patches), "recipe": cfg,
               "classes": classes, "kept_classes": kept}
    if val:
        ev = evaluate(model, val)
        metrics["val_accuracy"] = ev["accuracy"]
        metrics["val_per_class"] = ev["per_class"]
    return model, metrics
