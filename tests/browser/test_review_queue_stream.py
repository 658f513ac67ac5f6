"""*Label All Tasks* serves the review queue's order, in a real browser on a real Label Studio.

Label Studio 1.23.2's Data Manager asks for the next task with ``tabID=<view>`` in the query and
an empty body, and its API reads only ``view``: the labeling stream ignored the Review queue tab it
was started from and served task 1 (found by trying faceloop as a new user). Projects faceloop makes
use Label Studio's "Uncertainty sampling" (``backend.lsapi.QUEUE_SAMPLING``): the unlabelled task
with the lowest prediction score of ``project.model_version`` comes first, from any tab. ``faceloop
up`` sets it once on a project made before (``backend.cli._follow_review_queue``).

Debian's ``chromium`` driven by Playwright, as in ``test_person.py``: log in, open the project's
Review queue tab, press *Label All Tasks*; the task Label Studio serves is the head of the queue
(its lowest score), not the first task; after Submit the next one is the queue's second.
"""

from __future__ import annotations

import pytest

from tests.browser.test_person import _login, browser  # noqa: F401 - the module's chromium fixture

pytestmark = [pytest.mark.e2e]

SCORES = [0.9, 0.7, 0.05, 0.5, 0.2]  # task i+1's prediction score: queue order tasks 3, 5, 4, 2, 1
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="face" toName="image"><Label value="awake"/><Label value="sleep"/></RectangleLabels>
</View>"""


def _next_task_id(page, start) -> int:
    """The id of the task Label Studio's labeling stream serves after ``start()`` (a click)."""
    with page.expect_response(lambda r: "next_task" in r.url, timeout=60_000) as resp:
        start()
    return int(resp.value.json()["id"])


def _serve_from_review_queue(page, stack, pid: int, n: int) -> list[int]:
    """Log in, open project ``pid``'s Review queue tab, press *Label All Tasks*, then Submit
    ``n - 1`` times: the ids of the ``n`` tasks Label Studio served, in order."""
    _login(page, stack.ls_url, stack.ls_user, stack.ls_password)
    page.goto(f"{stack.ls_url}/projects/{pid}/data")
    page.get_by_text("Review queue", exact=True).first.click()
    page.wait_for_timeout(1000)
    served = [_next_task_id(page, lambda: page.get_by_role("button", name="Label All Tasks").first.click())]
    page.keyboard.press("Escape")  # the instructions, if shown
    while len(served) < n:
        served.append(_next_task_id(page, lambda: page.locator("button[aria-label='Submit current annotation']").click()))
    return served


def test_label_all_tasks_from_the_review_queue_follows_the_queue(stack, browser):  # noqa: F811
    from label_studio_sdk import LabelStudio

    from backend.cli import _follow_review_queue
    from backend.lsapi import QUEUE_SAMPLING, create_project, refresh_review_view, set_project_model_version

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    pid = create_project(client, "review queue stream", CONFIG)
    assert client.projects.get(id=pid).sampling == QUEUE_SAMPLING
    image = f"{stack.ls_url}/static/images/label-studio-logo.svg"  # any URL: the order is what is checked
    client.projects.import_tasks(id=pid, request=[{"image": image} for _ in SCORES])
    tids = sorted(int(t.id) for t in client.tasks.list(project=pid))
    for tid, score in zip(tids, SCORES):
        client.predictions.create(task=tid, result=[], score=score, model_version="v1")
    set_project_model_version(client, pid, "v1")
    refresh_review_view(client, pid, "Review queue")
    queue = [t for _, t in sorted(zip(SCORES, tids))]
    assert queue[0] != tids[0]

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        served = _serve_from_review_queue(page, stack, pid, 2)
        assert served == queue[:2], f"Label All Tasks, then Submit, served {served}; the review queue is {queue}"
    finally:
        page.close()

    # a project made before: `faceloop up` sets the sampling once; a person's later choice stays
    old = client.projects.create(title="made by an older faceloop", label_config=CONFIG)
    assert client.projects.get(id=old.id).sampling != QUEUE_SAMPLING
    entry: dict = {"id": old.id}
    assert _follow_review_queue(client, old.id, entry) is True
    assert client.projects.get(id=old.id).sampling == QUEUE_SAMPLING and entry["sampling_set"] is True
    client.projects.update(id=old.id, sampling="Sequential sampling")
    assert _follow_review_queue(client, old.id, entry) is False
    assert client.projects.get(id=old.id).sampling == "Sequential sampling"


