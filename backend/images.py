"""Fetch and decode task images: Label Studio uploads, local files, plain URLs.

Images come back as RGB arrays of the image *as displayed* (``ImageOps.exif_transpose``), which
is the frame Label Studio's percent coordinates refer to.

URL kinds (label-studio-protocol.md §1, §5 "Authentication, backend -> LS"):
- Relative Label Studio *file* URLs: ``/data/upload/<pid>/<file>``, ``/data/local-files/?d=<path>``,
  ``/tasks/<id>/presign/?fileuri=...``, ``/projects/<id>/presign/?fileuri=...`` and
  ``/storage-data/uploaded/?filepath=...`` (storage resolve URLs). They are fetched from
  ``LABEL_STUDIO_URL`` with ``Authorization`` from the SDK client (a personal access token is
  exchanged for a 300 s access token by the SDK; a legacy token is sent as ``Token``).
  ``/data/local-files/`` is read from disk instead when ``LOCAL_FILES_DOCUMENT_ROOT`` is set and that
  folder exists on this machine (a worker on another machine gets the image through Label Studio).
- Any other relative URL (``/api/...`` above all) is refused before any request is made.
- ``http(s)://`` on Label Studio's own origin (``LABEL_STUDIO_URL`` or one of
  ``LABEL_STUDIO_URL_ALIASES``): as the relative file URLs (same path rule, with the token).
- ``http(s)://`` elsewhere: fetched *without* credentials; hosts that resolve to a private,
  loopback, link-local or reserved address are refused unless ``IMAGE_URLS_ALLOW_PRIVATE`` is
  set, and every failure gives the same message (no port scanning through error texts). The
  download connects to the address that was checked (:class:`_PinnedBackend`: no DNS rebinding
  between the check and the connection).

Safety rules (issue 9): credentials go only to the configured Label Studio, never to ``/setup``'s
``hostname`` (an ``ls_url`` argument that is not a configured Label Studio origin is ignored);
redirects are followed by hand, at most :data:`MAX_REDIRECTS`, and a hop keeps the token only
when it stays on a Label Studio file URL; one download has an overall deadline
(``IMAGE_FETCH_TIMEOUT_S``) and a size cap (``MAX_IMAGE_BYTES``); error texts name the URL
without its query string and never echo fetched bytes. Decoding reads the size from the header
first and refuses more than ``MAX_IMAGE_PIXELS`` (a larger JPEG is decoded at reduced scale with
``Image.draft``); at most ``MAX_CONCURRENT_DECODES`` images decode at once per process.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpcore
import httpx
import numpy as np
from PIL import Image, UnidentifiedImageError

from backend.config import Settings

log = logging.getLogger("faceloop.images")

#: Redirect hops followed for one image (each one checked like the first URL).
MAX_REDIRECTS = 5

#: Label Studio paths that serve task files (LS 1.23: ``data_import`` upload view, ``core``
#: local-files view, ``tasks``/``projects`` storage presign views, ``io_storages`` uploaded-file
#: resolver). Only these ever get the API token.
LS_FILE_PATH = re.compile(
    r"^/(?:data/upload/[^?#]+|data/local-files/?|tasks/\d+/presign/?|projects/\d+/presign/?"
    r"|storage-data/uploaded/?)$")


class ImageError(Exception):
    """A task's image could not be fetched or decoded; the message says why (shown to users)."""


@dataclass
class LoadedImage:
    """An RGB image ready for the model.

    Attributes:
        array: ``(H, W, 3)`` uint8 RGB, EXIF orientation applied; transparent pixels composited
            on white (:func:`to_rgb8`).
        width, height: pixels of that array.
        original_width, original_height: pixels of the image as displayed (EXIF orientation
            applied) before any reduction (``MAX_IMAGE_SIDE``, JPEG ``draft``); what Label Studio
            shows and expects as a region's ``original_width``/``original_height``. Equal to
            ``width``/``height`` when the image was decoded at full size.
    """

    array: np.ndarray
    width: int
    height: int
    original_width: int = 0
    original_height: int = 0
    #: ``(H, W)`` uint8 alpha of ``array``'s pixels (0 transparent, 255 opaque) for an image with
    #: transparency; None for one without (every JPEG) or whose alpha is opaque everywhere.
    alpha: np.ndarray | None = None

    def __post_init__(self):
        self.original_width = self.original_width or self.width
        self.original_height = self.original_height or self.height


