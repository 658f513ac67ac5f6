"""A lone Label Studio for the browser tests (Playwright driving Debian's ``chromium``)."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def lone_label_studio(root: Path, name: str):
    """A real Label Studio alone (no backend, worker or Redis) on a free 127.0.0.1 port, under
    ``root``, with the admin ``admin@faceloop.local`` and a password made from ``name``; stopped on
    exit. Yields the :class:`backend.stack.Stack` (``ls_url``, ``ls_user``, ``ls_password``,
    ``api_key``). Raises :class:`backend.stack.StackError` when it does not start within 240 s."""
    from backend.stack import Stack, free_port

    st = Stack(root=root)
    st.secrets = {"ls_user": "admin@faceloop.local", "ls_password": f"{name}-pass1"}
    st.ports = {"label-studio": free_port()}
    try:
        st._start_label_studio(timeout=240)
        yield st
    finally:
        st.stop()
