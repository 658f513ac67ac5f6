"""A person connects faceloop through Label Studio's web form (Settings -> Model -> Connect Model).

Real Label Studio 1.23.2 (``.venv-ls``), the real backend app (no auth: loopback only) and
Debian's chromium through Playwright, on 127.0.0.1:

- a polygons-only project: the form's error names faceloop's reason (docs/label_configs.md:
  Label Studio shows only the URL of a failed ``/setup``, so faceloop redirects to one that
  spells it);
- an image-level Choices project (``label_config/awake_sleep_choices.xml``): connected.

Screenshots go to ``$FACELOOP_BROWSER_OUT`` (default a temporary folder); the ones in
``docs/img/ls_connect_*.png`` come from this test.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.browser.test_person import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import REPO
from tests.helpers_unit import POLYGON_CONFIG

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    import uvicorn

    from backend.app import create_app
    from backend.config import Settings
    from backend.stack import Stack, free_port

    root = tmp_path_factory.mktemp("connect-form")
    settings = Settings(var_dir=root / "var", database_url=f"sqlite:///{root / 'faceloop.db'}",
                        recovery_interval_s=0, celery_broker_url="redis://127.0.0.1:1/0", label_studio_api_key="")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    st = Stack(root=root)
    st.secrets = {"ls_user": "admin@faceloop.local", "ls_password": "connect-form-test-pass1"}
    st.ports = {"label-studio": free_port()}
    try:
        st._start_label_studio(timeout=240)
        yield st, f"http://127.0.0.1:{port}"
    finally:
        st.stop()
        server.should_exit = True
        time.sleep(0.5)


def _connect(page, ls_url: str, pid: int, backend_url: str):
    page.goto(f"{ls_url}/projects/{pid}/settings/ml")
    page.wait_for_load_state("networkidle")
    page.get_by_text("Connect Model").first.click(timeout=30000)
    page.locator("input[name=title]").fill("faceloop")
    page.locator("input[name=url]").fill(backend_url)
    page.locator("button", has_text="Validate and Save").click(timeout=30000)


def test_connect_model_form(services, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/bootstrap.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip playwright missing (scripts/bootstrap.sh)")
    from label_studio_sdk import LabelStudio

    st, backend_url = services
    out = Path(os.environ.get("FACELOOP_BROWSER_OUT") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    client = LabelStudio(base_url=st.ls_url, api_key=st.api_key)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto(st.ls_url + "/user/login/")
        page.fill("input[name=email]", st.ls_user)
        page.fill("input[name=password]", st.ls_password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")

        pid = client.projects.create(title="polygons only", label_config=POLYGON_CONFIG).id
        _connect(page, st.ls_url, pid, backend_url)
        shown = page.locator("text=/faceloop\\+cannot\\+serve/").first
        shown.wait_for(timeout=30000)
        page.screenshot(path=str(out / "ls_connect_unsupported_config.png"))
        text = shown.inner_text()
        assert "doesn't look like a valid ML backend" in text
        assert "label+config+has+no+RectangleLabels" in text and "PolygonLabels" in text, text
        assert client.ml.list(project=pid) == []

        xml = (REPO / "label_config" / "awake_sleep_choices.xml").read_text()
        pid = client.projects.create(title="awake or asleep", label_config=xml).id
        _connect(page, st.ls_url, pid, backend_url)
        page.locator("text=Connected").first.wait_for(timeout=30000)
        page.screenshot(path=str(out / "ls_connect_choices_config.png"))
        ml = client.ml.list(project=pid)[0]
        assert ml.state == "CO" and str(ml.model_version).startswith("base-")
        b.close()
    print(f"\nconnect-form screenshots: {out}")
