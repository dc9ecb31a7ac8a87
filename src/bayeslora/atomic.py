"""All-or-nothing file writes (standard library only, so the adapter config can use it too)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write"]


def _read_umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it to 0 to read it, even
    briefly, would let another thread's file be created world-writable); once, at import."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file all-or-nothing: ``write`` fills a temp file in the same folder, then fsync + rename.

    Readers (and a crash at any point) see either the old file or the complete new one, never a
    truncated one. The temp file is removed if ``write`` raises. The file gets the permissions a plain
    ``open(path, "w")`` gives a new file (0666 less the umask at import), not ``mkstemp``'s private 0600,
    so results on a shared machine are readable by the people they are shared with. Returns the path.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform / filesystem
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path
