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
