"""Names from manifests and the command line become filesystem paths only through this module.

Two independent defences, both required:

1. ``safe_name``: an allow-list. A name is 1-64 ASCII letters, digits, ``.``, ``_`` or ``-``,
   starting with a letter or digit, with no ``..`` anywhere, no trailing ``.`` and no
   Windows device name (``CON``, ``NUL``, ``COM1`` ...). Everything else is refused: separators,
   traversal, absolute paths, NUL bytes, whitespace, ``~``, ``%``, shell metacharacters and
   look-alike Unicode (Cyrillic ``а``, fullwidth ``ａ``) never reach ``open``/``mkdir``.
2. Containment on the *real* path: after joining, ``os.path.realpath`` of the result and of
   every existing ancestor must stay inside ``realpath(root)``, so a symlink planted inside the
   results tree cannot redirect a write elsewhere. ``ensure_dir`` goes further and creates each
   level relative to an open directory descriptor with ``O_NOFOLLOW``, so a symlink swapped in
   between the check and the ``mkdir`` (TOCTOU) is refused too.

The root itself is trusted (it comes from configuration, not from a name): it may be a symlink,
and it is resolved once. Everything below it is not trusted.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from sweeper.errors import UserError

__all__ = ["safe_name", "contained", "ensure_dir", "check_inside", "MAX_NAME_LEN"]

MAX_NAME_LEN = 64

# fullmatch, not ``$``: ``$`` also matches before a trailing newline. The classes are spelled
# out (no \w, \d) so that only ASCII matches, whatever the re flags.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,%d}" % (MAX_NAME_LEN - 1))

# Device names Windows reserves in every directory, with or without an extension
# ("nul.txt" is the NUL device too). Refused everywhere so that a results tree can be copied to,
# or shared with, a Windows machine without surprises.
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(10)}
    | {f"LPT{i}" for i in range(10)}
)

_SHOW_MAX = 80


def _render(value: object) -> str:
    """``repr``, or ``ascii`` when the value holds non-ASCII.

    ``repr`` escapes NUL, newlines and other non-printable characters; ``ascii`` also makes a
    look-alike (Cyrillic 'а' for Latin 'a') visible as ``\\u0430`` instead of looking identical
    to the name the user meant.
    """
    shown = repr(value)
    return shown if shown.isascii() else ascii(value)


def _show(value: object, limit: int = _SHOW_MAX) -> str:
    """A one-line, printable rendering of an untrusted value, at most about ``limit`` characters.

    A long string keeps its head and says how long it was.
    """
    shown = _render(value)
    if len(shown) <= limit:
        return shown
    if isinstance(value, (str, bytes)):
        n = min(len(value), limit)
        while n > 0 and len(_render(value[:n])) > limit - 20:
            n = n * 3 // 4
        unit = "chars" if isinstance(value, str) else "bytes"
        return f"{_render(value[:n])}... ({len(value)} {unit})"
    return shown[:limit] + "..."


def _show_path(value: object, limit: int = 2 * _SHOW_MAX) -> str:
    """Like ``_show`` for a path: a long path keeps its tail, where the interesting part is."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    shown = _render(value)
    if len(shown) <= limit or not isinstance(value, str):
        return shown if len(shown) <= limit else _show(value, limit)
    n = min(len(value), limit)
    while n > 0 and len(_render("..." + value[-n:])) > limit:
        n = n * 3 // 4
    return _render("..." + value[-n:])


