"""Shipped label configs change without leaving a person's project behind.

``faceloop up`` finds a folder's project by the folder and its label config file's SHA-256, so a
changed shipped XML (the class buttons moved above the image) would make a new project on the
next ``up`` and leave the labels in the old one. ``label_config/earlier_versions.json`` lists the
earlier shipped versions; ``up`` reopens a project made with one of them and updates its label
config in Label Studio (``backend.cli._reopen_earlier_version``).

The unit tests check the list against git and the configs' layout; the e2e test runs the real
``faceloop up`` (subprocess, real Label Studio 1.23.2, Redis, backend and worker on free
127.0.0.1 ports) on a project made with the earlier awake/sleep config and holding an annotation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend import config_versions as cv
from backend.config import LABEL_CONFIG_DIR
from tests.conftest import REPO
from tests.helpers_unit import jpeg_bytes, rect_region

SHIPPED = sorted(LABEL_CONFIG_DIR.glob("*.xml"))
#: label_config/awake_sleep.xml as shipped up to commit 1f235c9 (the image above the classes).
AWAKE_SLEEP_BEFORE = """<View>
  <Header value="One box per face: awake, or sleep (eyes closed, drowsy, yawning). Grey boxes are faces the model found without a class: select each and pick one."/>
  <Image name="image" value="$image" zoom="true" zoomControl="true" rotateControl="false"/>
  <RectangleLabels name="face" toName="image" model_score_threshold="0.25" strokeWidth="2">
    <Label value="awake" background="#4caf50" hotkey="1"/>
    <Label value="sleep" background="#3f51b5" hotkey="2"/>
  </RectangleLabels>
</View>
"""


def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    return r.stdout if r.returncode == 0 else None


def test_every_shipped_config_puts_its_classes_above_the_image():
    """In document order the control tags come before the ``Image`` they label, so Label Studio
    draws the class buttons above it (tests/browser/test_class_buttons_on_screen.py checks the
    screen)."""
    for p in SHIPPED:
        xml = p.read_text()
        assert xml == xml.strip() + "\n", f"{p.name}: one newline at the end (config_versions.is_earlier_version)"
        image = xml.index("<Image")
        for tag in ("<RectangleLabels", "<Choices"):
            if tag in xml:
                assert xml.index(tag) < image, f"{p.name}: {tag[1:]} below the Image"


def test_earlier_versions_are_listed_with_the_same_tags():
    """Each listed SHA-256 is an earlier version of that file (from its commit, when git is there),
    not the current one, and has the current file's tags and classes."""
    data = json.loads(cv.EARLIER_VERSIONS.read_text())
    names = {p.name for p in SHIPPED}
    assert {k for k in data if not k.startswith("_")} <= names
    for name, versions in data.items():
        if name.startswith("_"):
            continue
        current = (LABEL_CONFIG_DIR / name).read_text()
        assert cv.config_sha256(current) not in versions, f"{name}: the current version is listed as earlier"
        for sha, commit in versions.items():
            old = _git("show", f"{commit}:label_config/{name}")
            if old is None:
                continue  # no git history here (an installed copy): the list is taken as it is
            assert cv.config_sha256(old) == sha, f"{name} at {commit}"
            assert cv.is_earlier_version(name, old.strip()), f"{name} at {commit}: as Label Studio keeps it"
            assert cv.same_tags(old, current), f"{name} at {commit}: other tags or classes than now"
    assert cv.config_sha256(AWAKE_SLEEP_BEFORE) in cv.earlier_sha256s("awake_sleep.xml")


def test_every_earlier_version_in_git_is_listed():
    """Editing a shipped XML without listing the version it replaces would leave every user's
    project behind on their next ``up``: every version git has of each shipped file is either the
    current one or listed (or has other tags, and then a new project is right)."""
    if _git("rev-parse", "--git-dir") is None:
        pytest.skip("not a git checkout")
    for p in SHIPPED:
        current = p.read_text()
        listed = cv.earlier_sha256s(p.name)
        for commit in (_git("log", "--format=%H", "--", f"label_config/{p.name}") or "").split():
            old = _git("show", f"{commit}:label_config/{p.name}")
            if old is None or cv.config_sha256(old) == cv.config_sha256(current) or not cv.same_tags(old, current):
                continue
            assert cv.config_sha256(old) in listed, \
                f"{p.name} at {commit[:7]}: add {cv.config_sha256(old)} to {cv.EARLIER_VERSIONS.name}"


def test_earlier_entry_only_for_a_shipped_file_and_its_folder(tmp_path):
    old = cv.config_sha256(AWAKE_SLEEP_BEFORE)
    projects = [{"id": 1, "folder": "/a", "config_sha256": old}, {"id": 2, "folder": "/b", "config_sha256": old},
                {"id": 3, "folder": "/a", "config_sha256": "f" * 64}]
    shipped = LABEL_CONFIG_DIR / "awake_sleep.xml"
    assert cv.earlier_entry(projects, "/a", shipped)["id"] == 1
    assert cv.earlier_entry(projects, "/c", shipped) is None
    assert cv.earlier_entry(projects, "/a", LABEL_CONFIG_DIR / "face_expressions.xml") is None
    own = tmp_path / "awake_sleep.xml"  # a person's own copy: today's rule (folder + its SHA-256)
    shutil.copyfile(shipped, own)
    assert cv.shipped_name(own) is None and cv.earlier_entry(projects, "/a", own) is None


