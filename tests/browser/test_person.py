"""A person's main job in a real browser: ``faceloop up FOLDER``, label, Start Training, restart.

Runs the real stack as a person starts it (``faceloop up`` as a subprocess, on free ports) on a
folder of images from ``../shared/data/awake_sleep`` copied into a temporary folder with a nested
subfolder and file names with a space and non-ASCII characters. Debian's ``chromium`` driven by
Playwright (never ``playwright install``) then:

1. logs in with the form; opens a task of the project; the image has loaded (``naturalWidth > 0``),
   every thumbnail of the folder too, and the pre-label regions are listed;
2. accepts one pre-label per task (click the region, press the class hotkey, remove the other
   boxes with Backspace, Submit) on a few tasks, with the class of the dataset's ground truth;
3. presses *Start Training* in Settings -> Model (the ML backend card's menu), waits for the new
   model version, reopens an unlabelled task and sees the new version's prediction;
   While the job runs, the person opens the status page from the project as a person would
   (the Data Manager keeps Label Studio's Default tab next to the Review queue; *Label All
   Tasks* shows the project's instructions; click the status link in them) and watches it: the
   running job's stage and epoch k of n with the time left, then the finished job and the new
   version with its gate decision and reason. On the new version's pre-labels the person
   accepts one box as it is and deletes another; the status page counts them for that version;
4. stops ``faceloop up`` (SIGINT), starts it again: same project, same tasks, the backend shows
   "Connected".

Screenshots of every step go to ``$FACELOOP_BROWSER_OUT`` (default: a pytest temp folder; the
path is printed). ``docs/img/`` holds copies of some of them.
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
from urllib.parse import unquote

import pytest

from tests.conftest import REPO, require_data

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
#: Small training so the test stays within minutes on 2 shared cores.
TRAIN_ENV = {"DETECTOR_EPOCHS": "10", "CLASSIFIER_EPOCHS": "30", "IMGSZ": "256", "TRAIN_BATCH": "2", "QUERY_BATCH_SIZE": "3",
             "RETRAIN_MIN_ANNOTATIONS": "2", "OMP_NUM_THREADS": "1"}
N_IMAGES = 14  # 8 labelled, 2 for the acceptance counts, 2 for the retrain on annotations, 2 spare
N_LABEL = 8  # tasks labelled in the browser before Start Training (>= 2 for a train/val split)


def _free_port() -> int:
    from backend.stack import free_port

    return free_port()


class Up:
    """``faceloop up`` as a subprocess; its output goes to ``log``."""

    def __init__(self, folder: Path, var_dir: Path, ports: dict, log: Path):
        self.folder, self.var_dir, self.ports, self.log = folder, var_dir, ports, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> dict:
        env = dict(os.environ, VAR_DIR=str(self.var_dir), PYTHONPATH=str(REPO), **TRAIN_ENV)
        for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "CELERY_BROKER_URL", "DATABASE_URL"):
            env.pop(k, None)
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backend.cli", "up", str(self.folder), "--ls-port", str(self.ports["ls"]),
                 "--backend-port", str(self.ports["backend"]), "--redis-port", str(self.ports["redis"])],
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.log.read_text(errors="replace")[start:]
            m = re.search(r"UP ([\d.]+) s project=(\d+) ls=(\S+)", text)
            if m:
                return {"seconds": float(m.group(1)), "project": int(m.group(2)), "ls_url": m.group(3), "out": text}
            if self.proc.poll() is not None:
                raise AssertionError(f"faceloop up exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(1)
        self.stop()
        raise AssertionError(f"faceloop up not ready within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 60, sig=signal.SIGINT) -> float:
        """Ctrl-C (SIGINT), as a person stops it; returns the seconds it took to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.time()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("faceloop up did not stop on Ctrl-C")
        return time.time() - t0