def _refuse(value: object, field: str) -> UserError:
    return UserError(
        f"{field} {_show(value)} is not a safe name: use 1-64 ASCII letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )


def safe_name(value: str, field: str) -> str:
    """Return ``value`` unchanged if it is safe to use as one path component, else raise ``UserError``.

    ``field`` names what the value is (``"study name"``, ``"trial id"``) for the error message.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise _refuse(value, field)
    if ".." in value or value.endswith("."):
        # "." and ".." cannot match the regex (first character); "a..b" and "a." can. Windows
        # silently drops a trailing dot, so "run." and "run" would be the same directory there.
        raise _refuse(value, field)
    if value.split(".", 1)[0].upper() in _WINDOWS_RESERVED:
        raise _refuse(value, field)
    return value


def _inside(real: str, root_real: str) -> bool:
    try:
        return os.path.commonpath([root_real, real]) == root_real
    except ValueError:  # different drives on Windows, or a mix of absolute and relative
        return False


def _real_root(root: str | os.PathLike) -> str:
    try:
        raw = os.fspath(root)
        return os.path.realpath(os.fsdecode(raw) if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError) as exc:
        raise UserError(f"root {_show_path(root)} is not a usable path: {exc}") from None


def contained(root: str | os.PathLike, *parts: str) -> Path:
    """Join ``parts`` (each must pass ``safe_name``) under ``root`` and prove the result stays inside.

    Every existing prefix of the joined path is resolved with ``realpath`` and must lie inside
    ``realpath(root)``; a symlink anywhere in the chain that leads out of the root raises
    ``UserError`` naming it. Returns the resolved path. Nothing is created.
    """
    for part in parts:
        safe_name(part, "path component")
    root_real = _real_root(root)
    current = root_real
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        if not os.path.lexists(current):
            # Nothing below a missing entry can exist, so the rest of the chain is plain names.
            continue
        real = os.path.realpath(current)
        if not _inside(real, root_real):
            raise _escapes(root_real, parts[: i + 1], real)
    result = os.path.realpath(current)
    if not _inside(result, root_real):  # unreachable after the loop; kept as the final guard
        raise _escapes(root_real, parts, result)
    return Path(result)


def _escapes(root_real: str, chain: tuple[str, ...], real: str) -> UserError:
    rel = "/".join(chain) or "."
    return UserError(
        f"{_show_path(rel)} under root {_show_path(root_real)} resolves to {_show_path(real)}, "
        "outside the root: a symlink in the chain leads elsewhere; refusing to use it"
    )


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
_HAVE_DIR_FD = os.mkdir in os.supports_dir_fd and os.open in os.supports_dir_fd


def _not_a_real_dir(root_real: str, chain: tuple[str, ...], what: str) -> UserError:
    rel = "/".join(chain)
    return UserError(
        f"{_show_path(rel)} under root {_show_path(root_real)} {what}; "
        "refusing to create anything through it"
    )


def ensure_dir(root: str | os.PathLike, *parts: str) -> Path:
    """Create ``root/part1/part2/...`` (each part a safe name) and return its resolved path.

    The root is created if missing (it is trusted). Below it, each level is created with
    ``os.mkdir`` and then checked not to be a symlink before descending into it. On POSIX the
    walk holds an ``O_NOFOLLOW`` descriptor for each level and creates the next one relative to
    it, so a symlink swapped in after the check cannot redirect the next ``mkdir``. Any symlink
    below the root is refused, even one that points back inside the root.
    """
    contained(root, *parts)  # validates every name, rejects symlinks leading out
    root_real = _real_root(root)
    os.makedirs(root_real, exist_ok=True)
    if _HAVE_DIR_FD:
        final = _ensure_dir_fd(root_real, parts)
    else:  # pragma: no cover - Windows
        final = _ensure_dir_lstat(root_real, parts)
    # Belt and braces: the finished path must still resolve inside the root.
    real = os.path.realpath(final)
    if not _inside(real, root_real):
        raise _escapes(root_real, parts, real)
    return Path(real)


def _ensure_dir_fd(root_real: str, parts: tuple[str, ...]) -> str:
    current = root_real
    fd = os.open(root_real, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for i, part in enumerate(parts):
            chain = parts[: i + 1]
            current = os.path.join(current, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, dir_fd=fd)
            try:
                st = os.lstat(part, dir_fd=fd)
            except FileNotFoundError:
                raise _not_a_real_dir(root_real, chain, "vanished while it was being created") from None
            if stat.S_ISLNK(st.st_mode):
                raise _not_a_real_dir(root_real, chain, "is a symlink")
            if not stat.S_ISDIR(st.st_mode):
                raise _not_a_real_dir(root_real, chain, "exists and is not a directory")
            try:
                # O_NOFOLLOW: if the directory was swapped for a symlink since the lstat, this
                # fails (ELOOP) instead of following it.
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _not_a_real_dir(
                    root_real, chain, f"cannot be opened as a plain directory ({exc.strerror})"
                ) from None
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)
    return current


def _ensure_dir_lstat(root_real: str, parts: tuple[str, ...]) -> str:  # pragma: no cover - Windows
    current = root_real
    for i, part in enumerate(parts):
        chain = parts[: i + 1]
        current = os.path.join(current, part)
        with contextlib.suppress(FileExistsError):
            os.mkdir(current)
        st = os.lstat(current)
        if stat.S_ISLNK(st.st_mode) or getattr(st, "st_reparse_tag", 0):
            raise _not_a_real_dir(root_real, chain, "is a symlink or junction")
        if not stat.S_ISDIR(st.st_mode):
            raise _not_a_real_dir(root_real, chain, "exists and is not a directory")
    return current


def check_inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Resolve a path that came from elsewhere (a results file, a checkpoint record) and prove it
    lies inside ``root``; return the resolved path or raise ``UserError``.

    A relative ``path`` is taken relative to ``root`` (that is how results files record them);
    an absolute one is checked as is. Symlinks are resolved before the check, so a recorded path
    that leads out of the root through a symlink is refused. The root itself counts as inside.
    """
    root_real = _real_root(root)
    try:
        raw = os.fspath(path)
        if isinstance(raw, bytes):
            raw = os.fsdecode(raw)
        real = os.path.realpath(os.path.join(root_real, raw))
    except (TypeError, ValueError) as exc:  # not a path; embedded NUL byte
        raise UserError(f"path {_show_path(path)} is not a usable path: {exc}") from None
    if not _inside(real, root_real):
        raise UserError(
            f"path {_show_path(path)} resolves to {_show_path(real)}, outside the root "
            f"{_show_path(root_real)}; refusing to use it"
        )
    return Path(real)
