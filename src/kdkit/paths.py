"""Where kdkit keeps things that must not go into git: caches (teachers, converted models, data)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$KDKIT_CACHE` (default `~/.cache/kdkit`) joined with `parts`, created on demand."""
    root = Path(os.environ.get("KDKIT_CACHE", Path.home() / ".cache" / "kdkit")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: str | Path, *, block: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock (`flock`) on the file `path` (created empty if missing).

    Yields True once held; with block=False yields False at once if another process (or another
    open of the file in this one) holds it. The lock goes with the process: a killed holder never
    leaves it locked. Lock files stay (removing one would race with a process waiting on it).
    Without `fcntl` (Windows) nothing is locked: run one writer at a time there.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
