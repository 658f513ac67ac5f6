"""Read a YOLO checkpoint's class names without importing ultralytics (keeps /setup fast)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=64)
def _names(path: str, mtime: float) -> tuple[str, ...]:
    from backend.config import configure_ultralytics

    configure_ultralytics()  # unpickling imports ultralytics: keep it offline and out of ~/.config
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt.get("model")
    names = getattr(model, "names", None) or ckpt.get("train_args", {}).get("names") or {}
    if isinstance(names, dict):
        return tuple(str(names[k]) for k in sorted(names))
    return tuple(str(n) for n in names)


def read_class_names(path: Path) -> list[str]:
    """Class names of a ``.pt`` checkpoint in index order (cached per path and mtime).

    A sidecar ``<name>.json`` with a ``names`` list (the shipped model has one) is read instead
    of the checkpoint, which avoids importing torch and ultralytics (seconds) on ``/setup``.
    """
    p = Path(path)
    if p.suffix == ".json":  # a two-stage bundle: the classifier's classes
        import json

        return [str(n) for n in json.loads(p.read_text()).get("classes") or []]
    side = p.with_suffix(".json")
    if side.exists():
        import json

        names = json.loads(side.read_text()).get("names")
        if names:
            return [str(n) for n in names]
    return list(_names(str(p.resolve()), p.stat().st_mtime))
