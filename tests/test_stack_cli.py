"""`faceloop up`'s stack without starting it, and the CLI's answers when it cannot do its job:
per-install secrets, ports, the state file other commands read, unknown projects, Redis down,
`faceloop versions`. No Label Studio or Redis runs here, except in the tests marked e2e (the
``stack`` fixture); tests/browser/ runs the real `faceloop up`."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from pathlib import Path

import pytest
from sqlmodel import select
from typer.testing import CliRunner

from backend import stack
from backend.config import get_settings
from backend.db import session_scope
from backend.lsapi import api_error_text
from backend.models import ModelVersion, Project, TrainingJob
from backend.registry import upsert_project
from tests.helpers_unit import DEAD_BROKER

runner = CliRunner()


def _flat(out: str) -> str:
    """CLI output as one line, without rich's box drawing (long messages wrap inside a box)."""
    return " ".join(out.replace("│", " ").split())


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_secrets_are_random_private_and_kept(tmp_path):
    a, created = stack.load_secrets(tmp_path)
    assert created and _mode(tmp_path / "secrets.json") == 0o600
    assert set(a) == {"ls_user", "ls_password", "basic_auth_user", "basic_auth_pass", "webhook_secret",
                      "ls_secret_key", "instance_id"}
    assert len(a["ls_password"]) >= 20 and len(a["webhook_secret"]) >= 32
    # Label Studio's SECRET_KEY: long, and without "$" or "#", which its .env reader misreads
    assert len(a["ls_secret_key"]) >= 50 and not set(a["ls_secret_key"]) & set("$# '\"")
    b, created = stack.load_secrets(tmp_path)
    assert b == a and not created  # the next start keeps them
    c, _ = stack.load_secrets(tmp_path / "other")
    assert c["ls_password"] != a["ls_password"] and c["webhook_secret"] != a["webhook_secret"]


def test_write_private_replaces_with_0600(tmp_path):
    p = tmp_path / "f.json"
    p.write_text("old")
    os.chmod(p, 0o644)
    stack.write_private(p, "new")
    assert p.read_text() == "new" and _mode(p) == 0o600