_clients: dict[tuple[str, str], object] = {}
_clients_lock = threading.Lock()
_warned: set[str] = set()


def _origin(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an http(s) URL (default ports filled in), or None."""
    try:
        p = urlsplit(url)
        if p.scheme not in ("http", "https") or not p.hostname:
            return None
        return p.scheme, p.hostname.lower().rstrip("."), p.port or (443 if p.scheme == "https" else 80)
    except ValueError:  # bad port, bad IPv6 literal
        return None


def ls_bases(settings: Settings) -> list[str]:
    """The configured Label Studio base URLs: ``LABEL_STUDIO_URL`` then ``LABEL_STUDIO_URL_ALIASES``."""
    bases = [settings.label_studio_url] + [u for u in settings.label_studio_url_aliases.split(",")]
    return [b.strip().rstrip("/") for b in bases if b.strip()]


def ls_base(settings: Settings, candidate: str | None = None) -> str:
    """The Label Studio base URL to use: the configured one whose origin ``candidate`` has, else
    ``LABEL_STUDIO_URL``. A ``candidate`` from a request (``/setup``'s ``hostname``, a stored
    ``Project.ls_url``) never becomes a base of its own, so credentials cannot be redirected."""
    bases = ls_bases(settings)
    if candidate:
        o = _origin(candidate)
        for b in bases:
            if o is not None and _origin(b) == o:
                return b
        if candidate not in _warned and len(_warned) < 100:
            _warned.add(candidate)
            log.warning("ignoring Label Studio URL %r: not LABEL_STUDIO_URL or one of LABEL_STUDIO_URL_ALIASES",
                        _safe_url(candidate))
    return bases[0] if bases else ""


def ls_client(settings: Settings, url: str | None = None):
    """A cached ``label_studio_sdk.LabelStudio`` client for the configured Label Studio.

    Args:
        url: a Label Studio base URL to prefer; used only when it is a configured one
            (see :func:`ls_base`), else ignored.
    Raises: ImageError when no API key is configured.
    """
    from label_studio_sdk import LabelStudio

    base = ls_base(settings, url)
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
    """``Authorization`` header for the configured Label Studio, refreshed by the SDK when the
    key is a PAT (the refresh goes to ``LABEL_STUDIO_URL`` only)."""
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


# --- decoding ---------------------------------------------------------------------------------
_semaphores: dict[tuple[str, int], threading.BoundedSemaphore] = {}


def _slots(kind: str, n: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore of ``n`` slots for ``kind`` (``fetch`` or ``decode``)."""
    with _clients_lock:
        return _semaphores.setdefault((kind, n), threading.BoundedSemaphore(max(1, n)))


#: Rows converted at a time in :func:`to_rgb8` (bounds the temporaries of a 40 MP image).
_ROWS = 256


def _rows(h: int):
    for r0 in range(0, h, _ROWS):
        yield slice(r0, min(h, r0 + _ROWS))


def _gray_u8(a: np.ndarray, convert) -> np.ndarray:
    """``(H, W)`` values -> ``(H, W, 3)`` uint8 grey, ``convert(block) -> uint8`` row block by row block."""
    out = np.empty(a.shape[:2] + (3,), np.uint8)
    for rs in _rows(a.shape[0]):
        out[rs] = convert(a[rs])[:, :, None]
    return out


def _scaled(hi: float):
    """Block converter: 0..hi -> 0..255, rounded and clipped."""
    def convert(block):
        f = block.astype(np.float32) * np.float32(255.0 / hi)
        return np.rint(np.clip(f, 0, 255)).astype(np.uint8)
    return convert


def _stretched(lo: float, hi: float):
    """Block converter: min-max stretch lo..hi -> 0..255 (a constant image becomes 0)."""
    if hi <= lo:
        return lambda block: np.zeros(block.shape, np.uint8)
    scale = _scaled(hi - lo)
    return lambda block: scale(np.nan_to_num(block.astype(np.float32), nan=lo, posinf=hi, neginf=lo) - np.float32(lo))


def _finite_range(a: np.ndarray) -> tuple[float, float]:
    lo, hi = np.inf, -np.inf
    for rs in _rows(a.shape[0]):
        b = a[rs]
        if b.dtype.kind == "f":
            b = b[np.isfinite(b)]
        if b.size:
            lo, hi = min(lo, float(b.min())), max(hi, float(b.max()))
    return (0.0, 0.0) if lo > hi else (lo, hi)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA (uint8) on white, as a browser shows it on a white page."""
    out = np.empty(rgba.shape[:2] + (3,), np.uint8)
    for rs in _rows(rgba.shape[0]):
        b = rgba[rs].astype(np.uint16)
        a = b[:, :, 3:4]
        out[rs] = ((b[:, :, :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return out


def to_rgb8(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> ``(H, W, 3)`` uint8 RGB, scaled to what a viewer shows.

    - ``RGB``: as is. ``1``, ``L``: grey to RGB. ``P`` / ``PA`` / ``LA`` / ``La`` / ``RGBA`` /
      ``RGBa`` (and ``P`` with a ``transparency`` entry): alpha composited on white.
    - ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: Pillow's own conversion to RGB.
    - 16-bit ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N``: by the mode's range, value x 255/65535
      (0-65535 -> 0-255, what browsers show for a 16-bit PNG).
    - 32-bit ``I``: values in 0-255 as 8-bit, in 0-65535 as 16-bit (Pillow opens 16-bit
      TIFF/PNG files as ``I`` in some versions), else min-max stretched.
    - ``F``: values in 0-1 x 255, in 0-255 as is (rounded), else min-max stretched; NaN/inf -> 0.

    Work is done 256 rows at a time, so the temporaries stay small for large images.
    Raises: ImageError for a mode Pillow cannot convert to RGB.
    """
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode in ("L", "1"):
        return _gray_u8(np.asarray(im.convert("L") if mode == "1" else im), lambda b: b)
    if mode.startswith("I;16"):
        return _gray_u8(np.asarray(im), _scaled(65535.0))
    if mode in ("I", "F"):
        a = np.asarray(im)
        lo, hi = _finite_range(a)
        if mode == "F" and lo >= 0 and hi <= 1.0:
            conv = _scaled(1.0)
        elif lo >= 0 and hi <= 255:
            conv = _scaled(255.0)
        elif mode == "I" and lo >= 0 and hi <= 65535:
            conv = _scaled(65535.0)
        else:
            conv = _stretched(lo, hi)
        if mode == "F":
            return _gray_u8(a, lambda b: conv(np.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0)))
        return _gray_u8(a, conv)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in im.info):
        if mode == "La":  # premultiplied grey + alpha: no direct conversion in Pillow
            im = im.convert("LA")
        return _over_white(np.asarray(im if mode == "RGBA" else im.convert("RGBA")))
    try:
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as e:
        raise ImageError(f"unsupported image mode {mode}: {e}") from None


