"""Real HTTP servers on 127.0.0.1 for the security tests (threads, http.server).

- :class:`Capture`: answers every request and records it (method, path, headers, body): the
  "attacker" that must never see a credential.
- :class:`FakeLabelStudio`: a Capture that behaves like Label Studio's file and token endpoints:
  ``POST /api/token/refresh/`` exchanges a JWT refresh token for an access token, and
  ``/data/upload/...`` serves an image only with a valid ``Authorization`` (Bearer access
  token or legacy ``Token``), as LS 1.23 does (label-studio-protocol.md §5).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt

_KEY = "fake-label-studio-signing-key-0123456789abcdef"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict
    body: bytes

    def text(self) -> str:
        return f"{self.method} {self.path}\n{json.dumps(self.headers)}\n{self.body.decode('latin-1')}"


def make_pat(exp_days: int = 3650) -> str:
    """A personal access token shaped like Label Studio's (JWT refresh token, far-future expiry)."""
    exp = datetime.now(timezone.utc) + timedelta(days=exp_days)
    return jwt.encode({"token_type": "refresh", "exp": int(exp.timestamp()), "user_id": 1, "jti": "pat-1"},
                      _KEY, algorithm="HS256")


def make_access() -> str:
    exp = datetime.now(timezone.utc) + timedelta(seconds=300)
    return jwt.encode({"token_type": "access", "exp": int(exp.timestamp()), "user_id": 1, "jti": "acc-1"},
                      _KEY, algorithm="HS256")


@dataclass
class Capture:
    """A recording HTTP server; ``routes`` maps a path prefix to ``fn(handler) -> (status, headers, body)``
    (or None when ``fn`` wrote the answer itself). Unrouted paths get 404."""

    routes: dict = field(default_factory=dict)
    seen: list = field(default_factory=list)

    def start(self) -> "Capture":
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _any(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.seen.append(Seen(self.command, self.path, dict(self.headers), body))
                fn = next((f for p, f in sorted(outer.routes.items(), key=lambda kv: -len(kv[0]))
                           if self.path.startswith(p)), None)
                ans = fn(self) if fn else (404, {}, b"not found")
                if ans is None:
                    return
                status, headers, data = ans
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def leaked(self, *secrets: str) -> list[str]:
        """Requests whose method, path, headers or body contain any of ``secrets``."""
        return [s.text()[:200] for s in self.seen for k in secrets if k and k in s.text()]


class FakeLabelStudio(Capture):
    """Label Studio's token refresh and file endpoints (see module docstring)."""

    def __init__(self, image: bytes, api_key: str, legacy: bool = False):
        super().__init__()
        self.image, self.api_key, self.legacy = image, api_key, legacy
        self.access = make_access()
        self.routes = {"/api/token/refresh": self._refresh, "/data/upload/": self._file,
                       "/data/local-files/": self._file, "/api/": lambda h: (200, {}, b'{"secret": "admin data"}')}

    def _authorised(self, h) -> bool:
        auth = h.headers.get("Authorization", "")
        return auth == (f"Token {self.api_key}" if self.legacy else f"Bearer {self.access}")

    def _refresh(self, h):
        body = json.loads(self.seen[-1].body or b"{}")
        if body.get("refresh") != self.api_key:
            return 401, {}, b'{"detail": "bad token"}'
        return 200, {"Content-Type": "application/json"}, json.dumps({"access": self.access}).encode()

    def _file(self, h):
        if not self._authorised(h):
            return 401, {}, b'{"detail": "Authentication credentials were not provided."}'
        return 200, {"Content-Type": "image/jpeg"}, self.image


def slow_drip(interval_s: float = 2.0, total_bytes: int = 1000):
    """A route that sends ``total_bytes`` one byte every ``interval_s`` (a slow-loris image)."""
    def fn(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(total_bytes))
        h.end_headers()
        try:
            for _ in range(total_bytes):
                h.wfile.write(b"\xff")
                h.wfile.flush()
                time.sleep(interval_s)
        except OSError:
            pass
        return None
    return fn
