"""Helpers shared by the fast unit tests (no Label Studio, no Redis, no Celery worker)."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from backend.config import LABEL_CONFIG_DIR, Settings

#: A broker URL nothing listens on (port 1): enqueueing fails at once, as with Redis down.
DEAD_BROKER = "redis://127.0.0.1:1/0"

#: The protocol doc's example config (§3): predicted_values and a model_score_threshold.
EXAMPLE_CONFIG = """
<View>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="face" toName="image" model_score_threshold="0.4">
    <Label value="Happy"    background="green"  predicted_values="happy,smile"/>
    <Label value="Sad"      background="blue"/>
    <Label value="Neutral"  background="gray"/>
    <Label value="Surprise" background="orange"/>
  </RectangleLabels>
</View>
"""

#: An image classification config (Choices on the image, no boxes): served as image-level choices.
CHOICES_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <Choices name="mood" toName="image"><Choice value="happy"/><Choice value="sad"/></Choices>
</View>
"""


#: A config faceloop cannot serve: polygons only.
POLYGON_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="outline" toName="image"><Label value="face"/></PolygonLabels>
</View>
"""


def config_text(name: str) -> str:
    """The text of ``label_config/<name>.xml``."""
    return (LABEL_CONFIG_DIR / f"{name}.xml").read_text()


def make_settings(tmp_path: Path, **kw) -> Settings:
    """Settings whose state (database, model store) lives under ``tmp_path``.

    The database URL is given explicitly so that no ``DATABASE_URL`` in the environment leaks in.
    """
    kw.setdefault("var_dir", tmp_path)
    kw.setdefault("database_url", f"sqlite:///{Path(tmp_path).resolve() / 'faceloop.db'}")
    kw.setdefault("celery_broker_url", DEAD_BROKER)
    kw.setdefault("label_studio_api_key", "")
    return Settings(**kw)


def jpeg_bytes(width: int = 64, height: int = 48, color=(200, 120, 40), orientation: int | None = None,
               marker: tuple[int, int, int, int] | None = None, marker_color=(255, 0, 0), quality: int = 95) -> bytes:
    """A JPEG of ``width`` x ``height`` stored pixels.

    Args:
        orientation: EXIF Orientation tag (0x0112) to write, e.g. 6 (display rotated 90° clockwise)
            or 8 (display rotated 90° counter-clockwise).
        marker: ``(x1, y1, x2, y2)`` stored-frame rectangle painted ``marker_color``.
    """
    im = Image.new("RGB", (width, height), color)
    if marker is not None:
        im.paste(marker_color, marker)
    buf = io.BytesIO()
    kwargs = {"quality": quality}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    im.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def write_jpeg(path: Path, **kw) -> Path:
    """Write :func:`jpeg_bytes` to ``path`` (parents created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(**kw))
    return path


def local_url(rel: str) -> str:
    """Label Studio's URL of a local file ``rel`` (relative to the document root), as LS writes it."""
    return f"/data/local-files/?d={quote(rel)}"


def rect_region(x, y, w, h, label=None, rotation=0, from_name="face", to_name="image", rid="r1",
                original_width=None, original_height=None) -> dict:
    """A RectangleLabels region as it appears in an annotation's ``result`` (percent units)."""
    r = {"id": rid, "from_name": from_name, "to_name": to_name, "type": "rectanglelabels",
         "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
                   "rectanglelabels": [label] if label is not None else []}}
    if original_width is not None:
        r["original_width"], r["original_height"] = original_width, original_height
    return r


def synthetic_face_crops(n: int = 6, seed: int = 0) -> list:
    """``n`` classifier training samples ``(image, box, class)``: 90 x 120 RGB noise with a 50 x 50
    "face" at box ``(30, 20, 80, 70)`` pixels, bright for class 1 and dark for class 0 (alternating)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
        im[20:70, 30:80] = 255 if i % 2 else 0
        out.append((im, np.array([30.0, 20.0, 80.0, 70.0]), i % 2))
    return out


def shipped_model_on_a_folder(tmp_path: Path):
    """What a ``predict_tasks`` test of the shipped default needs: ``(root, settings, schema, model)``
    with ``root`` = ``tmp_path/docs`` (made) served as Label Studio's local-files root (tasks use
    :func:`local_url`), :data:`EXAMPLE_CONFIG`'s schema and the shipped default model."""
    from backend.config import DEFAULT_MODEL_PATH
    from backend.labels import ProjectSchema
    from facemodels.detector import ModelCache

    root = tmp_path / "docs"
    root.mkdir()
    settings = make_settings(tmp_path, local_files_document_root=str(root))
    return root, settings, ProjectSchema.parse(EXAMPLE_CONFIG), ModelCache().get(DEFAULT_MODEL_PATH)