def alpha_of(im: Image.Image) -> np.ndarray | None:
    """``(H, W)`` uint8 alpha of an image with transparency (modes and ``P`` transparency as in
    :func:`to_rgb8`), or None: for a mode without alpha (no work done) or an alpha opaque everywhere."""
    mode = im.mode
    if mode in ("RGBA", "LA", "PA"):
        a = np.asarray(im.getchannel("A"))
    elif mode in ("RGBa", "La") or (mode == "P" and "transparency" in im.info):
        a = np.asarray(im.convert("RGBA" if mode != "La" else "LA").getchannel("A"))
    else:
        return None
    return None if a.min() == 255 else a


#: A detection is kept when the mean alpha over its box is at least this (0-1): half of its
#: pixels visible. See :func:`drop_transparent`.
MIN_VISIBLE = 0.5


def drop_transparent(det, alpha: np.ndarray | None, min_visible: float = MIN_VISIBLE):
    """``det`` (``facemodels.detector.ImageDetections``, boxes in pixels of ``alpha``'s image)
    without the detections that lie mostly on transparent pixels.

    A transparent area is nothing to label, but once composited (on white, or any uniform colour:
    the shipped detector boxed a uniform band beside a face at face confidence >= 0.5 whether white,
    ultralytics' letterbox grey 114 or black) the detector may take it for a face. A detection is
    kept when the mean alpha over its box, 0-1, is at least ``min_visible``. ``alpha`` None (an
    image without transparency) returns ``det`` unchanged. White stays the composite colour
    (:func:`to_rgb8`): it is how the browser shows the image in Label Studio, so the classifier's face
    crops look like what the person sees; no colour stopped the false box, this filter does.
    """
    if alpha is None or not det.detections:
        return det
    h, w = alpha.shape
    kept = []
    for d in det.detections:
        x1, y1 = max(0, int(d.box[0])), max(0, int(d.box[1]))
        x2, y2 = min(w, max(x1 + 1, math.ceil(d.box[2]))), min(h, max(y1 + 1, math.ceil(d.box[3])))
        patch = alpha[y1:y2, x1:x2]
        if patch.size and patch.mean() / 255.0 >= min_visible:
            kept.append(d)
    return replace(det, detections=kept)


