"""What Label Studio 1.23.2 shows a person when faceloop's ``/predict`` fails for a task (issue 11).

Starts faceloop's whole stack on 127.0.0.1 (``backend.stack.Stack``: redis-server, Label Studio
from ``.venv-ls``, the backend with basic auth, a worker), makes a project with one good image and
one truncated JPEG (the first 300 bytes of a JPEG), connects the backend, then:

1. runs the Data Manager action *Retrieve Predictions* on both tasks through Label Studio's API
   (``POST /api/dm/actions?id=retrieve_tasks_predictions``, what the Actions menu sends) and
   prints its answer and the predictions stored per task;
2. opens the broken task through the API (``GET /api/tasks/{id}``: Label Studio asks ``/predict``
   again when a task has no prediction) and prints what is stored then;
3. with Debian's chromium (Playwright), logs in, runs *Retrieve Predictions* from the Actions
   menu, and opens the broken task, with screenshots and any toast/notification text;
4. prints the task errors of faceloop's status page.

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/ls_predict_errors.py [OUT]`` (2-3 minutes).
Findings are written down in ``docs/label_configs.md`` ("Per-task errors of /predict").
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(out: Path) -> None:
    import httpx
    from label_studio_sdk import LabelStudio

    from backend.lsapi import connect_backend, create_project, set_status_link, upload_images
    from backend.stack import Stack
    from backend.status import status_link
    from tests.helpers_unit import EXAMPLE_CONFIG, jpeg_bytes

    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ls-predict-errors-"))
    imgs = root / "images"
    imgs.mkdir()
    good = imgs / "good.jpg"
    good.write_bytes(jpeg_bytes(640, 480))
    bad = imgs / "truncated.jpg"
    bad.write_bytes(jpeg_bytes(640, 480)[:300])
    st = Stack.start(root / "stack", extra_env={"RETRAIN_MIN_ANNOTATIONS": "1000"})
    try:
        client = LabelStudio(base_url=st.ls_url, api_key=st.api_key)
        pid = create_project(client, "predict errors", EXAMPLE_CONFIG)
        good_id, bad_id = upload_images(client, st.ls_url, pid, [good, bad])
        connect_backend(client, pid, st.backend_url, basic_auth=st.basic_auth, webhook_secret=st.webhook_secret)
        set_status_link(client, pid, status_link(st.backend_url, pid, st.webhook_secret))
        auth = {"Authorization": client._client_wrapper.get_headers()["Authorization"]}

        def stored(tid):
            return [{"model_version": p.model_version, "score": p.score, "regions": len(p.result or [])}
                    for p in client.predictions.list(task=tid)]

        r = httpx.post(f"{st.ls_url}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                       json={"selectedItems": {"all": False, "included": [good_id, bad_id]}}, headers=auth,
                       timeout=200)
        print(f"1. Retrieve Predictions (API): HTTP {r.status_code} {r.text}")
        print(f"   stored: good task {stored(good_id)}; truncated task {stored(bad_id)}")
        t0 = time.time()
        r = httpx.get(f"{st.ls_url}/api/tasks/{bad_id}", headers=auth, timeout=200)
        print(f"2. open the truncated task (API): HTTP {r.status_code} in {time.time() - t0:.1f} s; "
              f"predictions in the answer {len(r.json().get('predictions') or [])}; stored {stored(bad_id)}")
        m = httpx.get(f"{st.backend_url}/metrics", auth=st.basic_auth, timeout=10).text
        print("   backend /metrics: " + "; ".join(ln for ln in m.splitlines()
                                                  if ln.startswith("faceloop_predicted_tasks_total")))
        browser_check(st, pid, bad_id, out)
        for _ in range(10):  # /predict's per-task errors (backend.status.record_predict_errors)
            html = httpx.get(f"{st.backend_url}/status/{pid}", auth=st.basic_auth, timeout=30).text
            if "No task failed" not in html:
                break
            time.sleep(2)
        errs = html.split("<h2>Task errors</h2>", 1)[-1].split("<h2>", 1)[0]
        import re

        print("4. status page, task errors: " + " ".join(re.sub(r"<[^>]+>", " ", errs).split())[:400])
    finally:
        st.stop()


def browser_check(st, pid: int, bad_id: int, out: Path) -> None:
    from tests.browser.test_person import CHROMIUM, CHROMIUM_ARGS, _login

    if not CHROMIUM.exists():
        print("3. browser: Debian's chromium not installed, skipped")
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = b.new_page(viewport={"width": 1400, "height": 900})
        try:
            _login(page, st.ls_url, st.ls_user, st.ls_password)
            page.goto(f"{st.ls_url}/projects/{pid}/data")
            page.wait_for_load_state("networkidle")
            page.locator(".dm-table__row-wrapper input[type=checkbox], input[type=checkbox]").first.wait_for(
                timeout=60_000)
            page.locator("input[type=checkbox]").first.check()  # the header box: all tasks
            page.get_by_role("button", name="Actions").first.click()
            page.get_by_text("Retrieve Predictions").first.click()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "ls_retrieve_predictions_confirm.png"))
            with page.expect_response(lambda r: "/api/dm/actions" in r.url and r.request.method == "POST",
                                      timeout=200_000) as resp:
                page.locator("button", has_text="OK").last.click()
            answer = f"HTTP {resp.value.status} {resp.value.text()}"
            page.wait_for_timeout(2500)
            shot = out / "ls_retrieve_predictions_after.png"
            page.screenshot(path=str(shot))
            notes = page.locator("[class*=toast], [class*=Toast], [role=alert], [role=dialog], [class*=notification]")
            texts = [t.strip() for t in notes.all_inner_texts() if t.strip()]
            print(f"3. browser: Actions -> Retrieve Predictions -> OK: the page's request got {answer}; "
                  f"toasts/dialogs shown after it: {texts or 'none'}; screenshot {shot}")
            page.goto(f"{st.ls_url}/projects/{pid}/data?task={bad_id}")
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(3000)
            shot = out / "ls_open_task_with_image_error.png"
            page.screenshot(path=str(shot))
            body = " ".join(page.inner_text("body").split())
            print(f"   open the truncated task: regions listed {page.locator('.lsf-outliner-item').count()}; "
                  f"text mentions an error: {[w for w in ('error', 'Error', 'truncated', 'failed') if w in body]}; "
                  f"screenshot {shot}")
        finally:
            b.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "benchmarks" / "out" / "ls_predict_errors")
