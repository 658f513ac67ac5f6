"""Issue 9 §7: the backend/worker image runs as a non-root user (static check of the Dockerfile:
no Docker engine runs here)."""

from __future__ import annotations

from tests.conftest import REPO


def _instructions() -> list[tuple[str, str]]:
    out, buf = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), rest))
            buf = ""
    return out


def test_image_runs_as_non_root_user():
    ins = _instructions()
    users = [arg for op, arg in ins if op == "USER"]
    assert users, "Dockerfile has no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    last_user = max(i for i, (op, _) in enumerate(ins) if op == "USER")
    assert [op for op, _ in ins[last_user:]].count("RUN") == 0, "RUN after USER: it would run as the service user"
    assert any(op == "RUN" and "useradd" in arg and user in arg for op, arg in ins)
    # the state directory exists and belongs to that user (a named volume copies its ownership)
    assert any(op == "RUN" and "/var/lib/faceloop" in arg and f"-o {user}" in arg for op, arg in ins)


def test_image_holds_every_package_the_worker_imports():
    copied = {arg.split()[0] for op, arg in _instructions() if op == "COPY"}
    assert {"backend", "ml_worker", "facemodels", "models", "label_config"} <= copied