def _cli(var_dir: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, VAR_DIR=str(var_dir), PYTHONPATH=str(REPO), COLUMNS="250")  # no truncated tables
    for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "CELERY_BROKER_URL", "DATABASE_URL"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A person's folder: 12 awake/sleep images, 4 of them in a nested folder with a space in its
    name, one file with a space and non-ASCII characters. Returns ``(folder, {file name: class})``."""
    data = require_data()
    import yaml

    names = yaml.safe_load((data / "data.yaml").read_text())["names"]
    src = sorted((data / "images" / "val").glob("*.jpg"))
    by_class: dict[str, list[Path]] = {}
    for p in src:
        lines = (data / "labels" / "val" / f"{p.stem}.txt").read_text().split()
        if lines:
            by_class.setdefault(names[int(lines[0])], []).append(p)
    picks = [p for pair in zip(by_class["awake"], by_class["sleep"]) for p in pair][:N_IMAGES]
    folder = tmp_path_factory.mktemp("person") / "my faces"
    (folder / "day 2").mkdir(parents=True)
    truth = {}
    for i, p in enumerate(picks):
        name = {0: "café – Zoë 1.jpg"}.get(i, p.name)
        dest = folder / "day 2" / name if i % 3 == 0 else folder / name
        shutil.copyfile(p, dest)
        rows = [line.split() for line in (data / "labels" / "val" / f"{p.stem}.txt").read_text().splitlines() if line]
        boxes = [((float(cx) - float(w) / 2) * 100, (float(cy) - float(h) / 2) * 100, float(w) * 100, float(h) * 100)
                 for _, cx, cy, w, h in rows]
        truth[dest.name] = (names[int(rows[0][0])], boxes)
    return folder, truth


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = Path(os.environ.get("FACELOOP_BROWSER_OUT") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser test screenshots: {out}")
    return out


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/bootstrap.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip playwright missing (scripts/bootstrap.sh)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _login(page, ls_url: str, user: str, password: str):
    page.goto(ls_url + "/user/login/")
    page.fill("input[name=email]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
    page.wait_for_load_state("networkidle")


def _iou(a, b) -> float:
    """IoU of two (x, y, w, h) boxes (same units)."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter) if inter else 0.0


def _accept_box(page, ls_url: str, pid: int, tid: int, index: int, cls: str, hotkey: str, shot=None):
    """As a person: open the task, click the face's box in the regions list, press the class's
    hotkey, remove the other boxes (click, Backspace), Submit; waits until Label Studio has it."""
    _open_task(page, ls_url, pid, tid)
    page.locator(".lsf-outliner-item").nth(index).click()
    page.keyboard.press(hotkey)
    page.wait_for_timeout(300)
    if shot:
        shot(page, "prelabel_accepted_with_class")
    for _ in range(20):  # the other boxes are not this face: remove them
        others = page.locator(".lsf-outliner-item").filter(has_not_text=cls)
        if not others.count():
            break
        others.first.click()
        page.keyboard.press("Backspace")
        page.wait_for_timeout(200)
    _submit(page, tid)
    if shot:
        shot(page, "submitted")


def _main_image(page) -> dict:
    """The image the person sees in the labelling area (the largest one on screen)."""
    return page.evaluate("""() => {
        const imgs = Array.from(document.querySelectorAll('img'))
            .map(i => ({src: i.src, w: i.naturalWidth, shown: i.getBoundingClientRect().width}))
            .filter(i => i.shown > 200);
        imgs.sort((a, b) => b.shown - a.shown);
        return imgs[0] || {src: '', w: 0, shown: 0};
    }""")


def _submit(page, tid: int) -> None:
    """Press Submit and wait until Label Studio has stored the task's annotation (its API)."""
    page.get_by_role("button", name="Submit").click()
    page.wait_for_function(f"""async () => {{
        const r = await fetch('/api/tasks/{tid}'); const t = await r.json();
        return (t.annotations || []).length > 0; }}""", timeout=30_000)


def _open_task(page, ls_url: str, pid: int, task_id: int, regions: bool = True):
    page.goto(f"{ls_url}/projects/{pid}/data?task={task_id}")
    if regions:
        page.locator(".lsf-outliner-item").first.wait_for(timeout=120_000)  # regions listed: the pre-labels
    page.wait_for_function("""() => Array.from(document.querySelectorAll('img'))
        .some(i => i.getBoundingClientRect().width > 200 && i.complete && i.naturalWidth > 0)""", timeout=60_000)


def _text(page) -> str:
    """The page's visible text; "" while a meta refresh reloads it."""
    try:
        return page.inner_text("body", timeout=5_000)
    except Exception:  # noqa: BLE001 - navigation in progress (the status page reloads itself)
        return ""


