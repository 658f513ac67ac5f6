"""The status page (backend.status): what a person sees of the loop, behind the backend's auth."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backend.acceptance import Counts, store
from backend.app import create_app
from backend.db import session_scope
from backend.jobprogress import record
from backend.models import ModelVersion, Project, TaskScore, TrainingJob, WebhookEvent
from tests.helpers_unit import make_settings, write_jpeg

LOOPBACK = ("127.0.0.1", 50000)
PID = 7
#: A retrain's stages as ml_worker.training plans them (backend.jobprogress).
PLAN = [{"stage": "train detector", "epochs": 10}, {"stage": "train classifier", "epochs": 40},
        {"stage": "evaluate", "epochs": 0}]


def png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def candidate(**kw) -> dict:
    base = {"mAP50": 0.712, "face_mAP50": 0.93, "acceptance_rate": 0.64, "class_accuracy": 0.8, "accepted": 32,
            "class_fixed": 8, "box_fixed": 3, "missed": 7, "false_boxes": 4, "boxes_per_face": 0.94}
    base["confusion"] = {"labels": ["awake", "sleep", "(no class)"], "matrix": [[17, 3, 1], [2, 15, 0], [0, 0, 0]],
                         "missed": {"awake": 4}, "false_boxes": {"sleep": 2}}
    base.update(kw)
    return base


@pytest.fixture()
def settings(tmp_path, db_url):
    """On SQLite and on PostgreSQL (tests/conftest.py::db_url)."""
    return make_settings(tmp_path / "var", model_dir=tmp_path / "var" / "models", database_url=db_url)


@pytest.fixture()
def populated(settings, tmp_path):
    """A project with a running job, finished jobs, three versions with plots, scores and acceptance."""
    store_dir = Path(settings.model_dir) / f"project_{PID}" / "v2"
    store_dir.mkdir(parents=True)
    (store_dir / "detector_results.png").write_bytes(png_bytes())
    (store_dir / "detector_results.csv").write_text("epoch,train/box_loss\n1,1.5\n")
    (store_dir / "notes.html").write_text("<script>alert(1)</script>")
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    (store_dir / "link.png").symlink_to(outside)
    now = datetime.now(timezone.utc)
    with session_scope(settings.database_url) as s:
        s.add(Project(id=PID, title="Sleepy <b>faces</b>", label_config=""))
        s.flush()
        v1 = ModelVersion(project_id=PID, version="v1", path="/x/v1.pt", sha256="0", status="retired",
                          gate_reason="base model", created_at=now - timedelta(hours=3))
        v2 = ModelVersion(project_id=PID, version="v2", path=str(store_dir / "bundle.json"), sha256="0",
                          status="promoted", gate_reason="mAP50 0.712 > 0.650 (+0.062)",
                          created_at=now - timedelta(hours=2), training_job_id=1,
                          metrics_json=json.dumps({"candidate": candidate(), "current": candidate(mAP50=0.65),
                                                   "current_version": "v1", "n_train": 40, "n_val": 10,
                                                   "plots": {"detector results.png": str(store_dir / "detector_results.png"),
                                                             "detector results.csv": str(store_dir / "detector_results.csv"),
                                                             "escaped": str(outside),
                                                             "linked": str(store_dir / "link.png"),
                                                             "page": str(store_dir / "notes.html"),
                                                             "traversal": str(store_dir / ".." / ".." / ".." / "secret.png")}}))
        v3 = ModelVersion(project_id=PID, version="v3", path="/x/v3", sha256="0", status="rejected",
                          gate_reason="mAP50 0.600 < 0.712: kept v2", created_at=now - timedelta(hours=1),
                          training_job_id=2, metrics_json=json.dumps({"candidate": candidate(mAP50=0.6)}))
        s.add_all([v1, v2, v3])
        s.flush()
        s.get(Project, PID).promoted_version_id = v2.id
        done, running = (TrainingJob(project_id=PID, state="succeeded", n_train=40, n_val=10),
                         TrainingJob(project_id=PID, state="running", n_train=44, n_val=11))
        # the finished job's stages (ml_worker.training's reports): 10 detector epochs of 20 s,
        # the classifier in 30 s, evaluation in 10 s
        t = now - timedelta(hours=2, minutes=10)
        for dt, f in [(0, {"stage": "train", "plan": PLAN}), (0, {"stage": "train detector"}),
                      *[(20 * k, {"stage": "train detector", "stage_epoch": k, "stage_epochs": 10}) for k in range(1, 11)],
                      (200, {"stage": "train classifier"}), (230, {"stage": "evaluate"}), (240, {"stage": "registered"})]:
            record(done, f, now=t + timedelta(seconds=dt))
        # the running job: detector epochs 1 and 3 ended 70 s and 30 s ago (20 s an epoch)
        for dt, f in [(-95, {"stage": "train", "plan": PLAN}), (-90, {"stage": "train detector"}),
                      *[(-70 + 20 * (k - 1), {"stage": "train detector", "stage_epoch": k, "stage_epochs": 10})
                        for k in (1, 2, 3)]]:
            record(running, f, now=now + timedelta(seconds=dt))
        done.stage, done.epoch, done.epochs, done.message = "registered", 10, 10, "v2: promoted"
        done.started_at, done.finished_at = now - timedelta(hours=2, minutes=10), now - timedelta(hours=2)
        running.stage, running.epoch, running.epochs, running.message = "train detector", 3, 50, "detector epoch 3/10"
        running.started_at = now - timedelta(seconds=100)
        s.add_all([
            done,
            TrainingJob(project_id=PID, state="failed", stage="dataset", error="need at least 2 annotated tasks",
                        started_at=now - timedelta(hours=1), finished_at=now - timedelta(minutes=59)),
            running,
        ])
        for rank, tid in enumerate([105, 101, 103]):
            s.add(TaskScore(project_id=PID, task_id=tid, model_version="v2", uncertainty=0.9 - rank / 10,
                            least_confidence=0.5, margin=0.5, entropy=0.5, n_boxes=2, rank=rank,
                            in_query_batch=rank < 2))
        s.add(TaskScore(project_id=PID, task_id=106, model_version="v2", uncertainty=0.95, least_confidence=0.5,
                        margin=0.5, entropy=0.5, n_boxes=1, rank=0))  # annotated since: not in the queue
        s.add(WebhookEvent(project_id=PID, action="ANNOTATION_CREATED", task_id=106, annotation_id=1))
        s.add(TaskScore(project_id=PID, task_id=104, model_version="v2", uncertainty=1, least_confidence=1,
                        margin=1, entropy=1, error="image is truncated (0 of 5120 bytes)"))
        ids = {"v2": v2.id, "v3": v3.id}
    store(settings, PID, {"v2": Counts(annotations=5, predicted=12, accepted=9, relabelled=1, class_picked=1, moved=1,
                                       deleted=1, drawn=3)})
    return ids


@pytest.fixture()
def client(settings):
    return TestClient(create_app(settings), client=LOOPBACK)  # no lifespan: no model warm-up


def test_project_page_shows_job_versions_acceptance_queue_and_errors(client, populated):
    r = client.get(f"/status/{PID}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert '<meta http-equiv="refresh" content="5">' in html  # a job runs: reload fast
    # the stage's own epochs, named: not the row's combined count (3 of 50: detector and classifier
    # epochs together) beside the worker's "3/10", two scales a new user's trial could not tell apart
    assert re.search(r"stage <b>train detector</b>\s+· <b>detector epoch 3 of 10</b>", html), html[html.index("Job "):][:600]
    assert "3 of 50" not in html and "3/50" not in html
    # per stage: the detector's 7 epochs left at 20 s each, less the ~30 s since epoch 3 ended; the
    # classifier and evaluation timed by the previous job (30 s and 10 s, x 55/50 images)
    m = re.search(r'id="time-left-\d+">train detector: about 1 min (\d\d) s left, then train classifier '
                  r"\(40 epochs, about 33 s\), evaluate \(about 11 s\): about 2 min (\d\d) s left in all</span>", html)
    assert m and 40 <= int(m[1]) <= 50 and 24 <= int(m[2]) <= 34, html[html.index("Job "):][:900]
    assert f"about <b>2 min {m[2]} s</b> left" in html
    assert "detector epoch 3/10" in html
    assert "need at least 2 annotated tasks" in html  # finished (failed) job with its error
    for v in ("v1", "v2", "v3"):
        assert f"<b>{v}</b>" in html
    assert "mAP50 0.712 &gt; 0.650 (+0.062)" in html and "kept v2" in html
    assert "0.712" in html and "0.650" in html and "64.0%" in html  # candidate and current figures
    assert "image acc." not in html  # a boxes project: no column of dashes for a Choices figure
    # the columns say what they count ("accepted" beside "acc." read as two rates; a trial saw
    # "accepted 100%" beside "false 1" and asked how)
    heads = re.findall(r'<th class="num">([^<]+)</th>', html)
    assert {"accepted %", "faces accepted", "false boxes"} <= set(heads) and "acc." not in heads, heads
    assert "counted apart, so a version can show 100% accepted and a false box" in html
    assert 'id="acceptance-v2"' in html and "75.0%" in html  # 9 of 12 boxes accepted
    assert "83.3%" in html and "grey box given its class" in html  # 9 + 1 of 12 boxes kept where they were
    assert html.index("task 105") < html.index("task 101") < html.index("task 103")  # queue by rank
    assert "<i>Prediction score</i> column is 1 &minus; uncertainty" in html  # what Label Studio's number means
    assert f'src="{PID}/tasks/105/thumb.jpg"' in html and "task 106" not in html
    assert "image is truncated (0 of 5120 bytes)" in html
    assert '<td class="num diag">17</td>' in html and '<td class="num diag">15</td>' in html  # confusion matrix
    assert "Sleepy &lt;b&gt;faces&lt;/b&gt;" in html and "<b>faces</b>" not in html  # escaped
    assert r.headers["x-content-type-options"] == "nosniff"


def test_plots_are_served_only_from_the_model_store(client, populated):
    v2 = populated["v2"]
    html = client.get(f"/status/{PID}").text
    # plots sorted by name; only those inside the model store are listed
    names = sorted(["detector results.png", "detector results.csv", "escaped", "linked", "page", "traversal"])
    k = {n: i for i, n in enumerate(names)}
    assert f'src="{PID}/versions/{v2}/plots/{k["detector results.png"]}"' in html
    for name in ("escaped", "linked", "traversal", "page"):
        assert f'{PID}/versions/{v2}/plots/{k[name]}"' not in html, name
    r = client.get(f"/status/{PID}/versions/{v2}/plots/{k['detector results.png']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == png_bytes()
    r = client.get(f"/status/{PID}/versions/{v2}/plots/{k['detector results.csv']}")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    for name in ("escaped", "linked", "traversal", "page"):
        r = client.get(f"/status/{PID}/versions/{v2}/plots/{k[name]}")
        assert r.status_code == 404, name
    assert client.get(f"/status/{PID}/versions/{v2}/plots/99").status_code == 404
    assert client.get(f"/status/{PID + 1}/versions/{v2}/plots/0").status_code == 404  # other project
    assert client.get(f"/status/{PID}/versions/{populated['v3']}/plots/0").status_code == 404  # no plots


def test_time_left_is_per_stage_and_says_when_it_cannot_tell(client, settings):
    """A running job without an earlier finished job: the detector's time left, the classifier's
    'not known'; a job from a worker before per-stage records: no number at all."""
    now = datetime.now(timezone.utc)
    with session_scope(settings.database_url) as s:
        s.add(Project(id=PID, title="faces", label_config=""))
        s.flush()
        job = TrainingJob(project_id=PID, state="running", stage="train detector", epoch=3, epochs=50,
                          started_at=now - timedelta(seconds=28))
        for dt, f in [(-24, {"stage": "train", "plan": PLAN}), (-24, {"stage": "train detector"}),
                      *[(-14 + 7 * (k - 1), {"stage": "train detector", "stage_epoch": k, "stage_epochs": 10})
                        for k in (1, 2, 3)]]:
            record(job, f, now=now + timedelta(seconds=dt))
        s.add(job)
        s.flush()
        jid = job.id
    html = client.get(f"/status/{PID}").text
    assert re.search(r"train detector: about (4[0-9]) s left, then train classifier \(40 epochs\), evaluate: "
                     r"total not known yet", html), html[html.index("Job "):][:600]
    assert "s</b> left" not in html  # no total shown rather than a wrong one
    with session_scope(settings.database_url) as s:  # registering its version, not yet marked succeeded
        record(s.get(TrainingJob, jid), {"stage": "registered"})
    html = client.get(f"/status/{PID}").text
    assert 'id="time-left-' not in html and "s</b> left" not in html
    with session_scope(settings.database_url) as s:
        s.get(TrainingJob, jid).stages_json = "[]"
    html = client.get(f"/status/{PID}").text
    assert "time left not known (no per-stage progress recorded)" in html and "s</b> left" not in html


def test_index_lists_projects_and_unknown_project_is_404(client, populated):
    html = client.get("/status").text
    assert f'href="status/{PID}"' in html and "Sleepy &lt;b&gt;faces&lt;/b&gt;" in html
    assert "running · detector epoch 3 of 10" in html and "3/50" not in html
    r = client.get("/status/999")
    assert r.status_code == 404 and "not set up" in r.json()["detail"]
    for bad in ("/status/0", "/status/-1", "/status/abc", f"/status/{2**63}", f"/status/{PID}/versions/{2**64}/plots/0",
                f"/status/{PID}/versions/1/plots/-1", f"/status/{PID}/tasks/{2**70}/thumb.jpg"):
        assert client.get(bad).status_code == 422, bad


def test_idle_project_reloads_slowly_and_says_how_to_train(client, settings):
    with session_scope(settings.database_url) as s:
        s.add(Project(id=3, title="new"))
    html = client.get("/status/3").text
    assert '<meta http-equiv="refresh" content="30">' in html
    assert "Start Training" in html and "No model version yet" in html and "No task scored yet" in html
    assert "LABEL_STUDIO_API_KEY is not set" in html


def test_choices_project_shows_choice_acceptance_not_box_counts(client, settings):
    """A Choices project's acceptance: image-level choices accepted, changed, removed, chosen by hand."""
    with session_scope(settings.database_url) as s:
        s.add(Project(id=4, title="awake or asleep"))
    store(settings, 4, {"v1": Counts(annotations=6, choices_predicted=5, choices_accepted=3, choices_changed=1,
                                     choices_removed=1, choices_by_hand=1)})
    html = client.get("/status/4").text
    assert 'id="choice-acceptance-v1"' in html and "60.0%" in html  # 3 of 5 choices kept
    assert 'id="acceptance-v1"' not in html and "predicted boxes" not in html


