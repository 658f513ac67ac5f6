"""faceloop's listings of Label Studio (every task for a training snapshot or an acceptance recount,
the review queue's head, the projects `up` reconnects) never ask for a page past the last: Label
Studio 1.23.2 answers one with 404 and logs a Django traceback, which a person reading its log
takes for a crash. Checked on the real Label Studio of the e2e stack, in its log."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e]


def _new_log(stack, start: int) -> str:
    return stack.log("label-studio").read_bytes()[start:].decode("utf-8", "replace")


def test_listings_stop_at_the_last_page_and_label_studio_logs_no_traceback(stack):
    from label_studio_sdk import LabelStudio

    from backend.acceptance import refresh
    from backend.config import Settings
    from backend.lsapi import all_pages, create_project, review_queue, snapshot
    from tests.helpers_unit import EXAMPLE_CONFIG

    client = LabelStudio(base_url=stack.ls_url, api_key=stack.api_key)
    pid = create_project(client, "paging", EXAMPLE_CONFIG)
    ids = [client.tasks.create(project=pid, data={"image": f"http://127.0.0.1:9/p{k}.jpg"}).id for k in range(5)]
    log = stack.log("label-studio")

    # what the SDK's own pager does, for reference: it asks for page 4 of 2-task pages, Label Studio
    # answers 404 and logs the traceback a person saw (the SDK ends the listing quietly)
    start = log.stat().st_size
    assert [t.id for t in client.tasks.list(project=pid, page_size=2)] == ids
    assert "Traceback" in _new_log(stack, start) and "page=4" in _new_log(stack, start)

    start = log.stat().st_size
    # a short last page (5 tasks, pages of 2), a full last page (4 of them, pages of 2), one page
    assert [t.id for t in all_pages(client.tasks.list, 2, project=pid)] == ids
    assert [t.id for t in all_pages(client.tasks.list, 5, project=pid)] == ids
    client.tasks.delete(id=ids[-1])
    assert [t.id for t in all_pages(client.tasks.list, 2, project=pid)] == ids[:4]
    # faceloop's own listings: training snapshot, review queue head, acceptance recount, projects
    assert [t.id for t in snapshot(client, pid)] == ids[:4]
    assert len(review_queue(client, pid, "Review queue", 20)) == 4  # fewer tasks than the limit
    assert len(review_queue(client, pid, "Review queue", 2)) == 2
    settings = Settings(label_studio_url=stack.ls_url, label_studio_api_key=stack.api_key,
                        database_url=stack.database_url, var_dir=str(stack.var_dir))
    refresh(settings, pid, client=client)
    projects = [p.id for p in all_pages(client.projects.list, 1)]
    assert pid in projects and len(projects) == len(set(projects))
    new = _new_log(stack, start)
    assert "Traceback" not in new and "Invalid page" not in new, new[-3000:]
