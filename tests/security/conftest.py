"""Fixtures of the security tests: a fake Label Studio and an attacker's capture server, both
real HTTP servers on 127.0.0.1, and backend apps built on them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from tests.helpers_unit import jpeg_bytes, make_settings
from tests.security.servers import Capture, FakeLabelStudio, make_pat

#: TestClient's default client host is "testclient"; a backend without basic auth answers loopback only.
LOOPBACK = ("127.0.0.1", 50000)
LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"  # shape of a legacy DRF token


@pytest.fixture
def image():
    return jpeg_bytes(96, 80, color=(180, 140, 110))


@pytest.fixture
def attacker():
    c = Capture().start()
    c.routes["/"] = lambda h: (200, {"Content-Type": "application/json"}, b'{"access": "x"}')
    yield c
    c.stop()


@pytest.fixture(params=["pat", "legacy"])
def ls(request, image):
    """Fake Label Studio, once with a personal access token and once with a legacy key."""
    key = make_pat() if request.param == "pat" else LEGACY_KEY
    s = FakeLabelStudio(image, key, legacy=request.param == "legacy").start()
    yield s
    s.stop()


def app_client(tmp_path, **kw) -> TestClient:
    """A TestClient (loopback client) of a backend with ``kw`` settings; no model warm-up."""
    return TestClient(create_app(make_settings(tmp_path, **kw)), client=kw.pop("_client", LOOPBACK),
                      raise_server_exceptions=False)


#: Status codes of every backend response in tests/security (TestClient), for the no-500 check.
STATUSES: list[int] = []


@pytest.fixture(autouse=True)
def no_500(monkeypatch):
    """Record every TestClient response; a 500 fails the test that got it (issue 9: 0 of them)."""
    from starlette.testclient import TestClient as StarletteClient

    seen: list[int] = []
    real = StarletteClient.request

    def request(self, *a, **kw):
        r = real(self, *a, **kw)
        seen.append(r.status_code)
        return r

    monkeypatch.setattr(StarletteClient, "request", request)
    yield
    STATUSES.extend(seen)
    assert 500 not in seen, f"a backend response was 500 ({seen.count(500)} of {len(seen)})"


def pytest_terminal_summary(terminalreporter):
    if STATUSES:
        n500 = sum(s >= 500 for s in STATUSES)
        terminalreporter.write_line(f"tests/security: {len(STATUSES)} backend responses, {n500} with status >= 500")