def test_thumbnail_without_label_studio_key_is_a_clear_502(client, populated):
    r = client.get(f"/status/{PID}/tasks/105/thumb.jpg")
    assert r.status_code == 502 and "LABEL_STUDIO_API_KEY" in r.json()["detail"]


def test_status_pages_need_the_backends_auth(tmp_path, populated, settings):
    auth = make_settings(tmp_path / "var", model_dir=settings.model_dir, database_url=settings.database_url,
                         basic_auth_user="ann", basic_auth_pass="pw")
    c = TestClient(create_app(auth), client=LOOPBACK)
    v2 = populated["v2"]
    for path in ("/status", f"/status/{PID}", f"/status/{PID}/versions/{v2}/plots/1", f"/status/{PID}/tasks/1/thumb.jpg"):
        r = c.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic", path  # browser prompts
    good = {"Authorization": "Basic " + base64.b64encode(b"ann:pw").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ann:nope").decode()}
    assert c.get(f"/status/{PID}", headers=bad).status_code == 401
    assert c.get(f"/status/{PID}", headers=good).status_code == 200
    # without basic auth configured: loopback clients only
    remote = TestClient(create_app(settings), client=("192.0.2.10", 5000))
    assert remote.get(f"/status/{PID}").status_code == 403


def test_a_projects_token_link_opens_its_page_and_images_only(tmp_path, populated, settings):
    """status_link(..., key) gives a one-click link: the token opens that project's page, and the
    cookie it sets opens the page's plots and thumbnails; nothing else."""
    from backend.status import TOKEN_COOKIE, status_link, status_token, token_key

    auth = make_settings(tmp_path / "var", model_dir=settings.model_dir, database_url=settings.database_url,
                         basic_auth_user="ann", basic_auth_pass="pw",
                         webhook_secret="hook-secret")
    key = token_key(auth)
    assert key == "hook-secret"
    link = status_link("http://127.0.0.1:9090/", PID, key)
    assert link.startswith(f"http://127.0.0.1:9090/status/{PID}?token=") and len(link.split("=")[1]) == 32
    path = link.removeprefix("http://127.0.0.1:9090")
    c = TestClient(create_app(auth), client=("192.0.2.10", 5000))  # a remote browser
    r = c.get(path)
    assert r.status_code == 200 and "Sleepy" in r.text
    # its "all projects" link says that the index asks for the backend's password, and which one
    assert "asks for the backend's user and password" in r.text and "basic_auth_pass" in r.text
    assert "pw" not in re.findall(r"<code>([^<]*)</code>", r.text)  # named, never shown
    with_password = TestClient(create_app(auth), client=("192.0.2.10", 5000)).get(f"/status/{PID}", auth=("ann", "pw"))
    assert with_password.status_code == 200 and "asks for the backend's user" not in with_password.text
    cookie = r.cookies.get(TOKEN_COOKIE)
    set_cookie = r.headers["set-cookie"].lower()
    assert cookie and "httponly" in set_cookie and f"path=/status/{PID};" in set_cookie
    v2 = populated["v2"]
    plot = c.get(f"/status/{PID}/versions/{v2}/plots/1")  # the cookie rides along
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert c.get(f"/status/{PID}/tasks/105/thumb.jpg").status_code == 502  # past auth: no LS key here
    fresh = TestClient(create_app(auth), client=("192.0.2.10", 5000))
    token = link.split("=")[1]
    assert fresh.get(f"/status/{PID}?token={token[:-1]}0").status_code == 401  # wrong token
    assert fresh.get(f"/status/3?token={token}").status_code == 401  # another project's page
    assert fresh.get(f"/status?token={token}").status_code == 401  # the index needs the password
    assert fresh.get(f"/status/{PID}/versions/{v2}/plots/1").status_code == 401  # no cookie, no token
    # no secret configured: no tokens (loopback-only rule)
    assert status_link("http://h:1", PID) == f"http://h:1/status/{PID}"
    assert status_link("http://h:1", PID, token_key(settings)) == f"http://h:1/status/{PID}"
    with pytest.raises(ValueError):
        status_token("", PID)
    remote = TestClient(create_app(settings), client=("192.0.2.10", 5000))
    assert remote.get(f"/status/{PID}?token={token}").status_code == 403


@pytest.mark.e2e
def test_thumbnail_of_a_task_in_a_real_label_studio(stack, tmp_path):
    """The thumbnail endpoint reads the task from Label Studio and its image through
    backend.images (an uploaded file: /data/upload/..., fetched with the API key)."""
    from label_studio_sdk import LabelStudio
    from PIL import Image

    from backend.lsapi import upload_images
    from tests.helpers_unit import EXAMPLE_CONFIG

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    p = client.projects.create(title="thumbs", label_config=EXAMPLE_CONFIG)
    other = client.projects.create(title="other", label_config=EXAMPLE_CONFIG)
    write_jpeg(tmp_path / "face.jpg", width=640, height=480)
    (tid,) = upload_images(client, stack.ls_url, p.id, [tmp_path / "face.jpg"])
    s = make_settings(tmp_path / "var", label_studio_url=stack.ls_url, label_studio_api_key=stack.api_key)
    with session_scope(s.database_url) as db:
        db.add(Project(id=p.id, label_config=EXAMPLE_CONFIG))
        db.add(Project(id=other.id, label_config=EXAMPLE_CONFIG))
    c = TestClient(create_app(s), client=LOOPBACK)
    r = c.get(f"/status/{p.id}/tasks/{tid}/thumb.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    import io

    assert Image.open(io.BytesIO(r.content)).size == (160, 120)
    assert c.get(f"/status/{other.id}/tasks/{tid}/thumb.jpg").status_code == 404  # not that project's task
    assert c.get(f"/status/{p.id}/tasks/999999/thumb.jpg").status_code == 404
    # a task error row names the task's image file (read from Label Studio), not only its id
    with session_scope(s.database_url) as db:
        db.add(TaskScore(project_id=p.id, task_id=tid, model_version="v1", uncertainty=1, least_confidence=1,
                         margin=1, entropy=1, error="image is empty (0 bytes)"))
    html = c.get(f"/status/{p.id}").text
    row = re.search(rf"<tr><td><a [^>]*>{tid}</a></td><td>([^<]*)</td>", html)
    assert row and row.group(1).endswith("-face.jpg"), html[html.find("Task errors"):][:800]


def test_task_error_rows_name_the_image_file():
    """The file of a task's image URL as a person knows it: the path inside the folder `faceloop up`
    linked (Local Files), or an uploaded file's name."""
    from backend.status import image_file_name

    assert image_file_name("/data/local-files/?d=faces-1a2b3c4d/sub/a%20b.jpg") == "sub/a b.jpg"
    assert image_file_name("http://127.0.0.1:8080/data/local-files/?d=photos-0123abcd/x.png") == "x.png"
    assert image_file_name("/data/local-files/?d=home/ann/x.png") == "home/ann/x.png"  # no faceloop link
    assert image_file_name("/data/upload/3/5f2e9c1a-face.jpg") == "5f2e9c1a-face.jpg"
    assert image_file_name("") == "" and image_file_name(None) == ""


@pytest.mark.e2e
def test_status_link_in_the_label_studio_project(stack):
    """set_status_link puts the link in the instructions (HTML, shown by the labeling view's
    Instructions button) and the description, keeps the person's text, and replaces itself."""
    from label_studio_sdk import LabelStudio

    from backend.lsapi import set_status_link
    from tests.helpers_unit import EXAMPLE_CONFIG

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    # a project linked by an earlier faceloop (no new-tab hint) gets the new link at the next `up`
    old = ('<p><a href="http://127.0.0.1:8/status/1" rel="noopener">faceloop status: training, model '
           'versions, pre-label acceptance</a></p>\n<p>Draw every face.</p>')
    p = client.projects.create(title="linked", label_config=EXAMPLE_CONFIG, description="My faces",
                               expert_instruction=old)
    set_status_link(client, p.id, f"http://127.0.0.1:9/status/{p.id}")
    set_status_link(client, p.id, f"http://127.0.0.1:9090/status/{p.id}")
    q = client.projects.get(id=p.id)
    assert q.description == f"My faces\nfaceloop status: http://127.0.0.1:9090/status/{p.id}"
    assert q.expert_instruction.count("faceloop status") == 1
    assert f'href="http://127.0.0.1:9090/status/{p.id}"' in q.expert_instruction
    # Label Studio 1.23.2 keeps rel but strips target="_blank" (bleach, SAFE_HTML_ATTRIBUTES): the
    # labeller reads how to open the page without losing the edits in the labeling tab
    assert 'rel="noopener noreferrer"' in q.expert_instruction and "target" not in q.expert_instruction
    assert "opens in a new tab and keeps unsaved edits here" in q.expert_instruction
    assert q.expert_instruction.endswith("<p>Draw every face.</p>")
    with pytest.raises(ValueError):
        set_status_link(client, p.id, 'javascript:alert(1)')


def test_learning_curves_are_drawn_from_the_training_records(client, populated, settings):
    """Per-epoch detector box loss and validation mAP50 (ultralytics' results.csv in the model
    store) and the classifier's loss per epoch, as inline SVG next to the confusion matrix."""
    from backend.status import CURVE_H, CURVE_PAD, curve

    with session_scope(settings.database_url) as s:
        v2 = s.get(ModelVersion, populated["v2"])
        m = v2.metrics
        csv_path = Path(m["plots"]["detector results.csv"])
        csv_path.write_text("                  epoch,  train/box_loss,  metrics/mAP50(B)\n"
                            "1,1.5,0.2\n2,1.2,0.5\n3,1.0,0.61\n")  # ultralytics pads its header names
        m["classifier_training"] = {"loss": [0.9, 0.5, float("nan"), 0.3]}
        v2.metrics_json = json.dumps(m)
    html = client.get(f"/status/{PID}").text
    assert "detector box loss (train): 1.5 → 1 over 3 epochs" in html
    assert "detector mAP50 (validation): 0.2 → 0.61 over 3 epochs" in html
    assert "face classifier loss (train): 0.9 → 0.3 over 3 epochs" in html  # the NaN is left out
    assert html.count("<polyline") == 3
    c = curve("x", [0, 1])
    assert c["points"] == f"{CURVE_PAD}.0,{CURVE_H - CURVE_PAD}.0 254.0,{CURVE_PAD}.0"  # higher value up
    assert curve("x", [1]) is None and curve("x", ["a", None]) is None


def test_new_projects_show_their_instructions_and_keep_the_default_tab(stack):
    """Projects faceloop creates open their instructions (with the status link) when a person
    starts labeling; the Review queue view, when it is a project's first view, comes with Label
    Studio's Default tab, which a later refresh neither duplicates nor brings back."""
    from label_studio_sdk import LabelStudio

    from backend.lsapi import create_project, refresh_review_view
    from tests.helpers_unit import EXAMPLE_CONFIG

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    pid = create_project(client, "tabs", EXAMPLE_CONFIG)
    assert client.projects.get(id=pid).show_instruction is True

    def titles():
        return [(v.data or {}).get("title") for v in sorted(client.views.list(project=pid), key=lambda v: v.id)]

    vid = refresh_review_view(client, pid, "Review queue")
    assert titles() == ["Default", "Review queue"]
    assert refresh_review_view(client, pid, "Review queue") == vid and titles() == ["Default", "Review queue"]
    default = next(v for v in client.views.list(project=pid) if (v.data or {}).get("title") == "Default")
    assert list(client.tasks.list(project=pid, view=default.id)) == []  # a working view (no tasks yet)
    client.views.delete(id=default.id)  # the person closed the Default tab: it stays closed
    refresh_review_view(client, pid, "Review queue")
    assert titles() == ["Review queue"]


def test_queue_numbers_tasks_from_its_head(client, settings):
    """The review queue on the status page numbers the tasks left in it from 1: after a person labelled
    the first 25 of a scoring's ranking, its head read "#26 · task 133" (tried as a new user); and
    one box is "1 box"; the count is of predicted boxes (a false box too), so it does not say "faces"."""
    pid = PID + 1
    with session_scope(settings.database_url) as s:
        s.add(Project(id=pid, title="awake", label_config=""))
        for rank, tid in enumerate([11, 12, 13, 14]):
            s.add(TaskScore(project_id=pid, task_id=tid, model_version="v1", uncertainty=0.9 - rank / 10,
                            least_confidence=0.5, margin=0.5, entropy=0.5, n_boxes=1 + (rank == 3), rank=rank))
        for aid, tid in enumerate([11, 12]):  # labelled since the scoring
            s.add(WebhookEvent(project_id=pid, action="ANNOTATION_CREATED", task_id=tid, annotation_id=aid))
    html = client.get(f"/status/{pid}").text
    assert "#1 · task 13<br>" in html and "#2 · task 14<br>" in html and "task 11<" not in html, html
    assert "· 1 box<" in html or "· 1 box " in html
    assert "· 2 boxes" in html and "1 boxes" not in html and not re.search(r"\d faces?\b", html)


def test_shown_figures_are_the_columns_some_version_fills():
    """A boxes project's versions table had an "image acc." column of dashes (tried as a new user);
    a Choices project's has no box columns; before any evaluation every column stays."""
    from backend.status import FIGURES, shown_figures

    def version(cand):
        return ModelVersion(project_id=1, version="v", path="/x", sha256="0", status="promoted",
                            metrics_json=json.dumps({"candidate": cand}))

    boxes = [k for k, _, _ in shown_figures([version(candidate()), version({})])]
    assert "accuracy" not in boxes and "mAP50" in boxes and "false_boxes" in boxes
    choices = [k for k, _, _ in shown_figures([version({"accuracy": 0.667, "class_accuracy": 0.8})])]
    assert choices == ["accuracy", "class_accuracy"]
    assert shown_figures([version({})]) == list(FIGURES) == shown_figures([])


def test_each_stage_shows_its_own_epochs_named_on_the_page_and_the_index(client, settings):
    """A retrain as ml_worker.training reports it (tests/test_jobprogress.py's timeline: 10 detector
    epochs, 40 classifier epochs, evaluation, 20 refit epochs): at each point the page names the
    stage with its own count and its bar follows that stage; no combined count (the row's 13 of 50,
    50 of 50 through the refit) is shown."""
    from tests.test_jobprogress import run, timeline

    ev = timeline()
    with session_scope(settings.database_url) as s:
        s.add(Project(id=PID, title="faces", label_config=""))
        s.flush()
        job = TrainingJob(project_id=PID)
        s.add(job)
        s.flush()
        jid = job.id
    # seconds into the job -> what the card says (3 s setup + 7 s an epoch; classifier from 81 s, 0.7 s
    # an epoch; evaluation at 110 s; refit from 115 s, 0.9 s an epoch)
    for at, text, pct, row in [(28, "detector epoch 3 of 10", 30, "3 of 50"),
                               (85.6, "classifier epoch 5 of 40", 12, "15 of 50"),
                               (112, None, None, "50 of 50"),
                               (117, "classifier refit epoch 2 of 20", 10, "50 of 50")]:
        with session_scope(settings.database_url) as s:
            j = s.get(TrainingJob, jid)
            j.stages_json = "[]"
            run(j, ev, until=at)
            j.started_at = datetime.now(timezone.utc) - timedelta(seconds=at)
            assert f"{j.epoch} of {j.epochs}" == row  # the row's combined count the page used to show
        html = client.get(f"/status/{PID}").text
        card = html[html.index(f'id="job-{jid}"'):html.index("</div>", html.index(f'id="job-{jid}"'))]
        index = client.get("/status").text
        if text is None:  # evaluate: no epochs, the stage alone
            assert "stage <b>evaluate</b>" in card and " epoch " not in card and 'class="bar"' not in card, card
            assert "running · evaluate" in index
        else:
            assert f"<b>{text}</b>" in card and f'style="width: {pct}%"' in card, card
            assert f"running · {text}" in index
        assert row not in card and row not in index

