"""Crash-safe file writes: a reader sees the old file or the new one, never half of either.

Every write goes to a temporary file in the same directory, is fsynced, then renamed over the
target (rename is atomic on POSIX within one filesystem), and the directory is fsynced so the
rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename or create inside it is durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_symlink(link: str | os.PathLike, target: str | os.PathLike) -> None:
    """Point ``link`` at ``target`` atomically (create a temp link, rename over the old one)."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(os.fspath(target), tmp)
    os.replace(tmp, link)


# what ``atomic_open`` (``tempfile.mkstemp``: 8 random characters) and studydb (``.<pid>.tmp``) name their temp files
_TEMP_NAME = re.compile(r"^\..+\.([a-z0-9_]{8}|[0-9]+)\.tmp$")


def remove_stale_temp(directory: str | os.PathLike) -> int:
    """Remove the temp files a killed writer left in ``directory`` (hidden ``.<name>.<random>.tmp`` files, not dirs,
    not links, not in subdirectories). Call it only where no other process writes there (under ``SweepLock``).
    Returns how many were removed."""
    d = Path(directory)
    if d.is_symlink() or not d.is_dir():
        return 0
    n = 0
    for entry in os.scandir(d):
        if _TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                n += 1
    return n
