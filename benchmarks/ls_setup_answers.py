"""What Label Studio 1.23.2 shows a person when ``/setup`` refuses a label config, for each way of answering.

Starts a real Label Studio (``.venv-ls``) and a stub backend on 127.0.0.1. For every kind of
``/setup`` answer, it adds the stub as the ML backend of a fresh project (``POST /api/ml``, what
Settings -> Model -> *Connect Model* does) and prints Label Studio's HTTP status and the message it
returns to the browser (the text the *Connect Model* form shows). Then it connects a good answer
and switches the answer, to see what the model card shows afterwards (``GET /api/ml`` runs
``update_state``: ``state`` and ``error_message``).

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/ls_setup_answers.py`` (about a minute).
Findings are written down in ``docs/label_configs.md``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse

MSG = "faceloop cannot serve this label config: it has no Image tag"
MODES = {
    "422 JSON {detail}": lambda: JSONResponse({"detail": MSG}, status_code=422),
    "400 JSON {error}": lambda: JSONResponse({"error": MSG}, status_code=400),
    "500 JSON {error}": lambda: JSONResponse({"error": MSG}, status_code=500),
    "200 JSON {error} (no model_version)": lambda: JSONResponse({"error": MSG}),
    "200 text/plain message": lambda: PlainTextResponse(MSG),
    "307 redirect -> 422 at a URL that spells the message": lambda: RedirectResponse(
        "/setup-refused/" + MSG.replace(" ", "+").replace(":", ""), status_code=307),
    "200 JSON {model_version}": lambda: JSONResponse({"model_version": "stub-v1"}),
}
state = {"mode": "200 JSON {model_version}"}
app = FastAPI()


@app.get("/health")
def health():
    return {"status": "UP"}


@app.post("/setup")
async def setup(request: Request):
    return MODES[state["mode"]]()


@app.post("/setup-refused/{why:path}")
def refused(why: str):
    return JSONResponse({"detail": MSG}, status_code=422)


@app.post("/webhook")
def webhook():
    return {}


def main():
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    from backend.stack import Stack, free_port

    stub_port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=stub_port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    root = Path(tempfile.mkdtemp(prefix="ls-setup-"))
    st = Stack(root=root)
    st.secrets = {"ls_user": "admin@faceloop.local", "ls_password": "ls-setup-answers-pass1"}
    st.ports = {"label-studio": free_port()}
    st._start_label_studio(timeout=240)
    try:
        client = LabelStudio(base_url=st.ls_url, api_key=st.api_key)
        xml = '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/></Choices></View>'
        out = {}
        for mode in MODES:
            state["mode"] = mode
            pid = client.projects.create(title=mode[:50], label_config=xml).id
            try:
                ml = client.ml.create(project=pid, url=f"http://127.0.0.1:{stub_port}", title="stub")
                out[mode] = {"status": 201, "state": ml.state, "error_message": ml.error_message}
            except ApiError as e:
                out[mode] = {"status": e.status_code, "body": e.body}
            print(f"== {mode}\n{json.dumps(out[mode], indent=1)}\n", flush=True)
        # after a good connection, the answer changes (e.g. the label config was edited)
        state["mode"] = "200 JSON {model_version}"
        pid = client.projects.create(title="later", label_config=xml).id
        mid = client.ml.create(project=pid, url=f"http://127.0.0.1:{stub_port}", title="stub").id
        for mode in ("422 JSON {detail}", "307 redirect -> 422 at a URL that spells the message"):
            state["mode"] = mode
            ml = client.ml.list(project=pid)[0]
            print(f"== connected, then {mode}: GET /api/ml -> state={ml.state} error_message={ml.error_message!r}")
        del mid
    finally:
        st.stop()
        server.should_exit = True
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
