"""The class buttons of every shipped label config are on screen when a task opens.

A new user's browser trial: in the default awake/sleep project the buttons "awake 1 / sleep 2"
sat at y = 858-884 of a 900 px window, behind Label Studio's bottom bar (Skip / Submit) of the
labelling stream, below an image that fills the editor's width; a person saw no classes or
hotkeys without scrolling. The shipped configs put their control tag above the ``Image``.

Real Label Studio 1.23.2 (``.venv-ls``) on 127.0.0.1 and Debian's chromium through Playwright
(as ``test_person.py``), a 1280x900 viewport. For each ``label_config/*.xml`` and for a
landscape (640x480) and a portrait (480x640) image: a project with that one task, *Label All
Tasks* (the labelling stream), and every class button (a ``Label`` of RectangleLabels, a
``Choice`` of Choices) lies inside the viewport, above the bottom bar, and is the element a
click at its centre reaches (nothing drawn over it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser.lone_ls import lone_label_studio
from tests.browser.test_person import CHROMIUM, CHROMIUM_ARGS, _login
from tests.helpers_unit import jpeg_bytes

pytestmark = [pytest.mark.e2e]

LABEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "label_config"
CONFIGS = sorted(p.name for p in LABEL_CONFIG_DIR.glob("*.xml"))
VIEWPORT = {"width": 1280, "height": 900}
IMAGES = {"landscape": (640, 480), "portrait": (480, 640)}
#: The element of one class button, per control tag (Label Studio 1.23.2's editor classes).
BUTTON = {"RectangleLabels": ".lsf-label", "Choices": ".lsf-choice__item"}


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    with lone_label_studio(tmp_path_factory.mktemp("class-buttons"), "class-buttons") as st:
        yield st


@pytest.fixture(scope="module")
def page(label_studio):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/bootstrap.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip playwright missing (scripts/bootstrap.sh)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        pg = b.new_page(viewport=VIEWPORT)
        _login(pg, label_studio.ls_url, label_studio.ls_user, label_studio.ls_password)
        yield pg
        b.close()


def test_shipped_configs_are_checked():
    assert "awake_sleep.xml" in CONFIGS and len(CONFIGS) >= 3, CONFIGS


@pytest.mark.parametrize("shape", sorted(IMAGES))
@pytest.mark.parametrize("config", CONFIGS)
def test_class_buttons_visible_without_scrolling(label_studio, page, tmp_path, config, shape):
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.label_interface import LabelInterface

    from backend.lsapi import upload_images

    st = label_studio
    xml = (LABEL_CONFIG_DIR / config).read_text()
    controls = [c for c in LabelInterface(xml).controls if c.tag in BUTTON]
    assert controls, f"{config}: no RectangleLabels or Choices"
    client = LabelStudio(base_url=st.ls_url, api_key=st.api_key)
    pid = client.projects.create(title=f"{config} {shape}"[:50], label_config=xml).id
    img = tmp_path / f"{shape}.jpg"
    img.write_bytes(jpeg_bytes(*IMAGES[shape], color=(90, 140, 200)))
    upload_images(client, st.ls_url, pid, [img])

    page.goto(f"{st.ls_url}/projects/{pid}/data")
    page.get_by_role("button", name="Label All Tasks").first.click()  # the labelling stream
    page.get_by_role("button", name="Submit").first.wait_for(timeout=60_000)
    page.wait_for_function("""() => Array.from(document.querySelectorAll('img'))
        .some(i => i.getBoundingClientRect().width > 200 && i.complete && i.naturalWidth > 0)""", timeout=60_000)
    page.wait_for_timeout(1000)  # the editor settles the image's size
    shot = tmp_path / f"{Path(config).stem}_{shape}.png"
    page.screenshot(path=str(shot))
    bar = page.locator(".lsf-bottombar").first.bounding_box()
    assert bar is not None, "no bottom bar found (Label Studio's editor changed?)"
    limit = min(bar["y"], VIEWPORT["height"])
    for c in controls:
        for label in c.labels:
            button = page.locator(BUTTON[c.tag], has_text=label).first
            box = button.bounding_box()
            assert box is not None, f"{config}: no button for {label!r}"
            where = f"{config}, {shape} image: {label!r} at y={box['y']:.0f}-{box['y'] + box['height']:.0f}"
            assert box["x"] >= 0 and box["x"] + box["width"] <= VIEWPORT["width"], where
            assert box["y"] >= 0 and box["y"] + box["height"] <= limit, \
                f"{where}, below the bottom bar's top {bar['y']:.0f} or the viewport; screenshot {shot}"
            reached = button.evaluate("""(el) => { const r = el.getBoundingClientRect();
                const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
                return !!hit && (el === hit || el.contains(hit)); }""")
            assert reached, f"{where}: something is drawn over it; screenshot {shot}"
