"""Screenshot of what a person sees in Label Studio 1.23.2 when connecting faceloop to a project
whose label config faceloop cannot serve (Settings -> Model -> Connect Model).

Starts a real Label Studio (``.venv-ls``) and the real faceloop backend app (no auth: loopback
only) on 127.0.0.1, creates a polygons-only project, and drives Debian's chromium through the
form. Writes ``docs/img/ls_connect_unsupported_config.png`` (or ``--out``).

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/ls_setup_browser.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from backend.config import REPO_ROOT, Settings

POLYGONS = """<View><Image name="image" value="$image"/>
<PolygonLabels name="outline" toName="image"><Label value="face"/></PolygonLabels></View>"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO_ROOT / "docs" / "img" / "ls_connect_unsupported_config.png"))
    args = ap.parse_args()
    from label_studio_sdk import LabelStudio
    from playwright.sync_api import sync_playwright

    from backend.app import create_app
    from backend.stack import Stack, free_port

    root = Path(tempfile.mkdtemp(prefix="ls-setup-browser-"))
    settings = Settings(var_dir=root / "var", database_url=f"sqlite:///{root / 'faceloop.db'}",
                        recovery_interval_s=0, celery_broker_url="redis://127.0.0.1:1/0")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    st = Stack(root=root)
    st.secrets = {"ls_user": "admin@faceloop.local", "ls_password": "ls-setup-browser-pass1"}
    st.ports = {"label-studio": free_port()}
    st._start_label_studio(timeout=240)
    try:
        client = LabelStudio(base_url=st.ls_url, api_key=st.api_key)
        pid = client.projects.create(title="polygons only", label_config=POLYGONS).id
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                  args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
            page = b.new_page(viewport={"width": 1280, "height": 900})
            page.goto(st.ls_url + "/user/login/")
            page.fill("input[name=email]", st.ls_user)
            page.fill("input[name=password]", st.ls_password)
            page.click("button[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(f"{st.ls_url}/projects/{pid}/settings/ml")
            page.wait_for_load_state("networkidle")
            try:
                page.get_by_text("Connect Model").first.click(timeout=15000)
            except Exception:
                page.screenshot(path="/tmp/ls_setup_browser_debug.png")
                print("buttons:", [x.inner_text() for x in page.locator("button").all()])
                raise
            time.sleep(1)
            page.locator("input[name=title]").fill("faceloop")
            page.locator("input[name=url]").fill(f"http://127.0.0.1:{port}")
            try:
                page.locator("button", has_text="Validate and Save").click(timeout=10000)
            except Exception:
                page.screenshot(path="/tmp/ls_setup_browser_debug.png")
                print("buttons:", [x.inner_text() for x in page.locator("button").all()])
                print("inputs:", [x.get_attribute("name") for x in page.locator("input").all()])
                raise
            try:
                page.wait_for_selector("text=/faceloop\\+cannot\\+serve/", timeout=30000)
            except Exception:
                page.screenshot(path="/tmp/ls_setup_browser_debug.png")
                print("text:", page.locator("body").inner_text()[-1500:])
                raise
            time.sleep(1)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            print("shown:", page.locator("text=/faceloop\\+cannot\\+serve/").first.inner_text())
            print("screenshot:", args.out)
            # the same form on an image-level Choices project: connected
            xml = (REPO_ROOT / "label_config" / "awake_sleep_choices.xml").read_text()
            pid2 = client.projects.create(title="awake or asleep", label_config=xml).id
            page.goto(f"{st.ls_url}/projects/{pid2}/settings/ml")
            page.wait_for_load_state("networkidle")
            page.get_by_text("Connect Model").first.click(timeout=15000)
            time.sleep(1)
            page.locator("input[name=title]").fill("faceloop")
            page.locator("input[name=url]").fill(f"http://127.0.0.1:{port}")
            page.locator("button", has_text="Validate and Save").click(timeout=10000)
            page.wait_for_selector("text=Connected", timeout=30000)
            time.sleep(1)
            out2 = str(Path(args.out).with_name("ls_connect_choices_config.png"))
            page.screenshot(path=out2)
            ml = client.ml.list(project=pid2)[0]
            print(f"choices project: state {ml.state}, model_version {ml.model_version}; screenshot: {out2}")
            b.close()
    finally:
        st.stop()
        server.should_exit = True
        time.sleep(0.5)


if __name__ == "__main__":
    main()