def test_ports_usual_else_last_else_free(tmp_path):
    st = stack.Stack(root=tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    try:
        (tmp_path / "stack.json").write_text(json.dumps({"ports": {"label-studio": taken}}))
        st._choose_ports({}, stable=True)
        assert st.ports["label-studio"] != taken  # the last run's port is busy: another one
        assert len(set(st.ports.values())) == 3
        with pytest.raises(stack.StackError, match=f"port {taken} asked for backend is in use"):
            stack.Stack(root=tmp_path)._choose_ports({"backend": taken}, stable=True)
        free = stack.free_port()
        (tmp_path / "stack.json").write_text(json.dumps({"ports": {"redis": free}}))
        st2 = stack.Stack(root=tmp_path)
        st2._choose_ports({}, stable=True)
        assert st2.ports["redis"] == free  # stable across restarts
    finally:
        busy.close()


def test_running_stack_needs_live_processes(tmp_path):
    state = {"running": True, "pids": {"redis": os.getpid(), "label-studio": os.getpid()}}
    (tmp_path / "stack.json").write_text(json.dumps(state))
    assert stack.running_stack(tmp_path)["running"]
    state["pids"]["label-studio"] = 2 ** 22 + 12345  # no such process
    (tmp_path / "stack.json").write_text(json.dumps(state))
    assert stack.running_stack(tmp_path) is None
    assert stack.running_stack(tmp_path / "none") is None


def test_start_on_a_running_stack_says_what_to_do(tmp_path):
    """A second `faceloop up FOLDER` while the first runs (the README's "Several folders, one
    stack") is refused, saying how to get both projects served: stop the first, run this again."""
    state = {"running": True, "ls_url": "http://127.0.0.1:8080",
             "pids": {"redis": os.getpid(), "label-studio": os.getpid()}}
    (tmp_path / "stack.json").write_text(json.dumps(state))
    with pytest.raises(stack.StackError) as e:
        stack.Stack.start(tmp_path)
    msg = str(e.value)
    assert "already running" in msg and "Ctrl-C" in msg and "run this command again" in msg
    assert "earlier ones" in msg


def test_up_on_a_running_stack_is_refused_before_starting_anything(tmp_path, monkeypatch):
    """`faceloop up OTHER_FOLDER --root R` while R's stack runs (a person adding a second folder):
    exit 1 with what to do, and nothing that looks like a start (no "starting redis-server ...")
    nor a link of the folder made in R/media (it came before the refusal)."""
    monkeypatch.setenv("VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    from backend.cli import app

    root, faces = tmp_path / "stack", tmp_path / "faces"
    root.mkdir()
    faces.mkdir()
    (faces / "a.jpg").write_bytes(b"x")
    state = {"running": True, "ls_url": "http://127.0.0.1:8080", "document_root": str(root / "media"),
             "pids": {"redis": os.getpid(), "label-studio": os.getpid()}}
    (root / "stack.json").write_text(json.dumps(state))
    try:
        r = runner.invoke(app, ["up", str(faces), "--root", str(root)])
    finally:
        get_settings.cache_clear()
    out = _flat(r.output)
    assert r.exit_code == 1, r.output
    assert "already running" in out and "Ctrl-C" in out and "run this command again" in out
    assert "starting" not in out, r.output
    assert not (root / "media").exists() or not any((root / "media").iterdir())


@pytest.fixture()
def cli_env(tmp_path, monkeypatch):
    """A VAR_DIR of our own, Label Studio unreachable, Redis down."""
    for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "CELERY_BROKER_URL", "DATABASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("VAR_DIR", str(tmp_path))
    monkeypatch.setenv("CELERY_BROKER_URL", DEAD_BROKER)
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:1")
    get_settings.cache_clear()
    from backend.cli import app

    yield app, f"sqlite:///{tmp_path / 'faceloop.db'}"
    get_settings.cache_clear()


def _recorded(db, pid):
    with session_scope(db) as s:
        return (s.exec(select(TrainingJob).where(TrainingJob.project_id == pid)).all(),
                s.exec(select(ModelVersion).where(ModelVersion.project_id == pid)).all())


@pytest.mark.parametrize("cmd", ["versions", "jobs", "train", "queue", "score"])
def test_unknown_project_exits_1_and_records_nothing(cli_env, cmd, monkeypatch):
    app, db = cli_env
    r = runner.invoke(app, [cmd, "999"])
    assert r.exit_code == 1, r.output
    assert "project 999 is unknown to faceloop" in _flat(r.output) and "Traceback" not in r.output
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-a-real-key")
    get_settings.cache_clear()
    r = runner.invoke(app, [cmd, "999"])
    assert r.exit_code == 1 and "could not be asked" in _flat(r.output), r.output
    assert "headers" not in r.output.lower() and "cookie" not in r.output.lower()
    assert _recorded(db, 999) == ([], [])


def test_train_with_redis_down_exits_1_without_a_job(cli_env):
    app, db = cli_env
    with session_scope(db) as s:
        upsert_project(s, 5)
    r = runner.invoke(app, ["train", "5"])
    assert r.exit_code == 1, r.output
    assert "cannot be reached" in _flat(r.output) and "no job recorded" in _flat(r.output)
    assert "'queued': True" not in r.output
    assert _recorded(db, 5)[0] == []
    r = runner.invoke(app, ["score", "5"])
    assert r.exit_code == 1 and "cannot be reached" in _flat(r.output)


def test_train_says_which_job_was_queued_and_where_to_follow_it(cli_env, tmp_path, monkeypatch):
    """`faceloop train` printed a raw dict ({'job': '6', 'queued': True, ...}); it says in a sentence
    which job was queued or joined, where to follow it, and, while another job trains, when the new
    one is skipped. --json keeps the dict, as JSON, for scripts. A real redis-server (no worker)."""
    import shutil

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh installs it)")
    from backend.stack import SECRETS_FILE
    from backend.status import status_link
    from tests.faults.conftest import RedisServer, free_port

    app, db = cli_env
    red = RedisServer(free_port(), tmp_path)
    try:
        monkeypatch.setenv("CELERY_BROKER_URL", red.url)
        root = get_settings().var_dir / "stack"
        root.mkdir(parents=True)
        (root / SECRETS_FILE).write_text(json.dumps({"webhook_secret": "k"}))
        (root / "stack.json").write_text(json.dumps({
            "running": True, "pids": {"redis": os.getpid(), "label-studio": os.getpid()}, "root": str(root),
            "backend_url": "http://127.0.0.1:19090", "projects": [{"id": 5, "folder": "/b"}]}))
        get_settings.cache_clear()
        with session_scope(db) as s:
            upsert_project(s, 5)
        r = runner.invoke(app, ["train", "5"], env={"COLUMNS": "250"})
        assert r.exit_code == 0, r.output
        (job,) = _recorded(db, 5)[0]
        link = status_link("http://127.0.0.1:19090", 5, "k")
        assert r.output.strip() == f"job {job.id} queued (project 5); follow it on {link} or `faceloop jobs 5`"
        assert "{" not in r.output
        r = runner.invoke(app, ["train", "5", "--json"], env={"COLUMNS": "250"})
        assert r.exit_code == 0 and json.loads(r.output) == {"job": str(job.id), "queued": False,
                                                             "joined_existing": True}, r.output
        with session_scope(db) as s:  # the queued job starts; a new request while it trains
            s.get(TrainingJob, job.id).state = "running"
        r = runner.invoke(app, ["train", "5"], env={"COLUMNS": "250"})
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert lines[0] == f"job {job.id + 1} queued (project 5); follow it on {link} or `faceloop jobs 5`"
        assert lines[1] == (f"job {job.id} is training now: job {job.id + 1} is skipped if job {job.id} succeeds "
                            f"and no annotation is created, updated or deleted since job {job.id}'s snapshot")
        r = runner.invoke(app, ["train", "5"], env={"COLUMNS": "250"})
        assert r.output.startswith(f"joined job {job.id + 1}, already queued (project 5); follow it on "), r.output
    finally:
        red.stop()


def test_up_on_a_file_or_missing_folder(cli_env, tmp_path):
    app, _ = cli_env
    f = tmp_path / "face.jpg"
    f.write_bytes(b"x")
    r = runner.invoke(app, ["up", str(f)])
    assert r.exit_code == 2 and "is a file, not a folder" in _flat(r.output)
    r = runner.invoke(app, ["up", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in _flat(r.output)
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["up", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no images" in _flat(r.output)


def test_up_refuses_a_folder_outside_the_document_root(cli_env, tmp_path):
    app, _ = cli_env
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "stack.json").write_text(json.dumps({"document_root": str(tmp_path / "a")}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jpg").write_bytes(b"x")
    r = runner.invoke(app, ["up", str(tmp_path / "b")])
    assert r.exit_code == 2 and "is not inside" in _flat(r.output), r.output
    assert "--root" in _flat(r.output)  # what to do: a separate stack


def test_api_error_text_drops_headers_and_cookies():
    from label_studio_sdk.core.api_error import ApiError

    e = ApiError(status_code=404, headers={"set-cookie": "sessionid=secret123", "server": "x"},
                 body={"detail": "Not found."})
    assert "sessionid" in str(e)  # what used to be printed
    assert api_error_text(e) == "HTTP 404: Not found."


def test_versions_shows_image_accuracy_for_a_choices_project_and_its_acceptance(cli_env):
    """A Choices project's versions are gated on image accuracy (ml_worker.training.gate_choices):
    `faceloop versions` shows it in its own column, and the choices' pre-label acceptance."""
    from backend.acceptance import Counts, store

    app, db = cli_env
    with session_scope(db) as s:
        upsert_project(s, 5)
        s.add(ModelVersion(project_id=5, version="faceloop-base", path="/x/base.pt", sha256="0", status="retired",
                           gate_reason="base model"))
        s.add(ModelVersion(project_id=5, version="p5-v1", path="/x/v1.json", sha256="0", status="promoted",
                           gate_reason="image accuracy 0.667 >= current 0.000 on the same 3 validation images",
                           metrics_json=json.dumps({"candidate": {"accuracy": 0.6667, "class_accuracy": 0.8,
                                                                  "no_choice": 1}, "n_train": 13, "n_val": 3,
                                                    "kind": "choices"})))
    store(get_settings(), 5, {"p5-v1": Counts(annotations=4, choices_predicted=4, choices_accepted=3,
                                              choices_changed=1)})
    r = runner.invoke(app, ["versions", "5"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    out = r.output
    assert "image acc." in out and "0.667" in out and "mAP50" not in out  # no box figures for a Choices project
    assert "13/3" in out and "image-level choices" in out and "75.0" in out  # 3 of 4 choices kept
    # a boxes project keeps its box columns, without an image accuracy column
    with session_scope(db) as s:
        upsert_project(s, 6)
        s.add(ModelVersion(project_id=6, version="p6-v1", path="/x/v1.json", sha256="0", status="promoted",
                           gate_reason="mAP50", metrics_json=json.dumps({"candidate": {"mAP50": 0.712}})))
    r = runner.invoke(app, ["versions", "6"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "0.712" in r.output and "image acc." not in r.output, r.output


def test_versions_says_what_the_shipped_default_names_in_each_project(cli_env):
    """A new user read the shipped default's expression classes (neutral, happy, ...) in the row of
    an awake/sleep project and asked why they were there: the default row now says it finds faces
    only there, and in an expression project which of the project's labels it names (by name)."""
    from backend.registry import promoted_version
    from tests.helpers_unit import config_text

    app, db = cli_env
    with session_scope(db) as s:
        for pid, cfg in ((3, "awake_sleep"), (4, "face_expressions")):
            upsert_project(s, pid, label_config=config_text(cfg))
            base = promoted_version(s, pid, get_settings()).version  # registered as a project's first /predict does
    assert base.startswith("base-")
    r = runner.invoke(app, ["versions", "3"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    row = " ".join(next(ln for ln in r.output.splitlines() if base in ln).replace("│", " ").split())
    assert "– faces only (knows neutral, happy, sad, …: none of this project's)" in row, r.output
    assert "angry" not in r.output and "fearful" not in r.output  # not the default's class list as the project's
    r = runner.invoke(app, ["versions", "4"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    row = " ".join(next(ln for ln in r.output.splitlines() if base in ln).replace("│", " ").split())
    # fearful/disgusted/surprised matched to fear/disgust/surprise; contempt: no class of the default
    assert "neutral, happy, sad, surprise, fear, disgust, angry by name; not: contempt" in row, r.output
    # 80 columns: the classes column is left out, the default row's classes come below the table
    r = runner.invoke(app, ["versions", "3"], env={"COLUMNS": "80"})
    assert r.exit_code == 0 and all(len(ln) <= 80 for ln in r.output.splitlines()), r.output
    assert "classes: – faces only (knows neutral, happy, sad, …: none of this project's)" in _flat(r.output), r.output


@pytest.mark.e2e
def test_up_turns_on_show_before_labeling_once_for_an_existing_project(stack):
    """A project made before faceloop turned "Show before labeling" on at creation: `up`'s status-link
    step turns it on (once: a person who switches it off later keeps it off) on a real Label Studio."""
    from label_studio_sdk import LabelStudio

    from backend.cli import _link_status_page
    from backend.lsapi import create_project
    from tests.helpers_unit import EXAMPLE_CONFIG

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    old = client.projects.create(title="made by an older faceloop", label_config=EXAMPLE_CONFIG)
    assert client.projects.get(id=old.id).show_instruction is False
    entry: dict = {"id": old.id}
    url = f"http://127.0.0.1:9090/status/{old.id}?token=abc"
    assert _link_status_page(client, old.id, url, entry) is True
    p = client.projects.get(id=old.id)
    assert p.show_instruction is True and "faceloop status" in p.expert_instruction
    assert entry["show_instruction_set"] is True
    client.projects.update(id=old.id, show_instruction=False)  # the person's choice, kept by the next `up`
    assert _link_status_page(client, old.id, url, entry) is False
    assert client.projects.get(id=old.id).show_instruction is False
    new = create_project(client, "made now", EXAMPLE_CONFIG)
    assert _link_status_page(client, new, url, {}) is False  # on since creation: nothing to say


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_up_stops_on_signals_even_when_started_with_sigint_ignored(sig):
    """A script that starts ``faceloop up`` in the background (``nohup faceloop up &``) hands it
    SIGINT ignored; ``_stop_on_signals`` must still turn SIGINT, SIGTERM and SIGHUP into the
    clean stop (KeyboardInterrupt -> ``Stack.stop``)."""
    import signal as _signal
    import subprocess
    import sys

    code = ("import time\nfrom backend.cli import _stop_on_signals\n_stop_on_signals()\n"
            "try:\n    print('ready', flush=True)\n    time.sleep(30)\nexcept KeyboardInterrupt:\n"
            "    print('stopped', flush=True)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: _signal.signal(_signal.SIGINT, _signal.SIG_IGN))
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(getattr(_signal, sig))
        out, _ = p.communicate(timeout=20)
    finally:
        p.kill()
    assert out.strip() == "stopped" and p.returncode == 0


def test_stored_pat_is_checked_against_label_studio():
    """A PAT that Label Studio refuses (signed with an earlier SECRET_KEY) is not reused:
    ``_token_accepted`` asks ``/api/token/refresh/`` (a loopback stand-in answering 200 or 401)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body["refresh"]))
            self.send_response(200 if body["refresh"] == "a.good.jwt" else 401)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert stack._token_accepted(url, "a.good.jwt")
        assert not stack._token_accepted(url, "an.old.jwt")
        assert stack._token_accepted(url, "legacytoken40hex")  # legacy keys are not JWTs: kept, not sent
    finally:
        srv.shutdown()
    assert seen == [("/api/token/refresh/", "a.good.jwt"), ("/api/token/refresh/", "an.old.jwt")]


def test_prune_lists_first_and_deletes_with_yes(cli_env, tmp_path):
    """`faceloop prune` shows what it would free; `--yes` frees it (a rejected version's weights)."""
    import modelstore

    app, db = cli_env
    w = tmp_path / "w"
    w.mkdir()
    (w / "detector.pt").write_bytes(b"w" * 2_000_000)
    (w / "bundle.json").write_text("{}")
    with session_scope(db) as s:
        upsert_project(s, 5)
        modelstore.store_folder(s, 5, "p5-v2", w)
        s.add(ModelVersion(project_id=5, version="p5-v2", path=str(w / "bundle.json"), sha256="0", status="rejected"))
    r = runner.invoke(app, ["prune"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "p5-v2" in r.output and "detector.pt" in r.output and "2.0 MB to free" in r.output
    with session_scope(db) as s:
        assert [n for n, *_ in modelstore.listing(s, 5, "p5-v2")] == ["bundle.json", "detector.pt"]
    r = runner.invoke(app, ["prune", "--yes"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "2.0 MB freed" in r.output, r.output
    with session_scope(db) as s:
        assert [n for n, *_ in modelstore.listing(s, 5, "p5-v2")] == ["bundle.json"]


def test_db_copy_copies_into_an_empty_database_and_refuses_a_full_one(cli_env, tmp_path):
    app, db = cli_env
    with session_scope(db) as s:
        upsert_project(s, 5)
    target = f"sqlite:///{tmp_path / 'new.db'}"
    r = runner.invoke(app, ["db-copy", target], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "project: 1 rows" in r.output and "copied" in r.output
    with session_scope(target) as s:
        assert s.get(Project, 5) is not None
    r = runner.invoke(app, ["db-copy", target], env={"COLUMNS": "200"})
    assert r.exit_code == 1 and "already holds" in r.output, r.output


def test_document_root_new_stack_is_its_media_folder_and_links_each_folder(tmp_path):
    from typer import BadParameter

    from backend.cli import _choose_document_root, _media_link

    root = tmp_path / "stack"
    a, b = tmp_path / "shared" / "faces", tmp_path / "elsewhere" / "faces"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    media = root / "media"
    assert _choose_document_root(a, None, None, root) == media  # new stack
    assert _choose_document_root(b, None, str(media), root) == media  # any later folder, same root
    la, lb = _media_link(media, a), _media_link(media, b)
    assert la.parent == lb.parent == media and la != lb and la.name.startswith("faces-")
    assert la.resolve() == a and lb.resolve() == b
    assert _media_link(media, a) == la  # stable: the same link next time
    # a stack made before: its recorded root (a folder of the user's) stays; another folder is
    # refused with what to do, naming --root
    assert _choose_document_root(a, None, str(tmp_path / "shared"), root) == tmp_path / "shared"
    with pytest.raises(BadParameter, match="--root"):
        _choose_document_root(b, None, str(tmp_path / "shared"), root)
    with pytest.raises(BadParameter, match="not inside --document-root"):
        _choose_document_root(b, tmp_path / "shared", None, root)


def test_stack_var_dir_own_for_root_unless_set(tmp_path, monkeypatch):
    from backend.cli import _stack_var_dir

    default = tmp_path / "var"
    monkeypatch.delenv("VAR_DIR", raising=False)
    assert _stack_var_dir(tmp_path / "other", default) == tmp_path / "other" / "var"  # --root DIR: DIR/var
    assert _stack_var_dir((default / "stack").resolve(), default) == default
    monkeypatch.setenv("VAR_DIR", str(default))
    assert _stack_var_dir(tmp_path / "other", default) == default  # set explicitly: it wins


def test_project_of_another_label_studio_is_refused(tmp_path):
    from backend.registry import ProjectOfAnotherLabelStudio

    db = f"sqlite:///{tmp_path / 'f.db'}"
    with session_scope(db) as s:
        upsert_project(s, 1, title="awake", ls_instance="aaaa")
    with session_scope(db) as s:
        with pytest.raises(ProjectOfAnotherLabelStudio, match="belongs to another Label Studio"):
            upsert_project(s, 1, title="expressions", ls_instance="bbbb")
        upsert_project(s, 1, title="awake 2", ls_instance="aaaa")  # the same instance (a restart)
        upsert_project(s, 2, title="legacy")  # no instance known: no check, no claim
    with session_scope(db) as s:
        assert s.get(Project, 1).title == "awake 2" and s.get(Project, 1).ls_instance == "aaaa"
        assert s.get(Project, 2).ls_instance == ""
        upsert_project(s, 2, ls_instance="bbbb")  # the first instance that sets it up claims it
    with session_scope(db) as s:
        assert s.get(Project, 2).ls_instance == "bbbb"


def test_stop_stops_redis_after_the_other_services(tmp_path):
    """Ctrl-C under `faceloop up`: the worker, the backend and Label Studio are gone before Redis
    gets its SIGTERM, so a worker that stops in the middle of a training still reaches its broker
    (a new user's job was failed with "Error 111 connecting to 127.0.0.1:6379")."""
    import subprocess
    import sys
    import time

    from backend.stack import Stack

    prog = ("import signal, sys, time\n"
            "def term(*_):\n"
            "    time.sleep(float(sys.argv[2]))\n"
            "    open(sys.argv[1], 'a').write(f'{time.time():.6f}\\n')\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, term)\n"
            "open(sys.argv[1] + '.ready', 'w').close()\n"
            "while True: time.sleep(0.05)\n")
    st = Stack(root=tmp_path)
    started = []
    try:
        for name, linger in (("redis", 0.0), ("label-studio", 0.2), ("backend", 0.2), ("worker", 1.0)):
            st.procs[name] = subprocess.Popen([sys.executable, "-c", prog, str(tmp_path / name), str(linger)],
                                              start_new_session=True)
            started.append(st.procs[name])
        deadline = time.time() + 30
        while not all((tmp_path / f"{n}.ready").exists() for n in st.procs) and time.time() < deadline:
            time.sleep(0.05)
        st.stop()
    finally:
        for p in started:  # nothing left behind if the test fails before or in stop()
            if p.poll() is None:
                p.kill()
                p.wait(10)
    ended = {n: float((tmp_path / n).read_text()) for n in ("redis", "label-studio", "backend", "worker")}
    assert ended["redis"] > max(ended["worker"], ended["backend"], ended["label-studio"]), ended
    assert not st.procs


def test_other_commands_find_a_root_stack_by_its_var_dir(tmp_path, monkeypatch):
    # `faceloop up --root DIR` keeps its state in DIR/var: `VAR_DIR=DIR/var faceloop queue 1`
    # finds its Label Studio and Redis in DIR/stack.json
    from backend.cli import _use_running_stack

    for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "CELERY_BROKER_URL"):
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "second"
    (d / "var").mkdir(parents=True)
    state = {"running": True, "pids": {"redis": os.getpid(), "label-studio": os.getpid()},
             "ls_url": "http://127.0.0.1:18080", "redis_url": "redis://127.0.0.1:16379/0", "var_dir": str(d / "var")}
    (d / "stack.json").write_text(json.dumps(state))
    monkeypatch.setenv("VAR_DIR", str(d / "var"))
    get_settings.cache_clear()
    try:
        assert _use_running_stack()["ls_url"] == "http://127.0.0.1:18080"
        assert os.environ["LABEL_STUDIO_URL"] == "http://127.0.0.1:18080"
        monkeypatch.delenv("LABEL_STUDIO_URL")
        state["var_dir"] = str(tmp_path / "elsewhere")  # a stack whose state is not this VAR_DIR
        (d / "stack.json").write_text(json.dumps(state))
        assert _use_running_stack() is None
    finally:
        get_settings.cache_clear()


def test_default_title_tells_folders_of_the_same_name_apart():
    """Two projects of `faceloop up` on awake_sleep/images/val and expressions/images/val were both
    "faces: val" in Label Studio's project list (found by trying faceloop as a new user)."""
    from backend.cli import default_title

    a = default_title(Path("/work/shared/data/awake_sleep/images/val"))
    b = default_title(Path("/work/shared/data/expressions/images/val"))
    assert (a, b) == ("faces: awake_sleep/images/val", "faces: expressions/images/val")
    assert default_title(Path("/photos")) == "faces: photos"
    long = default_title(Path("/data/" + "x" * 80 + "/day 2/my faces ü"))
    assert len(long) == 50 and long.startswith("faces: …") and long.endswith("/day 2/my faces ü")


def _promote_a_version(s, pid: int) -> None:
    """Project ``pid`` with a promoted version ``p<pid>-v1`` (a row only: no weights behind it)."""
    p = upsert_project(s, pid)
    v = ModelVersion(project_id=pid, version=f"p{pid}-v1", path="/x/v1.json", sha256="0", status="promoted",
                     gate_reason="mAP50")
    s.add(v)
    s.flush()
    p.promoted_version_id = v.id
    s.add(p)


def test_queue_leaves_out_tasks_labelled_since_scoring(cli_env):
    """`faceloop queue` listed tasks a person had labelled after the pool was scored (tried as a new
    user: the first 6 rows were the 6 tasks just labelled); the status page and Label Studio's
    Review queue leave them out. It leaves them out too, on their annotation webhooks."""
    from backend.models import TaskScore, WebhookEvent

    app, db = cli_env
    with session_scope(db) as s:
        _promote_a_version(s, 8)
        for rank, tid in enumerate([46, 64, 202, 167]):
            s.add(TaskScore(project_id=8, task_id=tid, model_version="p8-v1", uncertainty=0.98 - rank / 100,
                            least_confidence=0.9, margin=0.9, entropy=0.9, n_boxes=1, rank=rank))
        s.add(WebhookEvent(project_id=8, action="ANNOTATION_CREATED", annotation_id=1, task_id=46))
        s.add(WebhookEvent(project_id=8, action="ANNOTATION_UPDATED", annotation_id=2, task_id=202))
        s.add(WebhookEvent(project_id=8, action="PROJECT_UPDATED", task_id=167))  # not an annotation
    r = runner.invoke(app, ["queue", "8"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    rows = [line.split("│") for line in r.output.splitlines() if line.count("│") > 3]
    assert [int(c[2]) for c in rows] == [64, 167], r.output
    assert [int(c[1]) for c in rows] == [1, 2], r.output  # places in the queue now, from 1 (not the stored ranks 1, 3)
    header = next(line for line in r.output.splitlines() if "entropy" in line)
    assert "boxes" in header and "faces" not in header, r.output  # predicted boxes, a false one too


def test_status_prints_each_projects_link_and_last_job(cli_env):
    """`faceloop status` (a new user looked for it): the running stack's projects with the version
    served, the jobs, and the status page's one-click link (the project's token, as `up` prints it); exit 1 with
    what to do when no stack runs."""
    from backend.stack import SECRETS_FILE
    from backend.status import status_link

    app, db = cli_env
    r = runner.invoke(app, ["status"], env={"COLUMNS": "250"})
    assert r.exit_code == 1 and "no stack is running" in _flat(r.output) and "faceloop up" in r.output, r.output
    assert "VAR_DIR=DIR/var faceloop status" in _flat(r.output), "a --root stack: where to point it"
    root = get_settings().var_dir / "stack"
    root.mkdir(parents=True)
    (root / SECRETS_FILE).write_text(json.dumps({"webhook_secret": "s3cret-key"}))
    state = {"running": True, "pids": {"redis": os.getpid(), "label-studio": os.getpid()}, "root": str(root),
             "ls_url": "http://127.0.0.1:18080", "redis_url": "redis://127.0.0.1:16379/0",
             "backend_url": "http://127.0.0.1:19090",
             "projects": [{"id": 3, "folder": "/photos/a"}, {"id": 5, "folder": "/photos/b"}]}
    (root / "stack.json").write_text(json.dumps(state))
    with session_scope(db) as s:
        upsert_project(s, 5)
        s.add(TrainingJob(project_id=5, trigger="start_training", state="running", stage="train detector"))
    r = runner.invoke(app, ["status"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[:3] == ["project 3 (/photos/a)", "  serving: the shipped default model (no version promoted yet)",
                         "  no training yet"], r.output
    assert lines[3].strip() == status_link("http://127.0.0.1:19090", 3, "s3cret-key") and "?token=" in lines[3]
    assert lines[4] == "project 5 (/photos/b)"
    assert lines[6].startswith("  running: job ") and lines[6].endswith(", train detector"), r.output
    assert lines[7].strip() == status_link("http://127.0.0.1:19090", 5, "s3cret-key")
    r = runner.invoke(app, ["status", "5"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "project 3" not in r.output and "/status/5?token=" in r.output, r.output
    r = runner.invoke(app, ["status", "9"], env={"COLUMNS": "250"})
    assert r.exit_code == 1 and "its projects: 3, 5" in _flat(r.output), r.output


def test_status_shows_the_served_version_and_running_job_not_only_the_latest(cli_env):
    """A new user saw "job 2 queued" while job 1 was training, and "job 7 skipped" while job 6 had
    just promoted p5-v4: `faceloop status` gives the version served (when, by which job, why), the
    running job with its stage, epoch and time left (backend.jobprogress), and the latest job."""
    from datetime import datetime, timedelta, timezone

    from backend.jobprogress import record
    from backend.stack import SECRETS_FILE

    app, db = cli_env
    root = get_settings().var_dir / "stack"
    root.mkdir(parents=True)
    (root / SECRETS_FILE).write_text(json.dumps({"webhook_secret": "k"}))
    (root / "stack.json").write_text(json.dumps({
        "running": True, "pids": {"redis": os.getpid(), "label-studio": os.getpid()}, "root": str(root),
        "backend_url": "http://127.0.0.1:19090", "projects": [{"id": 3, "folder": "/a"}, {"id": 5, "folder": "/b"}]}))
    now = datetime.now(timezone.utc)
    with session_scope(db) as s:
        upsert_project(s, 3)
        j1 = TrainingJob(project_id=3, trigger="cli", state="running", started_at=now - timedelta(seconds=40))
        for ago, f in ((40, {"stage": "train", "epochs": 50, "plan": [{"stage": "train detector", "epochs": 10},
                                                                      {"stage": "train classifier", "epochs": 40}]}),
                       (30, {"stage": "train detector", "epoch": 0}),
                       (20, {"stage": "train detector", "epoch": 1, "stage_epoch": 1, "stage_epochs": 10}),
                       (0, {"stage": "train detector", "epoch": 3, "stage_epoch": 3, "stage_epochs": 10})):
            for k, v in record(j1, f, now=now - timedelta(seconds=ago)).items():
                setattr(j1, k, v)
        s.add(j1)
        s.flush()
        s.add(TrainingJob(project_id=3, trigger="cli", state="queued"))
        p5 = upsert_project(s, 5)
        j6 = TrainingJob(project_id=5, trigger="cli", state="succeeded", stage="done")
        s.add(j6)
        s.flush()
        v = ModelVersion(project_id=5, version="p5-v4", path="/x/v4.json", sha256="0", status="promoted",
                         gate_reason="mAP50 0.612 >= 0.580 + 0.005", training_job_id=j6.id,
                         promoted_at=datetime(2026, 11, 30, 23, 10, tzinfo=timezone.utc))
        s.add(v)
        s.flush()
        p5.promoted_version_id = v.id
        s.add(TrainingJob(project_id=5, trigger="cli", state="skipped", stage="skipped",
                          message="no annotation created, updated or deleted since job 6's snapshot"))
        ids = (j1.id, j6.id)
    r = runner.invoke(app, ["status"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "project 3 (/a)"
    # the stage's own epochs, named (as the status page): not the row's 3/50 (detector and classifier
    # together) beside "train detector (10 epochs)", two scales a new user could not tell apart
    assert lines[2].startswith(f"  running: job {ids[0]}, detector epoch 3 of 10; train detector: about "), r.output
    assert "3/50" not in r.output and "3 of 50" not in r.output
    assert "s left, then train classifier (40 epochs)" in lines[2], r.output
    assert lines[3] == f"  latest: job {ids[0] + 1} queued", r.output
    assert "/status/3?token=" in lines[4]
    assert lines[6] == (f"  serving: p5-v4 (promoted 2026-11-30 23:10 UTC by job {ids[1]}: "
                        "mAP50 0.612 >= 0.580 + 0.005)"), r.output
    assert lines[7] == (f"  latest: job {ids[1] + 1} skipped (no annotation created, updated or deleted since "
                        "job 6's snapshot)"), r.output
    assert "/status/5?token=" in lines[8]
    # `faceloop jobs`: the epoch column counts the epochs of the stage beside it, at 80 columns too
    for cols in (250, 80):
        r = runner.invoke(app, ["jobs", "3"], env={"COLUMNS": str(cols)})
        assert r.exit_code == 0, r.output
        rows = {ln.split()[0]: " ".join(ln.split()) for ln in r.output.replace("│", " ").splitlines()
                if ln.split() and ln.split()[0].isdigit()}
        assert "running train detector 3/10 " in rows[str(ids[0])] and "3/50" not in r.output, r.output
        assert "queued – " in rows[str(ids[0] + 1)], r.output  # no stage, no epochs yet (was "0/0")


def test_queue_shows_the_query_batch_first_with_the_scores_label_studio_holds(cli_env):
    """`faceloop queue` lists the query batch first (its stored ranks) and its *LS score* column is
    the score written to Label Studio: below 0.001 for the batch, ``1 - uncertainty`` (within 0.001)
    for the rest, so the column sorts like Label Studio's Review queue."""
    from backend.models import TaskScore

    app, db = cli_env
    with session_scope(db) as s:
        _promote_a_version(s, 9)
        # ranks as ml_worker.scoring.rerank leaves them: the batch (two fairly certain tasks) first
        for rank, (tid, u, flagged) in enumerate([(31, 0.20, True), (32, 0.10, True), (33, 0.95, False),
                                                  (34, 0.40, False)]):
            s.add(TaskScore(project_id=9, task_id=tid, model_version="p9-v1", uncertainty=u, least_confidence=u,
                            margin=u, entropy=u, n_boxes=1, rank=rank, in_query_batch=flagged))
    r = runner.invoke(app, ["queue", "9"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    rows = [[c.strip() for c in line.split("│")] for line in r.output.splitlines() if line.count("│") > 3]
    assert [int(c[2]) for c in rows] == [31, 32, 33, 34], r.output
    # the batch's scores (0 and 0.0005 here) print as "<0.001": 0.0005 rounded to 3 decimals read as the
    # first non-batch task's 0.001 (a new user's trial)
    assert [c[4] for c in rows[:2]] == ["<0.001", "<0.001"], r.output
    ls_scores = [float(c[4]) for c in rows[2:]]
    assert ls_scores == [pytest.approx(0.05, abs=0.002), pytest.approx(0.6, abs=0.002)], r.output
    assert [c[-2] for c in rows] == ["yes", "yes", "", ""], r.output


def test_up_tries_the_tasks_that_failed_again(tmp_path, monkeypatch):
    """The tasks whose last pre-annotation failed (a new user's links, replaced by copies) are the ones
    `faceloop up` sends for scoring again when no task is new: only the served version's failures,
    not the scored ones nor an older version's."""
    monkeypatch.setenv("VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    try:
        from backend import registry
        from backend.cli import _db, _unscored_tasks
        from backend.models import TaskScore

        assert _unscored_tasks(3) == [], "a project faceloop has not seen: nothing to try"
        with _db() as s:
            registry.upsert_project(s, 3)
            v = registry.promoted_version(s, 3, get_settings()).version
            row = dict(project_id=3, uncertainty=1.0, least_confidence=1.0, margin=1.0, entropy=1.0)
            s.add(TaskScore(task_id=11, model_version=v, error="local file 'a.jpg' is a link to a file outside", **row))
            s.add(TaskScore(task_id=12, model_version=v, **row))
            s.add(TaskScore(task_id=13, model_version="p3-v1", error="old version's failure", **row))
            s.add(TaskScore(task_id=14, model_version=v, error="broken image data", **row))
        assert _unscored_tasks(3) == [11, 14]
    finally:
        get_settings.cache_clear()