def _open_status_from_label_studio(page, ls_url: str, pid: int, shot=None) -> str:
    """As a person: the project's Data Manager (Default tab next to the Review queue), *Label All
    Tasks*, and the status link in the instructions Label Studio shows before labeling (one click
    on the link). Returns the status page's URL."""
    page.goto(f"{ls_url}/projects/{pid}/data")
    page.get_by_text("Review queue").first.wait_for(timeout=60_000)
    page.get_by_text("Default", exact=True).first.wait_for(timeout=10_000)  # LS's own tab stays
    page.get_by_role("button", name="Label All Tasks").first.click()
    link = page.get_by_role("link", name=re.compile("faceloop status"))
    link.first.wait_for(timeout=30_000)  # the "Labeling Instructions" modal
    if shot:
        shot(page, "instructions_with_status_link")
    link.first.click()
    page.wait_for_url(re.compile(rf"/status/{pid}(\?|$)"), timeout=30_000)
    return page.url


def _delete_regions_and_submit(page, ls_url: str, pid: int, tid: int, keep: int):
    """As a person: open the task (its pre-labels), delete every box but the first ``keep`` ones
    (click in the regions list, Backspace), Submit; waits until Label Studio has the annotation."""
    _open_task(page, ls_url, pid, tid)
    for _ in range(20):
        items = page.locator(".lsf-outliner-item")
        if items.count() <= keep:
            break
        items.nth(keep).click()
        page.keyboard.press("Backspace")
        page.wait_for_timeout(200)
    _submit(page, tid)


