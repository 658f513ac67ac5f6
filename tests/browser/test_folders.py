"""Several image folders on one stack, and a second stack beside it, as a person runs them.

``faceloop up`` as a subprocess on real folders, real Label Studio 1.23.2 (free ports):

1. ``up FOLDER_A`` (the README's first command, here on a copy of awake/sleep images), then
   ``up FOLDER_B --config face_expressions`` (another folder, elsewhere on disk) on the same stack:
   accepted; both projects' images are served by Label Studio (``/data/local-files/?d=`` through
   the stack's ``media/`` links) and load in Chromium (``naturalWidth > 0``).
2. ``up FOLDER_B --config face_expressions --root R2``: a separate stack with its own state
   (``R2/var``: database, models); the first stack's database is untouched.
3. The same stack R2 told to use the first stack's database (``VAR_DIR`` set explicitly): its
   project 1 is another Label Studio's project 1 there, so ``up`` refuses (exit 1) and project 1 of
   the first stack keeps its title and labels.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from tests.browser.test_person import CHROMIUM, Up, _free_port, _login
from tests.conftest import REPO, require_data

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
EXPRESSIONS = REPO.parent / "shared" / "data" / "expressions"


def _up(args: list[str], env_extra: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """``faceloop up ... --exit-after-setup`` (the services stop once the project is ready)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="250", **env_extra)
    for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "CELERY_BROKER_URL", "DATABASE_URL", "VAR_DIR"):
        env.pop(k, None)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "backend.cli", "up", *args, "--exit-after-setup"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _ports() -> list[str]:
    return ["--ls-port", str(_free_port()), "--backend-port", str(_free_port()), "--redis-port", str(_free_port())]


def _copy(src: Path, dest: Path, n: int) -> Path:
    dest.mkdir(parents=True)
    for p in sorted(src.glob("*.jpg"))[:n]:
        shutil.copyfile(p, dest / p.name)
    return dest


def _project_row(db: Path, pid: int) -> tuple:
    with sqlite3.connect(db) as c:
        return c.execute("select title, labels_json, ls_instance from project where id=?", (pid,)).fetchone()


