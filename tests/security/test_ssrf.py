"""Issue 9 §2: task image URLs cannot reach Label Studio's API or scan loopback ports.

Label Studio is a real fake-LS server on 127.0.0.1 (tests/security/servers.py); every refused
URL must be refused before any request (the server records all it receives)."""

from __future__ import annotations

import re
import socket

import pytest

from backend.images import ImageError, load_image
from tests.helpers_unit import config_text, make_settings
from tests.security.conftest import app_client
from tests.security.servers import Capture

API_URLS = [
    "/api/current-user/whoami", "/api/projects", "/api/projects/", "/api/token/refresh/",
    "/data/upload/../../api/projects", "/data/upload/%2e%2e/%2e%2e/api/projects",
    "/data/upload/1/..%2f..%2f..%2fapi/projects", "/data/local-files/../../api/projects?d=x",
    "/data/upload\\..\\..\\api\\projects", "/static/x.jpg", "/user/login/", "/tasks/1/", "/tasks/x/presign/",
    "//evil.example/data/upload/1/x.jpg",
]


@pytest.mark.parametrize("path", API_URLS)
def test_api_urls_are_refused_before_any_request(tmp_path, ls, path):
    s = make_settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.api_key)
    for url in (path, ls.url + path if path.startswith("/") and not path.startswith("//") else None):
        if url is None:
            continue
        with pytest.raises(ImageError) as e:
            load_image(url, s)
        assert "admin data" not in str(e.value)
        assert re.search(r"not a Label Studio file URL|unsupported image URL|private or loopback", str(e.value)), str(e.value)
    assert ls.seen == []


def test_issue_repro_api_url_in_a_task(tmp_path, ls):
    c = app_client(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.api_key)
    assert c.post("/setup", json={"project": 5, "schema": config_text("awake_sleep")}).status_code == 200
    tasks = [{"id": i, "project": 5, "data": {"image": u}} for i, u in
             enumerate(["/api/current-user/whoami", "/api/projects", f"{ls.url}/api/projects"], 1)]
    r = c.post("/predict", json={"tasks": tasks})
    assert r.status_code == 200
    for res in r.json()["results"]:
        assert "not a Label Studio file URL" in res["error"] and "admin data" not in res["error"]
    assert ls.seen == []


def _free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "10.1.2.3", "169.254.169.254",
                                  "192.168.0.1", "[::ffff:127.0.0.1]", "2130706433", "127.1"])
def test_private_hosts_are_refused_by_default(tmp_path, host):
    s = make_settings(tmp_path, image_fetch_timeout_s=2)
    with pytest.raises(ImageError, match="private or loopback address"):
        load_image(f"http://{host}:{_free_port()}/x.jpg", s)


def test_open_and_closed_ports_give_the_same_error(tmp_path):
    # issue 9 §2: different error kinds revealed which loopback ports are open
    listening = Capture().start()
    listening.routes["/"] = lambda h: (404, {}, b"no")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, never answers: a timeout
    closed = _free_port()
    urls = {"listening": f"{listening.url}/x.jpg", "silent": f"http://127.0.0.1:{silent.getsockname()[1]}/x.jpg",
            "closed": f"http://127.0.0.1:{closed}/x.jpg"}
    try:
        for allow in (False, True):
            s = make_settings(tmp_path, image_urls_allow_private=allow, image_fetch_timeout_s=1.5)
            msgs = {}
            for kind, url in urls.items():
                with pytest.raises(ImageError) as e:
                    load_image(url, s)
                msgs[kind] = re.sub(r"127\.0\.0\.1:\d+", "HOST", str(e.value))
            assert len(set(msgs.values())) == 1, msgs
        assert listening.seen  # with allow_private the request did reach it: same message anyway
    finally:
        listening.stop()
        silent.close()
