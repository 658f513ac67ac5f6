"""Pre-label acceptance of a Choices project from annotations a person makes in the editor.

Real Label Studio 1.23.2 (``.venv-ls``) and Debian's chromium through Playwright, on 127.0.0.1.
A project of ``label_config/awake_sleep_choices.xml`` with three stored predictions of one
version: a person submits the first unchanged, changes the second, and picks a class on the third,
whose prediction is empty (no face found). Checks what the editor stores (``parent_prediction``
is set even from an empty prediction; the copied choice keeps its id, ``origin`` says
prediction / prediction-changed / manual) and what :func:`backend.acceptance.project_counts`
makes of it.
"""

from __future__ import annotations

import pytest

from tests.browser.lone_ls import lone_label_studio
from tests.browser.test_person import CHROMIUM, CHROMIUM_ARGS, _login
from tests.conftest import REPO
from tests.helpers_unit import jpeg_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    with lone_label_studio(tmp_path_factory.mktemp("choice-acceptance"), "choice-acceptance") as st:
        yield st


def choice(rid: str, value: str) -> list[dict]:
    return [{"id": rid, "from_name": "state", "to_name": "image", "type": "choices",
             "value": {"choices": [value]}, "score": 0.7}]


def test_person_keeps_changes_and_makes_choices(label_studio, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (scripts/bootstrap.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip playwright missing (scripts/bootstrap.sh)")
    from label_studio_sdk import LabelStudio

    from backend.acceptance import Counts, choice_controls, project_counts
    from backend.lsapi import upload_images

    st = label_studio
    xml = (REPO / "label_config" / "awake_sleep_choices.xml").read_text()
    client = LabelStudio(base_url=st.ls_url, api_key=st.api_key)
    pid = client.projects.create(title="choice acceptance", label_config=xml, show_collab_predictions=True).id
    files = []
    for k in range(3):
        f = tmp_path / f"img{k}.jpg"
        f.write_bytes(jpeg_bytes(320, 240, color=(40 * k, 100, 150)))
        files.append(f)
    ids = upload_images(client, st.ls_url, pid, files)
    for tid, result in zip(ids, (choice("pa00000001", "sleep"), choice("pb00000001", "awake"), [])):
        client.predictions.create(task=tid, model_version="vchoice", score=0.5 if result else 0.0, result=result)
    client.projects.update(id=pid, model_version="vchoice")  # the editor pre-labels from this version
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = b.new_page(viewport={"width": 1280, "height": 900})
        _login(page, st.ls_url, st.ls_user, st.ls_password)
        for tid, pick in zip(ids, (None, "sleep", "awake")):  # keep; awake -> sleep; none -> awake
            page.goto(f"{st.ls_url}/projects/{pid}/data?task={tid}")
            page.get_by_role("button", name="Submit").wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            if pick:
                page.locator("label", has_text=pick).first.click()
                page.wait_for_timeout(300)
            page.get_by_role("button", name="Submit").click()
            page.wait_for_function(f"""async () => {{ const r = await fetch('/api/tasks/{tid}');
                const t = await r.json(); return (t.annotations || []).length > 0; }}""", timeout=30_000)
        b.close()
    stored = []
    for tid in ids:
        t = client.tasks.get(id=tid)
        (a,) = t.annotations
        a = a if isinstance(a, dict) else a.dict()
        pred = t.predictions[0]
        assert a["parent_prediction"] == (pred["id"] if isinstance(pred, dict) else pred.id)  # set by the editor
        stored.append([(r.get("id"), r.get("origin"), r["value"]["choices"]) for r in a["result"]])
    assert stored[0] == [("pa00000001", "prediction", ["sleep"])]
    assert stored[1] == [("pb00000001", "prediction-changed", ["sleep"])]
    assert stored[2][0][1:] == ("manual", ["awake"])
    counts, without = project_counts(client.tasks.list(project=pid, page_size=100, fields="all"), choice_controls(xml))
    assert without == 0
    assert counts == {"vchoice": Counts(annotations=3, choices_predicted=2, choices_accepted=1, choices_changed=1,
                                        choices_by_hand=1)}