def test_folders_on_one_stack_and_a_second_stack(tmp_path):
    from label_studio_sdk import LabelStudio

    require_data()
    require_data(EXPRESSIONS)
    folder_a = _copy(REPO.parent / "shared" / "data" / "awake_sleep" / "images" / "val", tmp_path / "mine" / "faces a", 3)
    folder_b = _copy(EXPRESSIONS / "images" / "val", tmp_path / "elsewhere" / "expr", 3)
    var = tmp_path / "var"
    good = (folder_a / min(os.listdir(folder_a))).read_bytes()
    (folder_a / "zz cut.jpg").write_bytes(good[: len(good) // 2])  # a copy that stopped half way
    # a link to an image elsewhere (a new user's folder of links): Label Studio shows it, faceloop
    # cannot pre-annotate it, and `up` says so with what to do
    outside = _copy(REPO.parent / "shared" / "data" / "awake_sleep" / "images" / "val", tmp_path / "originals", 4)
    (folder_a / "zz linked.jpg").symlink_to(outside / max(os.listdir(outside)))

    # --- 1. two folders, one stack --------------------------------------------------------------
    r = _up([str(folder_a), *_ports()], {"VAR_DIR": str(var)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the cut file is a task like the others, and `up` names it before the person meets it
    assert "1 of the 5 image files are not readable images" in r.stdout, r.stdout[-3000:]
    flat_out = " ".join(r.stdout.split())
    assert "1 of the 5 image files are links to files outside" in flat_out, r.stdout[-3000:]
    assert "copy the file into the folder" in flat_out and "zz linked.jpg ->" in flat_out, r.stdout[-3000:]
    assert re.search(r"^  zz cut\.jpg: broken image data: .*truncated", r.stdout, re.MULTILINE), r.stdout[-3000:]
    pid_a = int(re.search(r"UP [\d.]+ s project=(\d+)", r.stdout).group(1))
    # how retraining starts: the button, or the switch that retrains every RETRAIN_MIN_ANNOTATIONS labels
    # (a new user labelled 10 tasks and waited for a retrain the switch was off for)
    flat = " ".join(r.stdout.split())
    assert "Start Training" in flat and "'Start model training on annotation submission'" in flat, r.stdout[-3000:]
    ports = {"ls": _free_port(), "backend": _free_port(), "redis": _free_port()}
    up = Up(folder_b, var, ports, tmp_path / "up_b.log")
    # Up starts `up FOLDER`; the second folder needs --config face_expressions: run it by hand
    env = dict(os.environ, VAR_DIR=str(var), PYTHONPATH=str(REPO))
    for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "CELERY_BROKER_URL", "DATABASE_URL"):
        env.pop(k, None)
    log = tmp_path / "up_b.log"
    with open(log, "ab") as f:
        up.proc = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "up", str(folder_b), "--config", "face_expressions",
             "--ls-port", str(ports["ls"]), "--backend-port", str(ports["backend"]), "--redis-port",
             str(ports["redis"])], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        m = None
        while time.time() < deadline and m is None:
            text = log.read_text(errors="replace")
            m = re.search(r"UP [\d.]+ s project=(\d+) ls=(\S+)", text)
            if m is None:
                assert up.proc.poll() is None, f"faceloop up exited with {up.proc.returncode}:\n{text[-3000:]}"
                time.sleep(1)
        assert m, log.read_text()[-3000:]
        pid_b, ls_url = int(m.group(1)), m.group(2)
        assert pid_b != pid_a
        root = var / "stack"
        state = json.loads((root / "stack.json").read_text())
        assert state["document_root"] == str(root / "media")  # faceloop's folder, not the user's
        links = sorted(p for p in (root / "media").iterdir())
        assert len(links) == 2 and all(p.is_symlink() for p in links)
        assert {p.resolve() for p in links} == {folder_a, folder_b}
        client = LabelStudio(base_url=ls_url, api_key=(root / "label-studio" / "faceloop-pat.txt").read_text().strip())
        auth = {"Authorization": client._client_wrapper.get_headers()["Authorization"]}  # as lsapi does
        urls = {}
        for pid, folder in ((pid_a, folder_a), (pid_b, folder_b)):
            tasks = list(client.tasks.list(project=pid))
            assert len(tasks) == (5 if pid == pid_a else 3)
            for t in tasks:  # every image of both projects is served by Label Studio, bytes as on disk
                rel = unquote(t.data["image"].split("?d=", 1)[1])
                resp = httpx.get(ls_url + t.data["image"], headers=auth,
                                 timeout=30)
                assert resp.status_code == 200, (pid, t.data["image"], resp.status_code)
                assert resp.content == (folder / Path(rel).name).read_bytes()
            urls[pid] = next(t.id for t in tasks if "zz" not in unquote(t.data["image"]))

        if CHROMIUM.exists():  # as the person sees it: a task of each project, its image loaded
            sync_api = pytest.importorskip("playwright.sync_api")
            secrets = json.loads((root / "secrets.json").read_text())
            with sync_api.sync_playwright() as p:
                b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                      args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                try:
                    page = b.new_page(viewport={"width": 1400, "height": 900})
                    _login(page, ls_url, secrets["ls_user"], secrets["ls_password"])
                    for pid, tid in urls.items():
                        page.goto(f"{ls_url}/projects/{pid}/data?task={tid}")
                        page.wait_for_function("""() => Array.from(document.querySelectorAll('img'))
                            .some(i => i.getBoundingClientRect().width > 200 && i.complete && i.naturalWidth > 0)""",
                                               timeout=120_000)
                finally:
                    b.close()
    finally:
        up.stop()
    row_a = _project_row(var / "faceloop.db", pid_a)
    assert "awake" in row_a[1] and row_a[2], row_a  # awake/sleep labels, claimed by this stack's instance

    # --- 2. a second stack: its own state -------------------------------------------------------
    r2 = tmp_path / "second stack"
    r = _up([str(folder_b), "--config", "face_expressions", "--root", str(r2), *_ports()], {})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"state         {r2 / 'var'}" in r.stdout
    pid_2 = int(re.search(r"UP [\d.]+ s project=(\d+)", r.stdout).group(1))
    assert pid_2 == pid_a  # Label Studio numbers each instance's projects from 1: the same id
    row_2 = _project_row(r2 / "var" / "faceloop.db", pid_2)
    assert "happy" in row_2[1], row_2  # face_expressions' labels
    assert row_2[2] and row_2[2] != row_a[2]  # another Label Studio instance
    assert _project_row(var / "faceloop.db", pid_a) == row_a  # the first stack's row untouched

    # --- 3. the second stack on the first one's database: refused, nothing mixed ----------------
    r = _up([str(folder_b), "--config", "face_expressions", "--root", str(r2), *_ports()], {"VAR_DIR": str(var)})
    out = " ".join((r.stdout + r.stderr).replace("│", " ").split())
    assert r.returncode == 1, out[-3000:]
    assert "belongs to another Label Studio" in out and "--root DIR" in out, out[-3000:]
    assert "Traceback" not in out
    assert _project_row(var / "faceloop.db", pid_a) == row_a
