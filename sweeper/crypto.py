"""Chunked, streaming, tamper-evident Fernet encryption of model files.

A model file is encrypted chunk by chunk (``DEFAULT_CHUNK_SIZE`` = 4 MiB of plaintext per chunk), so a
15 GB checkpoint never sits whole in memory. Every chunk is one Fernet token (AES-128-CBC + HMAC-SHA256)
whose plaintext starts with a copy of the file's clear header plus the chunk's index and a last-chunk
flag, so a reordered, dropped, duplicated, appended or foreign chunk, an edited header, a truncation or
a flipped bit anywhere is refused with :class:`~sweeper.errors.IntegrityError` (exit code 5).

On-disk layout (all integers big-endian; see docs/encryption.md)::

    header (50 bytes, in the clear):
        magic          14 bytes   b"SWEEPER-ENC\\x00v1"
        file_id        16 bytes   random per encryption
        total_chunks    u64       max(1, ceil(plaintext_size / chunk_size))
        chunk_size      u32       plaintext bytes per chunk (the last may be shorter, or empty)
        plaintext_size  u64
    then total_chunks times:
        token_length    u32       length of the raw token that follows
        token           bytes     a Fernet token, base64-DECODED (raw bytes; re-encoded to decrypt)

    plaintext of chunk i's token (59 + len(data) bytes):
        header          50 bytes  byte-for-byte copy of the clear header above
        index           u64       i, counting from 0
        is_last         u8        1 for the last chunk, else 0
        data            chunk_len(i) bytes of the model file

Keys come from an environment variable whose *name* is given (``--key-env VAR``); its value is one
Fernet key or several comma-separated keys, newest first. Encryption uses the first; decryption tries
all (``MultiFernet``); :func:`rotate_file` re-encrypts every chunk under the first. No message or
exception raised here ever contains a key.

Every output is written to a temporary file in the destination directory and renamed into place only
after the last chunk has been written and (when decrypting) verified; on any failure the temporary
file is deleted, so no partial plaintext is left on disk.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import IO, Iterator

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from sweeper.errors import IntegrityError, UserError
from sweeper.fsutil import atomic_open

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAGIC",
    "HEADER_SIZE",
    "KeyRing",
    "load_keys",
    "encrypt_file",
    "decrypt_file",
    "verify_file",
    "rotate_file",
]

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
# Upper bound on chunk_size, on encrypt and on decrypt: a forged header cannot make us allocate more.
MAX_CHUNK_SIZE = 256 * 1024 * 1024

MAGIC = b"SWEEPER-ENC\x00v1"
_HEADER = struct.Struct(">14s16sQIQ")  # magic, file_id, total_chunks, chunk_size, plaintext_size
HEADER_SIZE = _HEADER.size  # 50
_FILE_ID_SIZE = 16
_CHUNK_TAIL = struct.Struct(">QB")  # index, is_last (follows the header copy inside each token)
_INNER_PREFIX = HEADER_SIZE + _CHUNK_TAIL.size  # 59 bytes before the chunk data
_LEN = struct.Struct(">I")

# Fernet token: version(1) || timestamp(8) || iv(16) || AES-128-CBC ciphertext (PKCS7) || HMAC-SHA256(32)
_FERNET_OVERHEAD = 1 + 8 + 16 + 32

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KEYGEN_HINT = (
    "generate one with: python -c \"from cryptography.fernet import Fernet; "
    "print(Fernet.generate_key().decode())\""
)


def _token_size(plaintext_len: int) -> int:
    """Exact length of a raw (base64-decoded) Fernet token for ``plaintext_len`` bytes."""
    return _FERNET_OVERHEAD + (plaintext_len // 16 + 1) * 16


# --------------------------------------------------------------------------------------------- keys


class KeyRing:
    """The keys read from one environment variable: encrypt with the first, decrypt with any.

    A thin wrapper around :class:`cryptography.fernet.MultiFernet` (``.multi``) that remembers the
    variable's name and never shows a key in its ``repr``.
    """

    __slots__ = ("env_var", "count", "primary", "multi")

    def __init__(self, env_var: str, fernets: list[Fernet]):
        self.env_var = env_var
        self.count = len(fernets)
        self.primary = fernets[0]
        self.multi = MultiFernet(fernets)

    def encrypt(self, data: bytes) -> bytes:
        return self.multi.encrypt(data)

    def decrypt(self, token: bytes | str) -> bytes:
        return self.multi.decrypt(token)

    def rotate(self, token: bytes | str) -> bytes:
        return self.multi.rotate(token)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"KeyRing(env_var={self.env_var!r}, keys={self.count})"


def load_keys(env_var: str) -> KeyRing:
    """Read the Fernet key(s) from the environment variable *named* ``env_var``.

    The value is one url-safe base64 Fernet key, or several separated by commas (newest first;
    whitespace around each is ignored). Raises :class:`UserError` naming the variable (never the value)
    when the variable is missing or empty or a key is malformed.
    """
    if not isinstance(env_var, str) or not _ENV_NAME.match(env_var):
        # Do not echo it: a common slip is passing the key itself (`--key-env "$KEY"`), and a Fernet
        # key always contains '=' or '-', so it never passes this check and is never printed.
        raise UserError(
            "the key environment variable must be given by NAME (letters, digits and '_', "
            "e.g. --key-env SWEEPER_MODEL_KEY), not by value"
        )
    value = os.environ.get(env_var)
    if value is None:
        raise UserError(
            f"environment variable {env_var} is not set; it must hold a Fernet key "
            f"(or comma-separated keys, newest first); {_KEYGEN_HINT}"
        )
    if not value.strip():
        raise UserError(
            f"environment variable {env_var} is empty; it must hold a Fernet key "
            f"(or comma-separated keys, newest first); {_KEYGEN_HINT}"
        )
    parts = [p.strip() for p in value.split(",")]
    n = len(parts)
    fernets: list[Fernet] = []
    problem = None
    for k, part in enumerate(parts, 1):
        which = f"key {k} of {n}" if n > 1 else "its key"
        if not part:
            problem = f"environment variable {env_var}: {which} is empty (a stray comma?)"
            break
        try:
            fernets.append(Fernet(part))
        except (ValueError, TypeError):
            # Raised outside this handler so the original exception (whatever it holds) is not even
            # attached as __context__.
            problem = (
                f"environment variable {env_var}: {which} is not a valid Fernet key "
                f"(expected 44 characters of url-safe base64 encoding 32 bytes); {_KEYGEN_HINT}"
            )
            break
    del value, parts
    if problem is not None:
        raise UserError(problem)
    return KeyRing(env_var, fernets)


# ------------------------------------------------------------------------------------------ header


@dataclass(frozen=True)
class _Header:
    file_id: bytes
    total: int
    chunk_size: int
    size: int

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, self.file_id, self.total, self.chunk_size, self.size)

    def chunk_len(self, index: int) -> int:
        if index < self.total - 1:
            return self.chunk_size
        return self.size - (self.total - 1) * self.chunk_size


def _chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


def _read_header(fh: IO[bytes], name: str) -> tuple[_Header, bytes]:
    raw = fh.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        if not raw:
            raise IntegrityError(f"{name}: file is empty (truncated, or not a sweeper-encrypted file)")
        if not raw.startswith(MAGIC[: len(raw)]):
            raise IntegrityError(f"{name}: not a sweeper-encrypted file (no header)")
        raise IntegrityError(
            f"{name}: truncated inside the header ({len(raw)} of {HEADER_SIZE} bytes)"
        )
    magic, file_id, total, chunk_size, size = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise IntegrityError(
            f"{name}: not a sweeper-encrypted file, or its header is damaged (bad magic)"
        )
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE or total != _chunk_count(size, chunk_size):
        raise IntegrityError(
            f"{name}: header is inconsistent (chunk size {chunk_size}, {total} chunks for "
            f"{size} bytes): tampered or damaged"
        )
    return _Header(file_id, total, chunk_size, size), raw


# ------------------------------------------------------------------------------------------- files


def _readinto_full(fh: IO[bytes], mv: memoryview) -> int:
    """Fill ``mv`` from ``fh``; return how many bytes were read (fewer only at end of file)."""
    got, want = 0, len(mv)
    while got < want:
        n = fh.readinto(mv[got:])
        if not n:
            break
        got += n
    return got


def _open_src(path: str | os.PathLike) -> IO[bytes]:
    name = os.fspath(path)
    try:
        return open(name, "rb")
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a directory, not a file") from None
    except PermissionError:
        raise UserError(f"{name}: permission denied") from None
    except OSError as e:
        raise UserError(f"{name}: cannot open: {e.strerror or e}") from None


@contextlib.contextmanager
def _output(src: str, dst: str | os.PathLike) -> Iterator[IO[bytes]]:
    """``atomic_open(dst)``, with OS errors (disk full, read-only, ...) turned into one-line UserErrors.

    Whatever goes wrong inside, the temporary file is removed by ``atomic_open`` before the error
    leaves this block, so nothing partial stays on disk.
    """
    name = os.fspath(dst)
    if os.path.isdir(name):
        raise UserError(f"{name}: is a directory; give the output file's path")
    try:
        with atomic_open(name, "wb") as out:
            yield out
    except OSError as e:
        raise UserError(f"{src} -> {name}: {e.strerror or e}") from e


def _chunks(
    fh: IO[bytes], name: str, hdr: _Header, hbytes: bytes, keys: KeyRing, *, rotate: bool = False
) -> Iterator[tuple[memoryview, bytes | None]]:
    """Read, authenticate and check every chunk after the header, in order.

    Yields ``(data, new_token)`` per chunk: ``data`` is the chunk's plaintext (valid until the next
    iteration), ``new_token`` the chunk re-encrypted under the primary key (raw bytes) when ``rotate``,
    else None. Raises IntegrityError on the first problem, and after the last chunk if anything
    follows it.
    """
    total = hdr.total
    size = _token_size(_INNER_PREFIX + min(hdr.chunk_size, hdr.size))
    with contextlib.suppress(OSError, AttributeError, ValueError):
        st = os.fstat(fh.fileno())
        if stat.S_ISREG(st.st_mode):
            # An unauthenticated header must not make us allocate more than the file holds.
            size = min(size, max(0, st.st_size - HEADER_SIZE))
    buf = bytearray(max(_LEN.size, size))  # reused for every chunk
    mv = memoryview(buf)
    for i in range(total):
        where = f"{name}: chunk {i + 1} of {total}"
        n = hdr.chunk_len(i)
        expect = _token_size(_INNER_PREFIX + n)
        got = _readinto_full(fh, mv[: _LEN.size])
        if got == 0:
            raise IntegrityError(f"{where} is missing (file truncated or chunks dropped)")
        if got < _LEN.size:
            raise IntegrityError(f"{where}: truncated inside its length prefix")
        (length,) = _LEN.unpack_from(buf, 0)
        if length != expect:
            raise IntegrityError(
                f"{where}: length field says {length} bytes, expected {expect} "
                "(tampered, damaged, or chunks dropped)"
            )
        got = _readinto_full(fh, mv[:expect])  # a buffer shorter than expect: file too short
        if got < expect:
            raise IntegrityError(f"{where}: truncated ({got} of {expect} bytes)")
        token = base64.urlsafe_b64encode(mv[:expect])
        new_raw = None
        try:
            if rotate:
                new_token = keys.rotate(token)
            else:
                plain = keys.decrypt(token)
        except InvalidToken:
            raise IntegrityError(
                f"{where} failed authentication: the file was tampered with, or none of the "
                f"{keys.count} key(s) in ${keys.env_var} is the one it was encrypted with "
                "(Fernet cannot tell these apart)"
            ) from None
        if rotate:
            # Read back what will be written: proves the new token opens under the primary key.
            plain = keys.primary.decrypt(new_token)
            new_raw = base64.urlsafe_b64decode(new_token)
            del new_token
        del token
        pv = memoryview(plain)
        if pv[:HEADER_SIZE] != hbytes:
            raise IntegrityError(
                f"{where} does not belong to this header: the header was edited, or the chunk "
                "was spliced in from another file"
            )
        index, is_last = _CHUNK_TAIL.unpack_from(plain, HEADER_SIZE)
        if index != i:
            raise IntegrityError(
                f"{where} is out of place (it is chunk {index + 1}): chunks were reordered, "
                "duplicated or dropped"
            )
        if is_last != (i == total - 1) or len(plain) - _INNER_PREFIX != n:
            raise IntegrityError(f"{where} has the wrong length or last-chunk flag (tampered)")
        yield pv[_INNER_PREFIX:], new_raw
        del pv, plain
    if fh.read(1):
        raise IntegrityError(
            f"{name}: unexpected data after the last chunk ({total} of {total}): "
            "something was appended"
        )


def _summary(hdr: _Header, sha: "hashlib._Hash") -> dict:
    return {
        "chunks": hdr.total,
        "bytes": hdr.size,
        "sha256": sha.hexdigest(),
        "chunk_size": hdr.chunk_size,
        "file_id": hdr.file_id.hex(),
    }


# ---------------------------------------------------------------------------------------- public


def encrypt_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    env_var: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict:
    """Encrypt ``src`` into ``dst`` (written atomically) under the first key in ``$env_var``.

    Streams ``chunk_size`` bytes at a time. Returns ``{"chunks", "bytes", "sha256", "chunk_size",
    "file_id"}`` where ``bytes``/``sha256`` describe the plaintext.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise UserError(f"chunk size must be an integer number of bytes, got {chunk_size!r}")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise UserError(f"chunk size must be between 1 and {MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    keys = load_keys(env_var)
    name = os.fspath(src)
    with _open_src(src) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{name}: not a regular file")
        size = st.st_size
        hdr = _Header(os.urandom(_FILE_ID_SIZE), _chunk_count(size, chunk_size), chunk_size, size)
        hbytes = hdr.pack()
        buf = bytearray(_INNER_PREFIX + min(chunk_size, size))  # reused: header copy + tail + data
        mv = memoryview(buf)
        mv[:HEADER_SIZE] = hbytes
        sha = hashlib.sha256()
        with _output(name, dst) as out:
            out.write(hbytes)
            for i in range(hdr.total):
                n = hdr.chunk_len(i)
                _CHUNK_TAIL.pack_into(buf, HEADER_SIZE, i, 1 if i == hdr.total - 1 else 0)
                data = mv[_INNER_PREFIX : _INNER_PREFIX + n]
                if _readinto_full(fh, data) != n:
                    raise UserError(f"{name}: the file shrank while it was being encrypted")
                sha.update(data)
                token = keys.encrypt(bytes(mv[: _INNER_PREFIX + n]))  # Fernet wants bytes
                raw = base64.urlsafe_b64decode(token)
                del token
                if len(raw) != _token_size(_INNER_PREFIX + n):  # pragma: no cover - Fernet spec
                    raise RuntimeError("unexpected Fernet token length")
                out.write(_LEN.pack(len(raw)))
                out.write(raw)
                del raw, data
            if fh.read(1):
                raise UserError(f"{name}: the file grew while it was being encrypted")
    return _summary(hdr, sha)


def decrypt_file(src: str | os.PathLike, dst: str | os.PathLike, env_var: str) -> dict:
    """Decrypt ``src`` into ``dst``; ``dst`` appears only once every chunk has been verified.

    Raises IntegrityError (exit 5) on any tampering, truncation, reordering or wrong key, and leaves
    no plaintext behind. Returns the same summary as :func:`encrypt_file`.
    """
    keys = load_keys(env_var)
    name = os.fspath(src)
    with _open_src(src) as fh:
        hdr, hbytes = _read_header(fh, name)
        sha = hashlib.sha256()
        with _output(name, dst) as out:
            for data, _ in _chunks(fh, name, hdr, hbytes, keys):
                sha.update(data)
                out.write(data)
    return _summary(hdr, sha)


def verify_file(src: str | os.PathLike, env_var: str) -> dict:
    """Authenticate every chunk of ``src`` without writing any plaintext; return its summary."""
    keys = load_keys(env_var)
    name = os.fspath(src)
    with _open_src(src) as fh:
        hdr, hbytes = _read_header(fh, name)
        sha = hashlib.sha256()
        for data, _ in _chunks(fh, name, hdr, hbytes, keys):
            sha.update(data)
    return _summary(hdr, sha)


def rotate_file(src: str | os.PathLike, dst: str | os.PathLike, env_var: str) -> dict:
    """Re-encrypt every chunk of ``src`` under the first key in ``$env_var`` into ``dst`` (atomically).

    Each chunk is authenticated with any key in the variable and re-encrypted with
    ``MultiFernet.rotate`` (which keeps the token's timestamp); the header, file id and chunking are
    unchanged. ``dst`` may equal ``src`` (in-place rotation is still atomic).
    """
    keys = load_keys(env_var)
    name = os.fspath(src)
    with _open_src(src) as fh:
        hdr, hbytes = _read_header(fh, name)
        sha = hashlib.sha256()
        with _output(name, dst) as out:
            out.write(hbytes)
            for data, raw in _chunks(fh, name, hdr, hbytes, keys, rotate=True):
                sha.update(data)
                out.write(_LEN.pack(len(raw)))
                out.write(raw)
    return _summary(hdr, sha)
