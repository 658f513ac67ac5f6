"""Face-crop samples from the shared YOLO datasets for the classifier benchmarks.

``faces(dataset, split)`` -> list of :class:`Face` (image path, box x1,y1,x2,y2 pixels, class name,
source prefix) from ``../shared/data/<dataset>`` (YOLO labels, ground-truth boxes). Images are
decoded with PIL (``ImageOps.exif_transpose``, RGB) when needed and cached per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
#: awake_sleep val images of people never seen in train (file-name prefixes of the two repositories).
UNSEEN_PREFIXES = ("harish_", "agufsamudra_")


@dataclass(frozen=True)
class Face:
    image: Path
    box: tuple[float, float, float, float]
    label: str

    @property
    def source(self) -> str:
        return self.image.name.split("_")[0]


def class_names(dataset: str) -> list[str]:
    import yaml

    d = yaml.safe_load((SHARED / dataset / "data.yaml").read_text())
    names = d["names"]
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


@functools.lru_cache(maxsize=4096)
def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def faces(dataset: str, split: str) -> list[Face]:
    root = SHARED / dataset
    if not (root / "data.yaml").exists():
        raise SystemExit(f"dataset not found: {root}")
    names = class_names(dataset)
    out = []
    for img in sorted((root / "images" / split).glob("*.jpg")):
        lf = root / "labels" / split / (img.stem + ".txt")
        if not lf.exists():
            continue
        with Image.open(img) as im:
            W, H = ImageOps.exif_transpose(im).size
        for line in lf.read_text().splitlines():
            p = line.split()
            if len(p) != 5:
                continue
            c, xc, yc, w, h = int(p[0]), *map(float, p[1:])
            out.append(Face(img, ((xc - w / 2) * W, (yc - h / 2) * H, (xc + w / 2) * W, (yc + h / 2) * H), names[c]))
    return out


def samples(face_list: list[Face], classes: list[str]) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """``fine_tune``/``evaluate`` samples: (image, box, index into classes); faces of other classes dropped."""
    idx = {c: i for i, c in enumerate(classes)}
    return [(load_rgb(f.image), np.array(f.box), idx[f.label]) for f in face_list if f.label in idx]
