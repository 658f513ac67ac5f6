"""DNS rebinding (issue 9 §2): the address an image download connects to is the one checked.

A hostile DNS server can answer a public address when the backend checks the host and a
loopback address when the download connects. A resolver stand-in (``socket.getaddrinfo``
monkeypatched for made-up host names; every other name resolves as usual) plays that server;
the "internal service" is a real capture server on 127.0.0.1 that must receive nothing.
"""

from __future__ import annotations

import socket

import pytest

from backend import images
from backend.images import ImageError, load_image
from tests.helpers_unit import make_settings
from tests.security.servers import Capture

PUBLIC = "93.184.215.14"  # a global address (is_global); never connected to here


class Resolver:
    """``socket.getaddrinfo`` stand-in: ``answers[host]`` lists the answer of each lookup (an
    address or a list of them; the last answer repeats); other hosts go to the real resolver."""

    def __init__(self, monkeypatch, answers: dict[str, list[str]]):
        self.answers, self.calls = answers, []
        self.real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host, port, *args, **kwargs):
        if host not in self.answers:
            return self.real(host, port, *args, **kwargs)
        self.calls.append(host)
        seq = self.answers[host]
        ips = seq[min(len(self.calls) - 1, len(seq) - 1)]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port or 0))
                for ip in ([ips] if isinstance(ips, str) else ips)]


@pytest.fixture
def internal(image):
    c = Capture().start()
    c.routes["/"] = lambda h: (200, {"Content-Type": "image/jpeg"}, image)
    yield c
    c.stop()


def test_rebinding_host_is_refused_at_connect(tmp_path, monkeypatch, internal):
    # check: public; connect: 127.0.0.1, where an internal service listens
    r = Resolver(monkeypatch, {"rebind.test": [PUBLIC, "127.0.0.1"]})
    with pytest.raises(ImageError, match="private or loopback address that is not Label Studio: refused"):
        load_image(f"http://rebind.test:{internal.port}/face.jpg", make_settings(tmp_path, image_fetch_timeout_s=3))
    assert len(r.calls) == 2  # checked, then resolved once more to connect: that answer is checked too
    assert internal.seen == []  # nothing reached the internal service


def test_any_private_answer_among_several_is_refused(tmp_path, monkeypatch, internal):
    # check: public; connect: one public and one loopback record
    r = Resolver(monkeypatch, {"multi.test": [PUBLIC, [PUBLIC, "127.0.0.1"]]})
    with pytest.raises(ImageError, match="private or loopback"):
        load_image(f"http://multi.test:{internal.port}/face.jpg", make_settings(tmp_path, image_fetch_timeout_s=3))
    assert len(r.calls) == 2 and internal.seen == []


def test_checked_address_is_connected_with_the_host_name_kept(tmp_path, monkeypatch, internal, image):
    # "images.example" resolves to 127.0.0.1, which counts as a public address for this test
    # (stand-in for a real public server, unreachable here): the download connects to the
    # resolved address, sends Host: images.example, and no credentials
    r = Resolver(monkeypatch, {"images.example": ["127.0.0.1"]})
    monkeypatch.setattr(images, "_is_private_ip", lambda a: a != "127.0.0.1")
    got = load_image(f"http://images.example:{internal.port}/face.jpg?x=1", make_settings(tmp_path))
    assert (got.width, got.height) == (96, 80)
    assert len(r.calls) == 2
    [seen] = internal.seen
    assert seen.path == "/face.jpg?x=1"
    assert seen.headers["Host"] == f"images.example:{internal.port}"
    assert not any(k.lower() in ("authorization", "cookie") for k in seen.headers)


def test_allow_private_still_fetches_private_hosts(tmp_path, monkeypatch, internal):
    # IMAGE_URLS_ALLOW_PRIVATE=true: no address check, plain transport
    Resolver(monkeypatch, {"nas.lan": ["127.0.0.1"]})
    got = load_image(f"http://nas.lan:{internal.port}/face.jpg",
                     make_settings(tmp_path, image_urls_allow_private=True))
    assert got.width == 96 and len(internal.seen) == 1
