"""Atomic file writes shared by the model code and the model store.

A reader (the backend's model cache, another worker's copy of a version) never sees a half-written
weight file: data goes to a temporary file in the destination's folder, is flushed and fsynced,
and only then renamed over the destination (``os.replace``, atomic on POSIX within one file system).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def atomic_write(dest: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``dest`` only when the ``with`` block ends without error.

    Args:
        dest: final path; its folder is created when missing.
        mode: permission bits of the final file (``mkstemp`` would leave 0600).
    Yields: the open temporary file (binary, write).
    Raises: whatever the block or the file system raises; the temporary file is removed then and
        ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
