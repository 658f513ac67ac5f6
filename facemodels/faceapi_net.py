"""The face-api.js FaceExpressionNet in PyTorch.

Architecture (from face-api.js / @vladmandic/face-api 1.7.15, MIT: ``src/faceFeatureExtractor/
FaceFeatureExtractor.ts``, ``denseBlock.ts``, ``src/common/depthwiseSeparableConv.ts``,
``src/faceExpressionNet/FaceExpressionNet.ts``, ``src/faceProcessor/FaceProcessor.ts``):

* input (N, 3, 112, 112), RGB, already normalised as ``(x - mean_rgb) / 255``
  (see :mod:`facemodels.preprocess`);
* four dense blocks (``denseBlock4``), channels 32, 64, 128, 256; each halves the resolution
  (112 -> 56 -> 28 -> 14 -> 7). In a block, ``conv0`` (a plain 3x3 conv with bias in the first
  block, otherwise a depthwise-separable conv) has stride 2, ``conv1..conv3`` are depthwise-separable
  (3x3 depthwise without bias, 1x1 pointwise, then bias) with stride 1, and the outputs are summed
  densely::

      out1 = relu(conv0(x)); out2 = conv1(out1)
      out3 = conv2(relu(out1 + out2))
      out4 = conv3(relu(out1 + out2 + out3))
      return relu(out1 + out2 + out3 + out4)

* TF ``'same'`` padding: for a stride-2 3x3 conv on an even size, TF pads 0 before and 1 after
  (PyTorch's symmetric ``padding=1`` would shift the sampling grid), so padding is explicit here;
* 7x7 average pool (stride 2, ``'valid'``; = global mean at 112 px) -> (N, 256) features, then a fully connected layer
  256 -> K and softmax (K = 7 for the pretrained expression net).

Optional poolings in place of the mean (``pool=``; not face-api's, measured in docs/classifier.md,
"Sixth round"): ``"gem"`` (:class:`GeMPool`) and ``"attn"`` (:class:`AttentionPool`); both start
as the mean (GeM at p = 1, attention with a zero conv), so the pretrained head stays valid.

323,687 parameters for K = 7 (the pretrained net).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Channels of the four dense blocks.
BLOCK_CHANNELS = (32, 64, 128, 256)
#: Feature dimension after pooling (input of the fully connected head).
FEATURE_DIM = 256
#: Side of the square network input in pixels.
INPUT_SIZE = 112


def _tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Pad (N, C, H, W) as TensorFlow's ``padding='same'`` does (extra pixel after, not before)."""
    pads = []
    # F.pad order: last dim first; int(): the amounts are constants in an ONNX export (the input size is fixed)
    for size in (int(x.shape[-1]), int(x.shape[-2])):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    if any(pads):
        x = F.pad(x, pads)
    return x


class TFConv2d(nn.Conv2d):
    """3x3 conv (plain or depthwise) with TF 'same' padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = _tf_same_pad(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


class SeparableConv(nn.Module):
    """TF ``separableConv2d`` + bias: 3x3 depthwise (no bias), 1x1 pointwise, bias after."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.depthwise = TFConv2d(c_in, c_in, 3, stride=stride, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.pointwise(self.depthwise(x))