def _draft_to_fit(im: Image.Image, max_pixels: int, max_side: int) -> None:
    """Ask the JPEG decoder for a 1/2, 1/4 or 1/8 scale (decodes less, costs less): the smallest
    one that keeps at least ``max_side`` px on the long side, within ``max_pixels``; else the
    largest one within ``max_pixels``; nothing when even 1/8 is over ``max_pixels``."""
    w, h = im.size
    fits = [s for s in (2, 4, 8) if math.ceil(w / s) * math.ceil(h / s) <= max_pixels]
    if not fits:
        return
    good = [s for s in fits if max_side > 0 and max(math.ceil(w / s), math.ceil(h / s)) >= max_side]
    scale = max(good) if good else min(fits)
    im.draft(im.mode, (math.ceil(w / scale), math.ceil(h / scale)))


#: EXIF orientation -> the transpose that displays the image upright (as ``ImageOps.exif_transpose``).
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


#: Modes ``Image.reduce`` supports, shrunk strip by strip (no full-size temporary: reducing RGBA
#: whole makes a premultiplied full-size copy first).
_REDUCIBLE = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"}


def _shrink(im: Image.Image, max_side: int) -> Image.Image:
    """``im`` reduced by the smallest integer factor that brings its long side to ``max_side``
    or less (box filter: ``Image.reduce`` strip by strip, or a BOX resize for modes reduce
    lacks: ``1``, ``P``, ``PA``, ``I;16*``); else ``im`` itself."""
    w, h = im.size
    k = math.ceil(max(w, h) / max_side) if max_side > 0 else 1
    if k <= 1:
        return im
    if im.mode in _REDUCIBLE:
        small = Image.new(im.mode, (math.ceil(w / k), math.ceil(h / k)))
        step = k * 64
        for r0 in range(0, h, step):
            part = im.crop((0, r0, w, min(h, r0 + step))).reduce(k)
            small.paste(part, (0, r0 // k))
    else:
        small = im.resize((max(1, math.ceil(w / k)), max(1, math.ceil(h / k))), Image.Resampling.BOX)
    small.info = dict(im.info)  # P transparency and friends
    return small


def decode_image(data: bytes, max_pixels: int, min_side: int = 1, max_side: int = 0) -> LoadedImage:
    """Decode image bytes to 8-bit RGB (:func:`to_rgb8`) with EXIF orientation applied.

    The size is read from the header before any pixel is decoded and more than ``max_pixels``
    is refused, except for a JPEG, which is decoded at 1/2, 1/4 or 1/8 scale when that fits.
    An image whose long side is over ``max_side`` is then reduced by an integer factor (box
    filter) to fit. The returned ``width``/``height`` are those of the array; ``original_width``/
    ``original_height`` the true size as displayed (a prediction's pixel boxes are scaled back to
    it, so Label Studio gets its real size and the same percent coordinates).

    Args:
        data: the file's bytes.
        max_pixels: most pixels (width x height) to decode.
        min_side: smallest width or height accepted, pixels (after EXIF rotation).
        max_side: longest side kept, pixels (0 = no limit).
    Raises: ImageError for bytes that are not an image, truncated data, too many pixels or a side
        under ``min_side``. Messages never contain the bytes themselves.
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    msg = None
    try:
        with _pil_open(io.BytesIO(data)) as src:
            w, h = src.size
            if src.format == "JPEG" and (w * h > max_pixels or (max_side > 0 and max(w, h) > 2 * max_side)):
                _draft_to_fit(src, max_pixels, max_side)
            if src.size[0] * src.size[1] > max_pixels:
                raise ImageError(f"image is too large: {w}x{h} px (limit {max_pixels} px)")
            src.load()
            orientation = src.getexif().get(0x0112, 1)
            im = _shrink(src, max_side)
            if im is not src:
                src.close()  # frees the full-size pixels now, not at the end of the block
            if orientation in _ORIENT:
                im = im.transpose(_ORIENT[orientation])
            original = (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # as displayed
            arr = to_rgb8(im)
            alpha = alpha_of(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        msg = f"not a readable image ({len(data)} bytes in no format Pillow can read)"
    except (Image.DecompressionBombError, ImportError) as e:
        msg = f"not a readable image: {str(e)[:200]}"
    except MemoryError:
        msg = "image needs more memory to decode than the backend has"
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated/corrupt files
        msg = f"broken image data: {str(e)[:200]}"
    if msg is not None:
        raise ImageError(msg)
    height, width = arr.shape[:2]
    if min(width, height) < min_side:
        raise ImageError(f"image is too small: {width}x{height} px (minimum {min_side} px a side)")
    return LoadedImage(np.ascontiguousarray(arr), width, height, *original, alpha=alpha)


def check_image_file(path: Path) -> str | None:
    """Why the file at ``path`` is not a readable image, or None when it reads.

    A quick check for ``faceloop up`` before a person meets the file as a broken task in Label
    Studio: Pillow identifies the file, then decodes it completely; a JPEG at 1/8 scale (Pillow's
    ``draft``: the whole entropy-coded data is read, so a truncated file fails, at a few percent
    of a full decode). The reasons are :func:`decode_image`'s. The image's size is not limited
    here (the backend's ``max_pixels`` applies when the task is predicted).

    Returns: a reason in words, or None.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if size == 0:
        return "image is empty (0 bytes)"
    try:
        with _pil_open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except UnidentifiedImageError:
        return f"not a readable image ({size} bytes in no format Pillow can read)"
    except Image.DecompressionBombError:
        return None  # readable; the size limit is the backend's to apply
    except MemoryError:
        return "image needs more memory to decode than this machine has"
    except (OSError, ValueError, SyntaxError, EOFError, ImportError) as e:
        return f"broken image data: {str(e)[:200]}"
    return None


#: What a person can do about an image file that links out of its folder (see :func:`linked_out_images`).
LINKED_OUT_HINT = ("faceloop reads images only inside the folders it serves, so its task gets no pre-annotation "
                   "(Label Studio still shows the image); copy the file into the folder, or run `faceloop up` "
                   "on the folder it links to")


def linked_out_images(folder: Path, suffixes) -> tuple[list[tuple[str, str]], int]:
    """The image files of ``folder`` (subfolders included) that are symbolic links to a file
    outside it: Label Studio serves them (it does not resolve links), while the backend reads a
    task's local file only inside its image folder (``_read_local``: a link out of it is refused),
    so their tasks get no pre-annotation.

    Returns: ``(linked, total)``: ``linked`` lists ``(path relative to folder, the link's target)``
    in path order; ``total`` counts the image files.
    """
    root = folder.resolve()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    out = []
    for p in files:
        target = p.resolve()
        if root not in target.parents:
            out.append((str(p.relative_to(folder)), str(target)))
    return out, len(files)


def unreadable_images(folder: Path, suffixes, budget_s: float = 20.0) -> tuple[list[tuple[str, str]], int, int]:
    """The files of ``folder`` (subfolders included) with an image suffix that do not read.

    Args:
        folder: the image folder.
        suffixes: file suffixes counted as images, lower case with the dot (``lsapi.IMAGE_SUFFIXES``).
        budget_s: seconds to spend at most; files left unchecked are counted, not guessed.
    Returns: ``(bad, checked, total)``: ``bad`` lists ``(path relative to folder, reason)`` in path order.
    """
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    bad: list[tuple[str, str]] = []
    t0 = time.monotonic()
    checked = 0
    for p in files:
        if time.monotonic() - t0 > budget_s:
            break
        why = check_image_file(p)
        checked += 1
        if why is not None:
            bad.append((str(p.relative_to(folder)), why))
    return bad, checked, len(files)


# --- fetching ---------------------------------------------------------------------------------
def _safe_url(url: str) -> str:
    """``url`` for messages: no user info, query or fragment (they may hold tokens), 200 chars."""
    try:
        p = urlsplit(url)
        host = p.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{p.port}" if p.port else ""
        out = f"{p.scheme}://{host}{port}{p.path}" if p.scheme else p.path
    except ValueError:
        out = url.split("?", 1)[0].split("#", 1)[0]
    return out if len(out) <= 200 else out[:200] + "..."


def is_ls_file_path(path: str) -> bool:
    """True for Label Studio paths that serve task files (:data:`LS_FILE_PATH`); paths with
    ``.``/``..`` segments or backslashes (also percent-encoded) are never file paths."""
    if "\\" in unquote(path) or any(seg in (".", "..") for seg in unquote(path).split("/")):
        return False
    return bool(LS_FILE_PATH.match(path))


def _is_private_ip(address: str) -> bool:
    """True for a non-global address (private, loopback, link-local, reserved, multicast;
    IPv4-mapped IPv6 judged by its IPv4 address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _is_private_host(host: str) -> bool | None:
    """True when ``host`` resolves to a non-global address (private, loopback, link-local,
    reserved, multicast), False when all its addresses are global, None when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None
    return any(_is_private_ip(info[4][0]) for info in infos)


class _RefusedAddress(Exception):
    """The connection of a foreign image fetch would go to a private address (raised at connect)."""


class _PinnedBackend(httpcore.SyncBackend):
    """httpcore network backend that resolves the host once, refuses the connection when any of
    its addresses is private (:func:`_is_private_ip`), and connects to the addresses it checked.

    This closes the DNS-rebinding gap of a check-then-fetch: the address connected to is the
    one checked, not a second resolution's. TLS still gets the host name (httpcore passes the
    URL's host as ``server_hostname`` for SNI and certificate checks) and the ``Host`` header is
    the URL's. Same idea as Label Studio's ``_SsrfGuardedConnectionMixin`` (core/utils/io.py).
    """

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise httpcore.ConnectError(f"name resolution failed: {e.__class__.__name__}") from None
        if not infos or any(_is_private_ip(i[4][0]) for i in infos):
            raise _RefusedAddress(host)
        last: Exception | None = None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.settimeout(timeout)
                if local_address is not None:
                    sock.bind((local_address, 0))
                for option in socket_options or []:
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(addr)
                return httpcore._backends.sync.SyncStream(sock)
            except socket.timeout as e:
                sock.close()
                raise httpcore.ConnectTimeout(str(e)) from None
            except OSError as e:
                sock.close()
                last = e
        raise httpcore.ConnectError(str(last))


def _pinned_transport() -> httpx.HTTPTransport:
    """An ``httpx.HTTPTransport`` whose connections go through :class:`_PinnedBackend`. A client
    given a transport uses no proxy from the environment (the address connected to is the one
    checked); ``SSL_CERT_FILE``/``SSL_CERT_DIR`` still apply (``trust_env``)."""
    transport = httpx.HTTPTransport()
    transport._pool._network_backend = _PinnedBackend()  # httpx 0.28 / httpcore 1.0 layout (tested)
    return transport


def _foreign_failure(url: str) -> ImageError:
    # One message for every failure on a host that is not Label Studio: refused connection,
    # timeout, DNS failure and HTTP errors all read the same (no port scanning by error text).
    return ImageError(f"could not fetch {_safe_url(url)}: no image received (host unreachable, too slow, "
                      "or it answered an error)")


def _ls_path(url: str, settings: Settings) -> str | None:
    """The Label Studio path of an absolute URL on a configured Label Studio origin (the base's
    own path prefix removed), or None when the URL is not on Label Studio."""
    o = _origin(url)
    for b in ls_bases(settings):
        if o is not None and _origin(b) == o:
            path = urlsplit(url).path
            prefix = urlsplit(b).path.rstrip("/")
            return path[len(prefix):] if prefix and path.startswith(prefix + "/") else path
    return None


def _headers_for(url: str, settings: Settings) -> dict | None:
    """Request headers for one hop: the token for a Label Studio file URL, none for a foreign
    host; None when the URL must not be fetched at all (raises with the reason instead)."""
    path = _ls_path(url, settings)
    if path is not None:
        if not is_ls_file_path(path):
            raise ImageError(f"image URL {_safe_url(url)} is not a Label Studio file URL (/data/upload/, "
                             "/data/local-files/, storage presign): refused")
        return auth_headers(settings)
    if _origin(url) is None:
        raise ImageError(f"unsupported image URL {_safe_url(url)!r}: use /data/upload, /data/local-files or http(s)")
    if not settings.image_urls_allow_private:
        private = _is_private_host(urlsplit(url).hostname)
        if private is None:
            raise _foreign_failure(url)
        if private:
            raise ImageError(f"image URL {_safe_url(url)} points to a private or loopback address that is not "
                             "Label Studio: refused (set IMAGE_URLS_ALLOW_PRIVATE=true to allow)")
    return {}


def _http_get(url: str, settings: Settings) -> bytes:
    """Download ``url`` under the rules of the module docstring (deadline, size cap, redirects)."""
    deadline = time.monotonic() + settings.image_fetch_timeout_s
    slots = _slots("fetch", settings.max_concurrent_fetches)
    if not slots.acquire(timeout=settings.image_fetch_timeout_s):
        raise ImageError(f"too many image downloads in progress: {_safe_url(url)} waited "
                         f"{settings.image_fetch_timeout_s:g} s")
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            headers = _headers_for(url, settings)
            on_ls = bool(headers)
            try:
                result = _get_once(url, headers, settings, deadline)
            except ImageError:
                raise
            except (httpx.HTTPError, OSError, ValueError):
                result = None
            if result is None:
                if on_ls:
                    raise ImageError(f"could not reach Label Studio for {_safe_url(url)}")
                raise _foreign_failure(url)
            status, body, location = result
            if location is not None:
                url = urljoin(url, location)
                continue
            if status != 200:
                if on_ls:
                    raise ImageError(f"Label Studio answered HTTP {status} for {_safe_url(url)}")
                raise _foreign_failure(url)
            return body
        raise ImageError(f"more than {MAX_REDIRECTS} redirects for {_safe_url(url)}")
    finally:
        slots.release()


def _get_once(url: str, headers: dict, settings: Settings, deadline: float):
    """One GET without following redirects: ``(status, body, redirect location or None)``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timeout(url, settings, bool(headers))
    step = min(5.0, remaining)
    timeout = httpx.Timeout(step, connect=step, read=step, write=step, pool=step)
    # a foreign host with private addresses refused: connect to the address checked (no rebinding)
    transport = _pinned_transport() if not headers and not settings.image_urls_allow_private else None
    try:
        return _stream_get(url, headers, settings, deadline, timeout, transport)
    except _RefusedAddress:
        raise ImageError(f"image URL {_safe_url(url)} points to a private or loopback address that is not "
                         "Label Studio: refused (set IMAGE_URLS_ALLOW_PRIVATE=true to allow)") from None


def _stream_get(url, headers, settings, deadline, timeout, transport):
    with httpx.Client(timeout=timeout, follow_redirects=False, transport=transport) as c:
        with c.stream("GET", url, headers=headers) as r:
            if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("location"):
                return r.status_code, b"", r.headers["location"]
            if r.status_code != 200:
                return r.status_code, b"", None
            length = r.headers.get("content-length")
            if length and length.isdigit() and int(length) > settings.max_image_bytes:
                raise ImageError(f"image at {_safe_url(url)} is larger than {settings.max_image_bytes} bytes")
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf.extend(chunk)
                if len(buf) > settings.max_image_bytes:
                    raise ImageError(f"image at {_safe_url(url)} is larger than {settings.max_image_bytes} bytes")
                if time.monotonic() > deadline:
                    raise _timeout(url, settings, bool(headers))
            return 200, bytes(buf), None


def _timeout(url: str, settings: Settings, on_ls: bool) -> ImageError:
    if on_ls:
        return ImageError(f"downloading {_safe_url(url)} from Label Studio took over "
                          f"{settings.image_fetch_timeout_s:g} s")
    return _foreign_failure(url)


def _read_local(rel: str, settings: Settings) -> bytes:
    """Read ``rel`` (the already URL-decoded ``?d=`` value, as Label Studio decodes it: once)."""
    # The file, symlinks resolved, must lie under the root, or under the target of a symlink
    # to a folder directly in the root: `faceloop up` serves each image folder through such a link
    # (root/<name>-<hash> -> the folder; backend.cli._media_link). A link deeper down that points
    # out of its folder is refused.
    base = Path(settings.local_files_document_root)
    root = base.resolve()
    rel_n = os.path.normpath(rel.lstrip("/"))
    if rel_n == ".." or rel_n.startswith("../"):
        raise ImageError(f"local file {rel!r} is outside LOCAL_FILES_DOCUMENT_ROOT")
    parts = Path(rel_n).parts if rel_n != "." else ()
    if len(parts) > 1 and (base / parts[0]).is_symlink() and (base / parts[0]).is_dir():
        root = (base / parts[0]).resolve()
        parts = parts[1:]
    p = root.joinpath(*parts).resolve()
    if root not in p.parents and p != root:
        if parts and os.path.islink(root.joinpath(*parts)):
            raise ImageError(f"local file {rel!r} is a link to a file outside its image folder ({p.parent}): "
                             f"{LINKED_OUT_HINT}")
        raise ImageError(f"local file {rel!r} is outside LOCAL_FILES_DOCUMENT_ROOT")
    if not p.is_file():
        raise ImageError(f"local file not found: {p}")
    if p.stat().st_size > settings.max_image_bytes:
        raise ImageError(f"image file is too large: {p.stat().st_size} bytes")
    return p.read_bytes()


def fetch_image_bytes(url: str, settings: Settings, ls_url: str | None = None) -> bytes:
    """Bytes of a task's image URL (see module docstring for the kinds and the rules).

    Args:
        url: the value of ``task["data"][value_key]``.
        ls_url: Label Studio base URL to prefer for relative URLs; used only when it is
            ``LABEL_STUDIO_URL`` or one of ``LABEL_STUDIO_URL_ALIASES`` (else ignored).
    Raises: ImageError for an unsupported, refused or failing URL.
    """
    if not isinstance(url, str) or not url.strip():
        shown = url if url is None or isinstance(url, (int, float, str)) else type(url).__name__
        raise ImageError(f"task has no image URL (got {shown!r})")
    url = url.strip()
    if len(url) > 8192:
        raise ImageError(f"image URL is too long ({len(url)} characters)")
    try:
        parsed = urlsplit(url)
    except ValueError:
        raise ImageError(f"unsupported image URL {_safe_url(url)!r}: not a valid URL") from None
    if not parsed.scheme and not parsed.netloc and url.startswith("/"):
        if not is_ls_file_path(parsed.path):
            raise ImageError(f"image URL {_safe_url(url)!r} is not a Label Studio file URL (/data/upload/, "
                             "/data/local-files/, storage presign): refused")
        if (parsed.path.rstrip("/") == "/data/local-files" and settings.local_files_document_root
                and Path(settings.local_files_document_root).is_dir()):  # else (another machine): through LS
            d = parse_qs(parsed.query).get("d", [""])[0]
            return _read_local(d, settings)
        base = ls_base(settings, ls_url)
        return _http_get(base + url, settings)
    if parsed.scheme in ("http", "https"):
        return _http_get(url, settings)
    raise ImageError(f"unsupported image URL {_safe_url(url)!r}: use /data/upload, /data/local-files or http(s)")


def load_image(url: str, settings: Settings, ls_url: str | None = None) -> LoadedImage:
    """Fetch and decode a task image (decodes bounded by ``MAX_CONCURRENT_DECODES``).

    Raises: ImageError with a message for the user.
    """
    data = fetch_image_bytes(url, settings, ls_url)
    with _slots("decode", settings.max_concurrent_decodes):
        img = None
        try:
            img = decode_image(data, settings.max_image_pixels, settings.min_image_side, settings.max_image_side)
            return img
        finally:
            # a large decode (or a failed one): hand its freed full-size pixels back to the OS.
            # Not after every photo: malloc_trim costs ~0.9 ms of CPU a call (benchmarks, run 5)
            if img is None or img.original_width * img.original_height > TRIM_AFTER_PIXELS:
                _release_freed_memory()


#: decodes of more pixels than this (about 12 MB of RGB) are followed by ``malloc_trim``
TRIM_AFTER_PIXELS = 4_000_000


def _release_freed_memory() -> None:
    """``malloc_trim(0)`` (glibc): give freed heap memory back to the OS.

    Decodes run in several threads, so glibc keeps each thread's freed full-size pixels in that
    thread's arena; without this, four 40 MP decodes in a row kept ~550 MB resident instead of
    ~175 MB (tests/security/test_bombs.py). A no-op where glibc is absent.
    """
    global _trim
    if _trim is None:
        try:
            import ctypes

            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None
