"""Earlier shipped versions of the label configs in ``label_config/``.

``faceloop up`` finds a folder's project by the folder and the SHA-256 of its label config file
(``stack.json``'s ``projects`` entries), so a change to a shipped XML (e.g. the class buttons moved
above the image) would otherwise open a *new* project on the next ``up`` and leave the person's
labels in the old one. ``label_config/earlier_versions.json`` lists, per shipped file, the SHA-256
of each version it shipped before (with the commit); :func:`earlier_entry` finds a project made
with one of them and :func:`same_tags` says whether Label Studio can take the new XML in its place
(same control and object tags, same classes in the same order: Label Studio 1.23.2 checks a new
label config against the project's annotations, and faceloop's class indices follow the order).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from backend.config import LABEL_CONFIG_DIR

EARLIER_VERSIONS = LABEL_CONFIG_DIR / "earlier_versions.json"


def config_sha256(xml: str) -> str:
    """Hex SHA-256 of a label config's text (UTF-8), as ``stack.json`` stores it."""
    return hashlib.sha256(xml.encode()).hexdigest()


@lru_cache(maxsize=1)
def _earlier() -> dict[str, dict[str, str]]:
    data = json.loads(EARLIER_VERSIONS.read_text()) if EARLIER_VERSIONS.exists() else {}
    return {k: v for k, v in data.items() if not k.startswith("_")}


def shipped_name(xml_path: Path) -> str | None:
    """The file name of ``xml_path`` when it is one of the shipped configs (a file in
    ``label_config/``, by its resolved path), else None (a person's own file)."""
    p = Path(xml_path).resolve()
    return p.name if p.parent == LABEL_CONFIG_DIR.resolve() and p.suffix == ".xml" else None


def earlier_sha256s(name: str) -> set[str]:
    """SHA-256s of the earlier shipped versions of ``label_config/<name>`` (empty if none)."""
    return set(_earlier().get(name, {}))


def is_earlier_version(name: str, stored: str) -> bool:
    """True when ``stored``, a label config as Label Studio keeps it, is an earlier shipped
    version of ``label_config/<name>``. Label Studio 1.23.2 stores a label config stripped of
    leading and trailing whitespace (its serializer's ``CharField``, DRF ``trim_whitespace``); a
    shipped file is its stripped text plus one newline (tests/test_config_versions.py checks it)."""
    text = stored.strip()
    return bool({config_sha256(text), config_sha256(text + "\n")} & earlier_sha256s(name))


def earlier_entry(projects: list[dict], folder: str, xml_path: Path) -> dict | None:
    """The newest ``stack.json`` project entry of ``folder`` made with an earlier shipped version
    of ``xml_path`` (None when ``xml_path`` is not a shipped config or there is none)."""
    name = shipped_name(xml_path)
    old = earlier_sha256s(name) if name else set()
    return next((p for p in reversed(projects) if p.get("folder") == folder and p.get("config_sha256") in old),
                None)


def tag_signature(xml: str) -> tuple:
    """What a label config's annotations depend on, read with the SDK's ``LabelInterface``:
    ``((control tag, name, to_name, classes in order), ...), ((object tag, name, value), ...)``.
    Layout, headers, colours, hotkeys and thresholds are left out.

    Raises: whatever ``LabelInterface`` raises on XML it cannot parse.
    """
    from label_studio_sdk.label_interface import LabelInterface

    li = LabelInterface(xml)
    controls = sorted((c.tag, c.name, tuple(c.to_name or ()), tuple(c.labels or ())) for c in li.controls)
    objects = sorted((o.tag, o.name, o.value) for o in li.objects)
    return tuple(controls), tuple(objects)


def same_tags(a: str, b: str) -> bool:
    """True when label configs ``a`` and ``b`` have the same tags and classes (:func:`tag_signature`);
    False also when either cannot be parsed."""
    try:
        return tag_signature(a) == tag_signature(b)
    except Exception:  # noqa: BLE001 - an unparsable config is not "the same"
        return False
