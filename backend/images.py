"""Fetch and decode task images: Label Studio uploads, local files, plain URLs.

Images come back as RGB arrays of the image *as displayed* (``ImageOps.exif_transpose``), which
is the frame Label Studio's percent coordinates refer to.

URL kinds (label-studio-protocol.md §1):
- ``/data/upload/<pid>/<file>`` and other relative ``/data/...`` URLs: from Label Studio, with
  ``Authorization`` from the SDK client (a personal access token is exchanged for a 300 s access
  token by the SDK; a legacy token is sent as ``Token``).
- ``/data/local-files/?d=<path>``: from disk when ``LOCAL_FILES_DOCUMENT_ROOT`` is set, else from
  Label Studio as above.
- ``http(s)://``: Label Studio's own host gets the auth header; others are fetched without it.
"""

from __future__ import annotations

import io
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.config import Settings


class ImageError(Exception):
    """A task's image could not be fetched or decoded; the message says why (shown to users)."""


@dataclass
class LoadedImage:
    """An RGB image ready for the model.

    Attributes:
        array: ``(H, W, 3)`` uint8 RGB, EXIF orientation applied.
        width, height: pixels of that array.
    """

    array: np.ndarray
    width: int
    height: int


_clients: dict[tuple[str, str], object] = {}
_clients_lock = threading.Lock()


def ls_client(settings: Settings, url: str | None = None):
    """A cached ``label_studio_sdk.LabelStudio`` client for ``settings`` (or ``url``).

    Raises: ImageError when no API key is configured.
    """
    from label_studio_sdk import LabelStudio

    base = (url or settings.label_studio_url).rstrip("/")
    if not settings.label_studio_api_key:
        raise ImageError("LABEL_STUDIO_API_KEY is not set: the backend cannot read images or write predictions")
    key = (base, settings.label_studio_api_key)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = LabelStudio(base_url=base, api_key=settings.label_studio_api_key, timeout=60)
            _clients[key] = c
        return c


def auth_headers(settings: Settings, url: str | None = None) -> dict[str, str]:
    """``Authorization`` header for Label Studio, refreshed by the SDK when the key is a PAT."""
    headers = ls_client(settings, url)._client_wrapper.get_headers()
    return {"Authorization": headers["Authorization"]}


def _pil_open(fp):
    """``PIL.Image.open`` as Pillow ships it.

    Importing ultralytics replaces ``Image.open`` with a wrapper that, when Pillow cannot identify
    a file, tries to pip-install and import ``pi-heif`` (ultralytics ``utils/patches.py``): bytes
    that are not an image would then fail with ``ModuleNotFoundError: pi_heif`` instead of a clear
    message (or install packages in the middle of a request when online).
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)(fp)


def decode_image(data: bytes, max_pixels: int) -> LoadedImage:
    """Decode image bytes to RGB with EXIF orientation applied.

    Raises: ImageError for bytes that are not an image, truncated data, or more than
        ``max_pixels`` pixels.
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        with _pil_open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise ImageError(f"image is too large: {im.width}x{im.height} px (limit {max_pixels} px)")
            im = ImageOps.exif_transpose(im)
            arr = np.asarray(im.convert("RGB"))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not a readable image ({len(data)} bytes starting {data[:8]!r})") from None
    except (Image.DecompressionBombError, ImportError) as e:
        raise ImageError(f"not a readable image: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:  # truncated/corrupt files
        raise ImageError(f"broken image data: {e}") from e
    return LoadedImage(arr, arr.shape[1], arr.shape[0])


def _read_local(rel: str, settings: Settings) -> bytes:
    """Read ``rel`` (the already URL-decoded ``?d=`` value, as Label Studio decodes it: once)."""
    root = Path(settings.local_files_document_root).resolve()
    p = (root / rel.lstrip("/")).resolve()
    if root not in p.parents and p != root:
        raise ImageError(f"local file {rel!r} is outside LOCAL_FILES_DOCUMENT_ROOT")
    if not p.is_file():
        raise ImageError(f"local file not found: {p}")
    if p.stat().st_size > settings.max_image_bytes:
        raise ImageError(f"image file is too large: {p.stat().st_size} bytes")
    return p.read_bytes()


def _http_get(url: str, headers: dict, settings: Settings) -> bytes:
    try:
        with httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), follow_redirects=True) as c:
            with c.stream("GET", url, headers=headers) as r:
                if r.status_code != 200:
                    raise ImageError(f"GET {url} answered HTTP {r.status_code}")
                buf = bytearray()
                for chunk in r.iter_bytes():
                    buf.extend(chunk)
                    if len(buf) > settings.max_image_bytes:
                        raise ImageError(f"image at {url} is larger than {settings.max_image_bytes} bytes")
                return bytes(buf)
    except httpx.HTTPError as e:
        raise ImageError(f"could not fetch {url}: {e.__class__.__name__}: {e}") from e


def fetch_image_bytes(url: str, settings: Settings, ls_url: str | None = None) -> bytes:
    """Bytes of a task's image URL (see module docstring for the kinds).

    Args:
        url: the value of ``task["data"][value_key]``.
        ls_url: Label Studio base URL to use (e.g. ``/setup``'s hostname); default the settings'.
    Raises: ImageError for an unsupported or failing URL.
    """
    if not isinstance(url, str) or not url.strip():
        raise ImageError(f"task has no image URL (got {url!r})")
    url = url.strip()
    base = (ls_url or settings.label_studio_url).rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme in ("", None) and url.startswith("/"):
        if parsed.path.startswith("/data/local-files") and settings.local_files_document_root:
            d = parse_qs(parsed.query).get("d", [""])[0]
            return _read_local(d, settings)
        return _http_get(base + url, auth_headers(settings, base), settings)
    if parsed.scheme in ("http", "https"):
        same_host = url.startswith(base + "/")
        return _http_get(url, auth_headers(settings, base) if same_host else {}, settings)
    raise ImageError(f"unsupported image URL {url!r}: use /data/upload, /data/local-files or http(s)")


def load_image(url: str, settings: Settings, ls_url: str | None = None) -> LoadedImage:
    """Fetch and decode a task image. Raises ImageError with a message for the user."""
    return decode_image(fetch_image_bytes(url, settings, ls_url), settings.max_image_pixels)