def test_label_all_tasks_serves_the_query_batch_first(stack, browser, tmp_path):  # noqa: F811
    """After a scoring, *Label All Tasks* serves the query batch first, in pick order, then the most
    uncertain of the rest, even when the batch holds the pool's most certain tasks.

    The scoring's last step (``ml_worker.scoring.finish_scoring``: rank, flag the batch, write the
    predictions through the outbox to this Label Studio) runs on six tasks' results. The strategy
    ``least_confidence`` picks tasks 1 and 3, which ``margin`` (the queue's measure) ranks last."""
    from label_studio_sdk import LabelStudio

    from backend.lsapi import create_project
    from ml_worker.scoring import finish_scoring
    from tests.helpers_unit import make_settings

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    pid = create_project(client, "query batch first", CONFIG)
    image = f"{stack.ls_url}/static/images/label-studio-logo.svg"
    client.projects.import_tasks(id=pid, request=[{"image": image} for _ in range(6)])
    tids = sorted(int(t.id) for t in client.tasks.list(project=pid))
    lc = [0.9, 0.1, 0.8, 0.2, 0.1, 0.1]
    margin = [0.2, 0.95, 0.3, 0.9, 0.5, 0.6]
    results = [{"task_id": t, "error": None,
                "uncertainty": {"least_confidence": a, "margin": m, "entropy": m, "n_boxes": 1},
                "embedding": [float(i), 1.0], "prediction": {"model_version": "v1", "score": round(1 - m, 6), "result": []}}
               for i, (t, a, m) in enumerate(zip(tids, lc, margin))]
    plan = {"project_id": pid, "version": "v1", "ls_url": stack.ls_url, "label_config": CONFIG, "measure": "margin",
            "todo_ids": tids, "n_unlabelled": len(tids), "pool": tids, "existing": [], "has_version": False,
            "partial": False}
    settings = make_settings(tmp_path, label_studio_url=stack.ls_url, label_studio_api_key=stack.api_key,
                             query_strategy="least_confidence", query_batch_size=2, query_batch_rounds=1)
    outcome = finish_scoring(settings, plan, results)
    assert outcome.query_batch == [tids[0], tids[2]] and outcome.pending_writes == 0
    by_margin = [t for _, t in sorted(zip(margin, tids), reverse=True)]
    assert by_margin[-2:] == [tids[2], tids[0]]  # the batch is the least uncertain by the queue's measure

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        served = _serve_from_review_queue(page, stack, pid, 3)
        assert served == [tids[0], tids[2], by_margin[0]], f"served {served}; batch {outcome.query_batch}"
    finally:
        page.close()


def test_a_skipped_task_leaves_the_review_queue_tab(stack):
    """A person skipped a query-batch task: Label Studio stores a cancelled annotation, which its
    ``total_annotations`` does not count, so the task stayed at the head of the Review queue tab
    (score 0.0002) although it is not served again (found in a new user's trial). The tab now leaves
    out skipped tasks too; the others keep their order."""
    from label_studio_sdk import LabelStudio

    from backend.lsapi import create_project, review_queue, set_project_model_version

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    pid = create_project(client, "skipped task", CONFIG)
    image = f"{stack.ls_url}/static/images/label-studio-logo.svg"
    client.projects.import_tasks(id=pid, request=[{"image": image} for _ in SCORES])
    tids = sorted(int(t.id) for t in client.tasks.list(project=pid))
    for tid, score in zip(tids, SCORES):
        client.predictions.create(task=tid, result=[], score=score, model_version="v1")
    set_project_model_version(client, pid, "v1")
    queue = [t for _, t in sorted(zip(SCORES, tids))]
    assert [t["id"] for t in review_queue(client, pid, "Review queue")] == queue
    client.annotations.create(id=queue[0], result=[], was_cancelled=True)  # what Skip stores
    assert [t["id"] for t in review_queue(client, pid, "Review queue")] == queue[1:]
