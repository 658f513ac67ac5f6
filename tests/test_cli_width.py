"""`faceloop jobs`, `versions`, `queue` and `--help` as a person reads them in an 80-column terminal:
every row on one line, no number cut or wrapped, nothing wider than the terminal; a wide terminal
keeps every column. Rendered by rich at ``COLUMNS`` (its Console reads it at each print)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from backend.config import get_settings
from backend.db import session_scope
from backend.models import ModelVersion, Project, TaskScore, TrainingJob
from backend.registry import upsert_project
from tests.helpers_unit import DEAD_BROKER

runner = CliRunner()
PID = 5
GATE = "mAP50 0.712 >= current 0.645 on the same 12 validation images"
ERROR = "RuntimeError: CUDA out of memory while training the detector on 1234 images"


@pytest.fixture()
def cli(tmp_path, monkeypatch):
    """The CLI on a database of our own holding a project with long-named versions, jobs and scores."""
    for k in ("LABEL_STUDIO_API_KEY", "DATABASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("VAR_DIR", str(tmp_path))
    monkeypatch.setenv("CELERY_BROKER_URL", DEAD_BROKER)
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:1")
    get_settings.cache_clear()
    from backend.cli import app

    with session_scope(get_settings().database_url) as s:
        upsert_project(s, PID)
        s.add(ModelVersion(project_id=PID, version="base-e4418e99", path="/x/base.pt", sha256="0", status="retired",
                           gate_reason="base model"))
        v = ModelVersion(project_id=PID, version="p5-v12", path="/x/v12.json", sha256="0", status="promoted",
                         gate_reason=GATE, classes_json=json.dumps(["awake", "sleep"]),
                         metrics_json=json.dumps({"candidate": {"mAP50": 0.71234, "face_mAP50": 0.98765,
                                                                "class_accuracy": 0.8, "acceptance_rate": 0.75,
                                                                "boxes_per_face": 1.03},
                                                  "n_train": 1234, "n_val": 321}))
        s.add(v)
        s.flush()
        s.get(Project, PID).promoted_version_id = v.id
        for i in range(3):
            s.add(TrainingJob(project_id=PID, trigger="start_training", state="failed" if i == 0 else "succeeded",
                              stage="train classifier", epoch=10, epochs=10, n_train=1234, n_val=321,
                              message=f"promoted p5-v12: {GATE}", error=ERROR + "\nTraceback line" if i == 0 else ""))
        for i in range(4):
            s.add(TaskScore(project_id=PID, task_id=123456 + i, model_version="p5-v12", rank=i + 1,
                            uncertainty=0.87654 - i / 100, least_confidence=0.5, margin=0.43219, entropy=0.91234,
                            n_boxes=12, in_query_batch=i < 2))
    yield app
    get_settings.cache_clear()


def _run(app, args, columns):
    r = runner.invoke(app, args, env={"COLUMNS": str(columns)})
    assert r.exit_code == 0, r.output
    return r.output.splitlines()


def _row(lines, *cells) -> str:
    """The one line that holds all ``cells`` as whole words (a cell cut or wrapped is not found)."""
    pat = [re.compile(rf"(?<![\w./-]){re.escape(c)}(?![\w./-])") for c in cells]
    hits = [ln for ln in lines if all(p.search(ln) for p in pat)]
    assert len(hits) == 1, f"row {cells} is not on exactly one line:\n" + "\n".join(lines)
    return hits[0]


def _fits(lines, columns):
    too_wide = [ln for ln in lines if len(ln.rstrip()) > columns]
    assert not too_wide, f"lines wider than {columns} columns:\n" + "\n".join(too_wide)


def test_jobs_at_80_columns_one_line_per_job(cli):
    lines = _run(cli, ["jobs", str(PID)], 80)
    _fits(lines, 80)
    for job, state in ((1, "failed"), (2, "succeeded"), (3, "succeeded")):
        row = _row(lines, str(job), state, "train classifier", "10/10", "1234/321")
        assert "…" in row or "promoted" in row  # the message, cut to the width rather than wrapped
    assert f"job 1 error: {ERROR}" in " ".join(" ".join(lines).split())  # the error in full, below the table
    # the table's rows are exactly the jobs' lines: nothing of a row spills onto a line of its own
    header = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("job "))
    assert [ln.split()[0] for ln in lines[header + 2:header + 5]] == ["1", "2", "3"]
    assert "trigger" in " ".join(lines)  # the note says which column is not shown


def test_versions_at_80_columns_one_line_per_version(cli):
    from backend.acceptance import Counts, store

    store(get_settings(), PID, {"p5-v12": Counts(annotations=40, predicted=1200, accepted=1000, relabelled=100,
                                                 moved=50, deleted=50, drawn=3),
                                "base-e4418e99": Counts(annotations=20, predicted=600, accepted=300, relabelled=200,
                                                        moved=60, deleted=40)})
    lines = _run(cli, ["versions", str(PID)], 80)
    _fits(lines, 80)
    _row(lines, "p5-v12", "promoted", "0.712", "0.750", "1234/321")
    _row(lines, "p5-v12", "1200", "1000", "100", "50", "50", "83.3")  # its pre-label acceptance, one line
    _row(lines, "base-e4418e99", "600", "300", "200", "60", "40", "50.0")
    _row(lines, "base-e4418e99", "retired")
    assert f"p5-v12 why: {GATE}" in " ".join(" ".join(lines).split())  # the gate's reason in full, below


def test_versions_prints_where_each_plot_lies(cli, tmp_path):
    """A person reading `faceloop versions` wants to open a version's plots: each plot's full path
    (the version's folder, where its bundle lies), on one line even at 80 columns (a trial printed
    only `detector results.png: detector_results.png`, and wrapped a long name onto its own line)."""
    folder = tmp_path / "models" / f"project_{PID}" / "p5-v13"
    plots = {"detector results.png": "detector_results.png",
             "detector confusion_matrix_normalized.png": "detector_confusion_matrix_normalized.png"}
    with session_scope(get_settings().database_url) as s:
        s.add(ModelVersion(project_id=PID, version="p5-v13", path=str(folder / "bundle.json"), sha256="0",
                           status="rejected", gate_reason=GATE, metrics_json=json.dumps({"plots": plots})))
    lines = _run(cli, ["versions", str(PID)], 80)
    for name, file in plots.items():
        _row(lines, f"p5-v13 {name}:", str(folder / file))


def test_queue_at_80_columns_one_line_per_task(cli):
    lines = _run(cli, ["queue", str(PID)], 80)
    _fits(lines, 80)
    for i in range(4):
        _row(lines, str(i + 1), str(123456 + i), f"{0.87654 - i / 100:.3f}", "0.432", "0.912", "12")
    assert "…" not in " ".join(lines)  # no header cut either
    assert _row(lines, "1", "123456", "0.877").endswith("yes")  # in the query batch


def test_wide_terminal_keeps_every_column(cli):
    jobs = " ".join(_run(cli, ["jobs", str(PID)], 250))
    assert all(c in jobs for c in ("trigger", "start_training", "error", ERROR))
    versions = _run(cli, ["versions", str(PID)], 250)
    row = _row(versions, "p5-v12", "promoted", "awake,sleep", "0.712", "0.988", "0.800", "0.750", "1.030", "1234/321")
    assert GATE in row
    queue = " ".join(_run(cli, ["queue", str(PID)], 250))
    # the first task is in the query batch: Label Studio holds a score below 0.001 for it (served first), not 1 - 0.877
    assert "LS score" in queue and "<0.001" in queue and "0.123" not in queue


def test_help_at_80_columns_wraps_sentences_not_docstring_lines(cli):
    lines = _run(cli, ["--help"], 80)
    _fits(lines, 80)
    first = lines.index(next(ln for ln in lines if ln.startswith("│ up ")))
    col = lines[first].index("Start Redis")  # where the summaries begin
    panel = [ln[col:].rstrip(" │") for ln in lines[first:] if ln.startswith("│")]
    width = max(len(s) for s in panel)
    # a command's summary is one paragraph that rich wraps to the width: a line ends early only at the
    # end of a summary, i.e. the next line's first word would have fitted only when a new command starts
    for ln, nxt, new_command in zip(panel, panel[1:], [ln[1:col].strip() != "" for ln in lines[first + 1:]]):
        if not new_command:
            assert len(ln) + 1 + len(nxt.split()[0]) > width, f"summary line ends early: {ln!r}\n" + "\n".join(lines)
    assert "(or create) the project of IMAGES and CONFIG with the" in " ".join(panel)


@pytest.mark.parametrize("columns", [45, 60, 80, 200])
def test_up_summary_has_no_dangling_semicolon(columns, monkeypatch, tmp_path):
    """`faceloop up` printed "project N: ... from /…/val; faceloop connected ..." as one sentence,
    and the line wrapped after "val; " (tried as a new user). The folder has its own line, the
    path whole; the ML backend the next one."""
    from backend import cli

    monkeypatch.setenv("COLUMNS", str(columns))
    folder = tmp_path / "shared" / "data" / "awake_sleep" / "images" / "val"
    with cli.console.capture() as cap:
        cli._say_project_ready(3, 120, 120, folder, 1, reconnected=2)
    lines = cap.get().splitlines()
    assert lines[0] == f"project 3: 120 tasks (120 new) from {folder}", lines
    assert all(not ln.rstrip().endswith(";") for ln in lines), lines
    assert " ".join(ln.strip() for ln in lines[1:]) == ("faceloop connected as its ML backend 1 (basic auth), "
                                                         "2 earlier projects reconnected")