def test_same_tags_ignores_layout_but_not_classes():
    now = (LABEL_CONFIG_DIR / "awake_sleep.xml").read_text()
    assert cv.same_tags(AWAKE_SLEEP_BEFORE, now)
    assert not cv.same_tags(AWAKE_SLEEP_BEFORE, now.replace('"sleep"', '"asleep"'))
    swapped = AWAKE_SLEEP_BEFORE.replace('value="awake"', 'value="X"').replace('value="sleep"', 'value="awake"')
    assert not cv.same_tags(AWAKE_SLEEP_BEFORE, swapped.replace('value="X"', 'value="sleep"'))  # class order
    assert not cv.same_tags(now, "<View><oops")


# --- e2e: the real `faceloop up` ---------------------------------------------------------------
def _start_up(args: list[str], var: Path, log: Path, timeout: float = 600) -> tuple[subprocess.Popen, dict]:
    """``faceloop up ARGS`` as a subprocess on free ports; waits for its ``UP`` line."""
    from backend.stack import free_port

    env = dict(os.environ, VAR_DIR=str(var), PYTHONPATH=str(REPO), COLUMNS="250", OMP_NUM_THREADS="1")
    for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "CELERY_BROKER_URL", "DATABASE_URL"):
        env.pop(k, None)
    ports = ["--ls-port", str(free_port()), "--backend-port", str(free_port()), "--redis-port", str(free_port())]
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "up", *args, *ports], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text(errors="replace")[start:]
        m = re.search(r"UP [\d.]+ s project=(\d+) ls=(\S+)", text)
        if m:
            return proc, {"project": int(m.group(1)), "ls_url": m.group(2), "out": text}
        if proc.poll() is not None:
            raise AssertionError(f"faceloop up exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(1)
    _stop(proc)
    raise AssertionError(f"faceloop up not ready within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a person stops ``up``; killed after 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.e2e
def test_up_reopens_a_project_of_the_earlier_default_config_and_updates_it(tmp_path, capsys):
    from label_studio_sdk import LabelStudio

    folder = tmp_path / "faces"
    folder.mkdir()
    for k in range(2):
        (folder / f"face{k}.jpg").write_bytes(jpeg_bytes(320, 240, color=(60 + 80 * k, 120, 160)))
    old_xml = tmp_path / "awake_sleep.xml"  # what `up` read from label_config/ before this change
    old_xml.write_text(AWAKE_SLEEP_BEFORE)
    var = tmp_path / "var"
    log = tmp_path / "up.log"
    root = var / "stack"

    proc, first = _start_up([str(folder), "--config", str(old_xml)], var, log)
    try:
        pid = first["project"]
        client = LabelStudio(base_url=first["ls_url"],
                            api_key=(root / "label-studio" / "faceloop-pat.txt").read_text().strip())
        assert client.projects.get(id=pid).label_config == AWAKE_SLEEP_BEFORE.strip()  # as LS keeps it
        tids = sorted(int(t.id) for t in client.tasks.list(project=pid))
        assert len(tids) == 2
        client.annotations.create(id=tids[0], result=[rect_region(10, 20, 30, 40, "sleep", original_width=320,
                                                                  original_height=240)])
    finally:
        _stop(proc)
    entry = json.loads((root / "stack.json").read_text())["projects"]
    assert [e["config_sha256"] for e in entry] == [cv.config_sha256(AWAKE_SLEEP_BEFORE)]

    proc, second = _start_up([str(folder)], var, log)  # the default config, now its new version
    try:
        assert second["project"] == pid, second["out"][-3000:]
        assert f"project {pid}: label config updated to the current label_config/awake_sleep.xml" in second["out"]
        client = LabelStudio(base_url=second["ls_url"],
                            api_key=(root / "label-studio" / "faceloop-pat.txt").read_text().strip())
        new_xml = (LABEL_CONFIG_DIR / "awake_sleep.xml").read_text()
        assert client.projects.get(id=pid).label_config == new_xml.strip()
        assert sorted(int(t.id) for t in client.tasks.list(project=pid)) == tids
        (ann,) = client.tasks.get(id=tids[0]).annotations
        assert [r["value"]["rectanglelabels"] for r in ann["result"]] == [["sleep"]]
        assert [int(p.id) for p in client.projects.list()] == [pid], "no second project"
        _person_edited_and_gone(client, new_xml, capsys)
    finally:
        _stop(proc)
    (entry,) = json.loads((root / "stack.json").read_text())["projects"]
    assert entry["id"] == pid and entry["config_sha256"] == cv.config_sha256(new_xml)
    assert entry["config"] == str(LABEL_CONFIG_DIR / "awake_sleep.xml")


def _person_edited_and_gone(client, new_xml: str, capsys) -> None:
    """``_reopen_earlier_version`` on the same Label Studio: a project of an earlier shipped config
    whose label config a person changed in Label Studio is reopened with that config left as it is;
    an entry whose project is gone gives None (``up`` then makes a new one) and leaves the list."""
    from backend.cli import _reopen_earlier_version

    shipped = LABEL_CONFIG_DIR / "awake_sleep.xml"
    old_sha = cv.config_sha256(AWAKE_SLEEP_BEFORE)
    edited_xml = AWAKE_SLEEP_BEFORE.replace("One box per face", "Box every face")
    edited = int(client.projects.create(title="edited by a person", label_config=edited_xml).id)
    projects = [{"id": edited, "folder": "/b", "config_sha256": old_sha},
                {"id": 99999, "folder": "/c", "config_sha256": old_sha}]
    capsys.readouterr()
    entry = _reopen_earlier_version(client, projects, Path("/b"), new_xml, shipped)
    assert entry is projects[0] and entry["config_sha256"] == cv.config_sha256(new_xml)
    assert client.projects.get(id=edited).label_config == edited_xml.strip()
    assert f"project {edited}: reopened; its label config was changed in Label Studio" in capsys.readouterr().out
    assert _reopen_earlier_version(client, projects, Path("/c"), new_xml, shipped) is None
    assert [e["id"] for e in projects] == [edited] and "is gone" in capsys.readouterr().out