def test_person_up_label_train_restart(image_folder, out_dir, browser, tmp_path):
    from label_studio_sdk import LabelStudio

    from backend.db import session_scope
    from backend.demo import wait_for_job
    from backend.events import AUTO_START_WINDOW_S as events_window_s
    from backend.models import ModelVersion

    folder, truth = image_folder
    var_dir = tmp_path / "var"
    ports = {"ls": _free_port(), "backend": _free_port(), "redis": _free_port()}
    assert len(set(ports.values())) == 3
    up = Up(folder, var_dir, ports, tmp_path / "up.log")
    shots = []

    def shot(page, name):
        path = out_dir / f"{len(shots) + 1:02d}_{name}.png"
        page.screenshot(path=str(path))
        shots.append(path)

    t_test = time.time()
    first = up.start()
    try:
        pid, ls_url = first["project"], first["ls_url"]
        assert ls_url == f"http://127.0.0.1:{ports['ls']}"
        assert "shown once" in first["out"]  # the generated admin password, printed at the first start only
        root = var_dir / "stack"
        secrets = json.loads((root / "secrets.json").read_text())
        for f in (root / "secrets.json", root / "stack.json", root / "label-studio" / "faceloop-pat.txt",
                  root / "label-studio" / "label_studio.sqlite3"):
            assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"
        assert secrets["ls_password"] in first["out"]
        client = LabelStudio(base_url=ls_url, api_key=(root / "label-studio" / "faceloop-pat.txt").read_text().strip())
        tasks = {t.id: t.data["image"] for t in client.tasks.list(project=pid)}
        assert len(tasks) == N_IMAGES
        names = {tid: Path(unquote(url.split("?d=", 1)[1])).name
                 for tid, url in tasks.items()}
        assert set(names.values()) == set(truth)
        ml = client.ml.list(project=pid)
        assert len(ml) == 1 and ml[0].auth_method == "BASIC_AUTH" and ml[0].state == "CO"
        hooks = [w for w in client.webhooks.list(project=str(pid)) if w.project == pid]
        assert len(hooks) == 1 and "X-Faceloop-Secret" in (hooks[0].headers or {}), "one authenticated webhook"

        # --- 1. log in, open a task: the image and the pre-labels ---------------------------------
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        _login(page, ls_url, secrets["ls_user"], secrets["ls_password"])
        shot(page, "logged_in")
        special = next(t for t, n in names.items() if "Zoë" in n)  # nested folder, space, non-ASCII
        _open_task(page, ls_url, pid, special)
        img = _main_image(page)
        assert img["w"] > 0, f"image did not load: {img}"
        n_regions = page.locator(".lsf-outliner-item").count()
        assert n_regions >= 1, "no pre-label regions drawn"
        # every image of the folder loads (the Data Manager's thumbnails of the local files)
        page.wait_for_timeout(1000)
        thumbs = page.evaluate("""() => Array.from(document.querySelectorAll('img'))
            .filter(i => i.src.includes('/data/local-files/')).map(i => [i.src, i.complete && i.naturalWidth > 0])""")
        assert thumbs and all(ok for _, ok in thumbs), thumbs
        shot(page, "task_image_and_prelabels")

        # --- 2. accept one pre-label per task and submit ------------------------------------------
        hotkey = {"awake": "1", "sleep": "2"}  # label_config/awake_sleep.xml
        # tasks where the default model found a face (its predictions are written by `up`'s scoring)
        deadline = time.time() + 180
        while time.time() < deadline:
            preds = {t.id: t.predictions or [] for t in client.tasks.list(project=pid, fields="all")}
            if all(preds.values()):
                break
            time.sleep(2)
        # the person accepts the box that is the face (best overlap with the dataset's box), and
        # labels tasks where the default model found it
        best = {}
        for t in sorted(preds):
            regions = [r["value"] for p in preds[t] for r in p.result]
            gt = truth[names[t]][1]
            if regions and gt:
                ious = [max(_iou((v["x"], v["y"], v["width"], v["height"]), g) for g in gt) for v in regions]
                if max(ious) >= 0.3:
                    best[t] = ious.index(max(ious))
        assert len(best) >= N_LABEL + 1, f"the default model found the face in {len(best)} of {len(preds)} images"
        labelled = sorted(best)[:N_LABEL]
        for i, tid in enumerate(labelled):
            cls = truth[names[tid]][0]
            _accept_box(page, ls_url, pid, tid, best[tid], cls, hotkey[cls], shot if i == 0 else None)
        for tid in labelled:
            anns = client.tasks.get(id=tid).annotations
            assert len(anns) == 1 and not anns[0]["was_cancelled"]
            assert [r["value"]["rectanglelabels"] for r in anns[0]["result"]] == [[truth[names[tid]][0]]]

        # --- 3. Start Training in Settings -> Model ------------------------------------------------
        page.goto(f"{ls_url}/projects/{pid}/settings/ml")
        page.get_by_text("Connected").first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Machine learning model options").click()
        page.locator(".lsf-main-menu__item", has_text="Start Training").click()
        confirm = page.get_by_role("button", name="Start Training")  # Label Studio asks to confirm
        confirm.wait_for(timeout=10_000)
        page.wait_for_timeout(500)
        shot(page, "start_training_confirm")
        t_train = time.time()
        confirm.click()
        db = f"sqlite:///{var_dir / 'faceloop.db'}"
        from sqlmodel import select

        from backend.models import TrainingJob

        deadline = time.time() + 30
        while time.time() < deadline:
            with session_scope(db) as s:
                if s.exec(select(TrainingJob).where(TrainingJob.project_id == pid)).first() is not None:
                    break
            time.sleep(1)
        else:
            raise AssertionError("Start Training did not reach the backend (no training job within 30 s)")

        # --- 3b. the status page, opened from the project, shows the job live to its end -----------
        status_url = _open_status_from_label_studio(page, ls_url, pid, shot)
        assert status_url.startswith(f"http://127.0.0.1:{ports['backend']}/status/{pid}"), status_url
        seen_epochs, seen_eta, seen_stages, shot_running = set(), False, set(), False
        deadline = time.time() + 900
        while time.time() < deadline:  # the page reloads itself every 5 s while the job runs
            text = _text(page)
            job_card = re.search(r"Job \d+ (queued|running) · stage (.+?)(?: · |\n|$)", text)
            if job_card:
                seen_stages.add(job_card.group(2).strip())
                m = re.search(r"epoch (\d+) of (\d+)", text)
                if m:
                    seen_epochs.add((int(m.group(1)), int(m.group(2))))
                    seen_eta = seen_eta or bool(re.search(r"about .+ left", text))
                    if int(m.group(1)) >= 1 and not shot_running:
                        shot(page, "status_page_training")
                        shot_running = True
            elif re.search(rf"p{pid}-v1\s", text) and "No training job is running" in text:
                break
            page.wait_for_timeout(1000)
        else:
            raise AssertionError(f"the status page never showed the finished job and p{pid}-v1:\n{_text(page)[-2000:]}")
        assert seen_epochs, f"the status page never showed 'epoch k of n' while the job ran (stages {seen_stages})"
        assert any(k >= 1 for k, _ in seen_epochs) and seen_eta, (seen_epochs, seen_eta)
        job = wait_for_job(db, pid, timeout=60)
        train_s = time.time() - t_train
        assert job.state == "succeeded", (job.state, job.error)
        assert job.trigger == "start_training"
        with session_scope(db) as s:
            v = s.exec(select(ModelVersion).where(ModelVersion.project_id == pid, ModelVersion.status == "promoted")).one()
            version, version_id, gate_reason = v.version, v.id, v.gate_reason
        assert version == f"p{pid}-v1"
        row = page.locator(f"#version-{version_id}").inner_text()
        assert version in row and "promoted" in row and gate_reason and gate_reason in row, row
        finished = page.locator("details", has_text="Finished jobs").inner_text()
        assert "succeeded" in finished and "start_training" in finished, finished
        shot(page, "status_page_finished")
        print(f"\nstatus page: stages seen {sorted(seen_stages)}, epochs seen {sorted(seen_epochs)}, "
              f"time left shown: {seen_eta}")
        jobs_out = _cli(var_dir, "jobs", str(pid))  # a second terminal finds the running stack
        assert jobs_out.returncode == 0 and "succeeded" in jobs_out.stdout, jobs_out.stdout + jobs_out.stderr
        # the unlabelled tasks now hold the new version's predictions; open one with a face found
        deadline = time.time() + 120
        while time.time() < deadline:
            new_preds = {t.id: [p for p in t.predictions or [] if p.model_version == version]
                         for t in client.tasks.list(project=pid, fields="all") if t.id not in labelled}
            if all(new_preds.values()):
                break
            time.sleep(2)
        with_boxes = [t for t, ps in sorted(new_preds.items()) if ps and ps[0].result]
        assert with_boxes, f"{version} found no face in the {len(new_preds)} unlabelled tasks"
        unlabelled = with_boxes[0]
        _open_task(page, ls_url, pid, unlabelled)
        page.get_by_text(version).first.wait_for(timeout=30_000)
        labels = page.locator(".lsf-outliner-item").all_inner_texts()
        assert any(("awake" in t or "sleep" in t) for t in labels), labels
        shot(page, "new_version_prediction")

        # --- 3c. pre-label acceptance: accept one box of the new version, delete another --------
        n_boxes = {t: len(new_preds[t][0].result) for t in with_boxes}
        one_first = sorted(with_boxes, key=lambda t: (n_boxes[t] != 1, t))  # tasks with one box first
        keep_task, delete_task = one_first[0], one_first[1]
        _delete_regions_and_submit(page, ls_url, pid, keep_task, keep=1)  # first box kept as it is
        _delete_regions_and_submit(page, ls_url, pid, delete_task, keep=0)  # its box(es) deleted
        for t in (keep_task, delete_task):
            ann = client.tasks.get(id=t).annotations[0]
            assert ann.get("parent_prediction"), f"task {t}: Label Studio recorded no parent prediction"
        want = {"annotations": "2", "predicted boxes": str(n_boxes[keep_task] + n_boxes[delete_task]),
                "accepted": "1", "relabelled": "0", "moved / resized": "0",
                "deleted": str(n_boxes[keep_task] - 1 + n_boxes[delete_task]), "drawn by hand": "0"}
        cells = {}
        deadline = time.time() + 120  # recounted from Label Studio at most every 30 s
        while time.time() < deadline:
            page.goto(status_url)
            acc = page.locator(f"[id='acceptance-{version}']")
            if acc.count():
                heads = [h.strip() for h in acc.locator("xpath=ancestor::table[1]").locator("tr").first
                         .locator("th").all_inner_texts()]
                cells = dict(zip(heads, [c.strip() for c in acc.locator("td").all_inner_texts()]))
                if all(cells.get(k) == v for k, v in want.items()):
                    break
            page.wait_for_timeout(3000)
        else:
            raise AssertionError(f"status page acceptance of {version}: {cells}, want {want}")
        acc.scroll_into_view_if_needed()
        shot(page, "status_page_acceptance")
        print(f"acceptance of {version} on the status page: {cells}")

        # clean errors from the CLI for an unknown project, nothing recorded
        for cmd in (("jobs", "999"), ("versions", "999"), ("train", "999")):
            r = _cli(var_dir, *cmd)
            assert r.returncode == 1 and "no project 999" in r.stdout, (cmd, r.stdout, r.stderr)
            assert "headers" not in r.stdout + r.stderr and "sessionid" not in r.stdout + r.stderr
        with session_scope(db) as s:
            assert s.exec(select(TrainingJob).where(TrainingJob.project_id == 999)).first() is None
            assert s.exec(select(ModelVersion).where(ModelVersion.project_id == 999)).first() is None

        # --- 4. stop and start again: same project, backend connected -----------------------------
        stop_s = up.stop()
        up.ports["backend"] = _free_port()  # e.g. the old port was taken meanwhile: the backend moves
        used = {p.name for p in folder.rglob("*.jpg")}
        extra = next(p for p in sorted((require_data() / "images" / "val").glob("*.jpg")) if p.name not in used)
        shutil.copyfile(extra, folder / "day 2" / "added later ü.jpg")  # a new image while it was stopped
        second = up.start()
        assert second["project"] == pid and second["ls_url"] == ls_url, second["out"][-2000:]
        assert "shown once" not in second["out"] and secrets["ls_password"] not in second["out"]
        urls = [t.data["image"] for t in client.tasks.list(project=pid)]
        assert len(urls) == len(set(urls)) == N_IMAGES + 1, "the added image is a task, no duplicates"
        assert "(1 new)" in second["out"]
        new_backend = f"http://127.0.0.1:{up.ports['backend']}"
        ml = client.ml.list(project=pid)
        assert len(ml) == 1 and ml[0].state == "CO" and ml[0].url == new_backend, [(m.url, m.state) for m in ml]
        hooks = [w for w in client.webhooks.list(project=str(pid)) if w.project == pid]
        assert [w.url for w in hooks] == [new_backend + "/webhook"] and "X-Faceloop-Secret" in hooks[0].headers
        assert sum(len(client.tasks.get(id=t).annotations) for t in labelled) == N_LABEL  # the labels stay
        r = _cli(var_dir, "versions", str(pid))
        assert r.returncode == 0 and version in r.stdout and "promoted" in r.stdout, r.stdout
        page.goto(f"{ls_url}/user/login/")  # the session cookie survived; log in again if needed
        if page.locator("input[name=email]").count():
            _login(page, ls_url, secrets["ls_user"], secrets["ls_password"])
        page.goto(f"{ls_url}/projects/{pid}/settings/ml")
        page.get_by_text("Connected").first.wait_for(timeout=30_000)
        page.get_by_text(new_backend).first.wait_for(timeout=10_000)
        shot(page, "after_restart_backend_connected")
        _open_task(page, ls_url, pid, labelled[0])
        assert _main_image(page)["w"] > 0
        shot(page, "after_restart_task")

        # --- 5. the switch "Start model training on annotation submission": annotations retrain --
        page.goto(f"{ls_url}/projects/{pid}/settings/ml")
        page.get_by_text("Start model training on annotation submission").click()
        page.get_by_role("button", name="Save").click()
        deadline = time.time() + 20
        while time.time() < deadline and not client.projects.get(id=pid).min_annotations_to_start_training:
            time.sleep(0.5)
        assert client.projects.get(id=pid).min_annotations_to_start_training == 1  # what the switch stores
        more = [t for t in with_boxes if t not in (unlabelled, keep_task, delete_task)][:2]  # RETRAIN_MIN_ANNOTATIONS = 2
        assert len(more) == 2, with_boxes
        for tid in more:  # Label Studio also sends START_TRAINING on each save: those must not train
            cls = truth[names[tid]][0]
            _accept_box(page, ls_url, pid, tid, 0, cls, hotkey[cls])
        deadline = time.time() + 30
        while time.time() < deadline:
            with session_scope(db) as s:
                triggers = [j.trigger for j in s.exec(select(TrainingJob).where(TrainingJob.project_id == pid)
                                                      .order_by(TrainingJob.id)).all()]
            if len(triggers) > 1:
                break
            time.sleep(1)
        time.sleep(events_window_s + 1)  # Label Studio's own START_TRAINING calls are decided by now
        with session_scope(db) as s:
            triggers = [j.trigger for j in s.exec(select(TrainingJob).where(TrainingJob.project_id == pid)
                                                  .order_by(TrainingJob.id)).all()]
        assert triggers == ["start_training", "annotations"], triggers

        # SIGTERM (a service manager, `kill`) stops every service too, none is left behind
        pids = json.loads((root / "stack.json").read_text())["pids"]
        assert set(pids) == {"redis", "label-studio", "backend", "worker"}
        up.stop(sig=signal.SIGTERM)
        from backend.stack import pid_alive

        time.sleep(1)
        assert not [n for n, p in pids.items() if pid_alive(p)], pids
        print(f"\nfirst `faceloop up` {first['seconds']:.0f} s; Start Training -> {version} promoted in {train_s:.0f} s; "
              f"Ctrl-C {stop_s:.0f} s; restart {second['seconds']:.0f} s; whole test {time.time() - t_test:.0f} s")
        print("screenshots:\n  " + "\n  ".join(map(str, shots)))
    finally:
        up.stop()