class DenseBlock4(nn.Module):
    """face-api.js ``denseBlock4`` (stride 2 in conv0, dense additive connections)."""

    def __init__(self, c_in: int, c_out: int, first: bool):
        super().__init__()
        self.conv0 = TFConv2d(c_in, c_out, 3, stride=2, bias=True) if first else SeparableConv(c_in, c_out, 2)
        self.conv1 = SeparableConv(c_out, c_out, 1)
        self.conv2 = SeparableConv(c_out, c_out, 1)
        self.conv3 = SeparableConv(c_out, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out1 = F.relu(self.conv0(x))
        out2 = self.conv1(out1)
        out3 = self.conv2(F.relu(out1 + out2))
        out4 = self.conv3(F.relu(out1 + out2 + out3))
        return F.relu(out1 + out2 + out3 + out4)


class GeMPool(nn.Module):
    """Generalized-mean pooling (Radenović, Tolias, Chum 2018, "Fine-tuning CNN image retrieval
    with no human annotation", TPAMI): ``(mean over cells of clamp(x, eps)^p)^(1/p)`` per channel,
    with a learnable ``p`` (p = 1: the mean; p -> inf: the max).

    (N, C, H, W) non-negative map (after ReLU) -> (N, C). ``p``: initial exponent (> 0);
    ``eps``: lower clamp so that ``x^p`` is differentiable at 0.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        if not p > 0:
            raise ValueError(f"GeM p must be > 0, got {p}")
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        p = self.p.clamp(min=1e-2)
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class AttentionPool(nn.Module):
    """Spatial attention pooling: a 1x1 conv C -> 1 gives one logit per cell, a softmax over the
    H·W cells gives weights, and the features are the weighted sum of the cells' C-d vectors.

    (N, C, H, W) -> (N, C). The conv starts at zero (uniform weights), so the pooling starts as
    the global mean exactly.
    """

    def __init__(self, channels: int = FEATURE_DIM):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1, bias=True)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        w = torch.softmax(self.conv(x).flatten(1), dim=1)  # (N, H*W)
        return torch.einsum("nchw,nhw->nc", x, w.view(w.shape[0], *x.shape[2:]))


#: Names accepted by ``pool=``.
POOLS = ("mean", "gem", "attn")


def make_pool(pool: str, gem_p: float = 3.0) -> nn.Module | None:
    """The pooling module for ``pool`` (None for the mean). Raises ValueError for an unknown name."""
    if pool == "mean":
        return None
    if pool == "gem":
        return GeMPool(gem_p)
    if pool == "attn":
        return AttentionPool(FEATURE_DIM)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


class FaceFeatureExtractor(nn.Module):
    """(N, 3, 112, 112) normalised input -> (N, 256) pooled features (``pool``: see :data:`POOLS`)."""

    def __init__(self, pool: str = "mean", gem_p: float = 3.0):
        super().__init__()
        c = (3,) + BLOCK_CHANNELS
        self.dense0 = DenseBlock4(c[0], c[1], first=True)
        self.dense1 = DenseBlock4(c[1], c[2], first=False)
        self.dense2 = DenseBlock4(c[2], c[3], first=False)
        self.dense3 = DenseBlock4(c[3], c[4], first=False)
        self.pool_name = pool
        self.pool = make_pool(pool, gem_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.dense3(self.dense2(self.dense1(self.dense0(x))))
        if self.pool is not None:
            return self.pool(x)
        # tf.avgPool(out, [7, 7], [2, 2], 'valid') on the 7x7 map of a 112 input = the global mean;
        # the global mean also lets a fine-tuned model take larger inputs (input_size > 112)
        return x.mean(dim=(2, 3))


class FaceExpressionNet(nn.Module):
    """Feature extractor + fully connected head; ``forward`` returns logits (N, K)."""

    def __init__(self, num_classes: int = 7, pool: str = "mean"):
        super().__init__()
        self.features = FaceFeatureExtractor(pool)
        self.fc = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(self.features(x))


def state_dict_from_tfjs(weights: dict[str, "numpy.ndarray"]) -> dict[str, torch.Tensor]:  # noqa: F821
    """Map face-api.js weight names/layouts (TF) to :class:`FaceExpressionNet`'s state_dict.

    ``weights``: name -> float32 array as in the TF.js manifest (``dense0/conv0/filters`` HWIO
    ``[3,3,3,32]``, ``denseN/convM/depthwise_filter`` ``[3,3,C,1]``, ``pointwise_filter``
    ``[1,1,Cin,Cout]``, ``bias``, ``fc/weights`` ``[256,K]``, ``fc/bias``).
    Raises KeyError for a missing tensor and ValueError for a shape mismatch or extra tensors.
    """
    out: dict[str, torch.Tensor] = {}
    used = set()

    def take(name):
        used.add(name)
        return torch.from_numpy(weights[name].astype("float32"))

    for b in range(4):
        for c in range(4):
            tf_p, pt_p = f"dense{b}/conv{c}", f"features.dense{b}.conv{c}"
            if b == 0 and c == 0:
                out[f"{pt_p}.weight"] = take(f"{tf_p}/filters").permute(3, 2, 0, 1).contiguous()
                out[f"{pt_p}.bias"] = take(f"{tf_p}/bias")
            else:
                out[f"{pt_p}.depthwise.weight"] = take(f"{tf_p}/depthwise_filter").permute(2, 3, 0, 1).contiguous()
                out[f"{pt_p}.pointwise.weight"] = take(f"{tf_p}/pointwise_filter").permute(3, 2, 0, 1).contiguous()
                out[f"{pt_p}.pointwise.bias"] = take(f"{tf_p}/bias")
    out["fc.weight"] = take("fc/weights").t().contiguous()
    out["fc.bias"] = take("fc/bias")
    extra = set(weights) - used
    if extra:
        raise ValueError(f"unexpected tensors in the face-api.js weights: {sorted(extra)}")
    ref = FaceExpressionNet(out["fc.bias"].shape[0]).state_dict()
    for k, v in out.items():
        if ref[k].shape != v.shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} from the manifest, expected {tuple(ref[k].shape)}")
    return out
