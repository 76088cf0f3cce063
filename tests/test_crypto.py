"""Tests for sweeper.crypto: real Fernet, real files, no mocks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweeper.crypto import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK_SIZE,
    KeyRing,
    decrypt_file,
    encrypt_file,
    load_keys,
    rotate_file,
    verify_file,
)
from sweeper.errors import IntegrityError, SweeperError, UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = "SWEEPER_TEST_MODEL_KEY"
CHUNK = 1024
MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------- helpers


def _new_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def key_a() -> str:
    return _new_key()


@pytest.fixture
def key_b() -> str:
    return _new_key()


@pytest.fixture
def use_key(monkeypatch):
    """use_key("k1,k2") puts that value in $ENV."""

    def _set(value: str) -> None:
        monkeypatch.setenv(ENV, value)

    return _set


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _marked(n: int) -> bytes:
    """Plaintext whose every 64-byte stretch contains a recognisable marker (to scan disks for leaks)."""
    unit = b"PLAINTEXT-MARKER:" + b"x" * 47
    return (unit * (n // len(unit) + 1))[:n]


def _listing(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def _chunk_records(enc: bytes) -> list[tuple[int, int]]:
    """(start, end) of each length-prefixed chunk record after the header."""
    out, pos = [], HEADER_SIZE
    while pos < len(enc):
        (n,) = struct.unpack_from(">I", enc, pos)
        out.append((pos, pos + 4 + n))
        pos += 4 + n
    assert pos == len(enc)
    return out


def _split(enc: bytes) -> tuple[bytes, list[bytes]]:
    return enc[:HEADER_SIZE], [enc[a:b] for a, b in _chunk_records(enc)]


def _check_refused(excinfo, cls, secrets=()) -> str:
    """The error is exactly ``cls`` (not a subclass surprise), one line, right exit code, no secret."""
    exc = excinfo.value
    assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
    assert isinstance(exc, SweeperError)
    assert exc.exit_code == (5 if cls is IntegrityError else 2)
    msg = str(exc)
    assert msg and "\n" not in msg and msg == msg.strip()
    everything = msg + repr(exc) + "".join(traceback.format_exception(exc))
    for s in secrets:
        assert s and s not in everything
        # the key's base64 body without padding, too
        assert s.rstrip("=") not in everything
    return msg


def _encrypt_bytes(tmp: Path, data: bytes, name="model.safetensors", chunk_size=CHUNK) -> Path:
    src = tmp / name
    src.write_bytes(data)
    dst = tmp / (name + ".enc")
    encrypt_file(src, dst, ENV, chunk_size=chunk_size)
    src.unlink()
    return dst


# -------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK + 7],
    ids=["empty", "one", "chunk-1", "chunk", "chunk+1", "two-chunks", "several"],
)
def test_round_trip_is_byte_identical(tmp_path, use_key, key_a, size):
    use_key(key_a)
    data = _data(size, seed=size)
    src, enc, out = tmp_path / "m.bin", tmp_path / "m.bin.enc", tmp_path / "m.out"
    src.write_bytes(data)
    s_enc = encrypt_file(src, enc, ENV, chunk_size=CHUNK)
    expected_chunks = max(1, -(-size // CHUNK))
    sha = hashlib.sha256(data).hexdigest()
    assert s_enc["chunks"] == expected_chunks
    assert s_enc["bytes"] == size
    assert s_enc["sha256"] == sha
    assert s_enc["chunk_size"] == CHUNK

    blob = enc.read_bytes()
    assert blob.startswith(MAGIC)
    assert len(_chunk_records(blob)) == expected_chunks

    s_ver = verify_file(enc, ENV)
    s_dec = decrypt_file(enc, out, ENV)
    assert out.read_bytes() == data
    assert s_ver == s_dec == s_enc
    assert _listing(tmp_path) == {"m.bin", "m.bin.enc", "m.out"}


def test_round_trip_default_chunk_size(tmp_path, use_key, key_a):
    use_key(key_a)
    assert DEFAULT_CHUNK_SIZE == 4 * MIB
    data = _data(2 * DEFAULT_CHUNK_SIZE + 3, seed=7)
    src, enc, out = tmp_path / "m", tmp_path / "m.enc", tmp_path / "m.out"
    src.write_bytes(data)
    s = encrypt_file(src, enc, ENV)
    assert (s["chunks"], s["chunk_size"]) == (3, DEFAULT_CHUNK_SIZE)
    decrypt_file(enc, out, ENV)
    assert out.read_bytes() == data


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 3000), chunk_size=st.integers(1, 700))
def test_round_trip_property(use_key, key_a, size, chunk_size):
    use_key(key_a)
    data = _data(size, seed=size * 1000 + chunk_size)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "p").write_bytes(data)
        s = encrypt_file(d / "p", d / "p.enc", ENV, chunk_size=chunk_size)
        assert s["chunks"] == max(1, -(-size // chunk_size))
        assert decrypt_file(d / "p.enc", d / "q", ENV)["sha256"] == hashlib.sha256(data).hexdigest()
        assert (d / "q").read_bytes() == data


def test_ciphertext_hides_plaintext_and_is_randomised(tmp_path, use_key, key_a):
    use_key(key_a)
    data = _marked(4 * CHUNK)
    src = tmp_path / "m"
    src.write_bytes(data)
    encrypt_file(src, tmp_path / "1.enc", ENV, chunk_size=CHUNK)
    encrypt_file(src, tmp_path / "2.enc", ENV, chunk_size=CHUNK)
    e1, e2 = (tmp_path / "1.enc").read_bytes(), (tmp_path / "2.enc").read_bytes()
    assert b"PLAINTEXT-MARKER" not in e1
    assert e1[len(MAGIC) : len(MAGIC) + 16] != e2[len(MAGIC) : len(MAGIC) + 16]  # fresh file id
    assert len(e1) == len(e2) and e1 != e2


def test_encrypt_overwrites_existing_destination_atomically(tmp_path, use_key, key_a):
    use_key(key_a)
    (tmp_path / "m").write_bytes(b"new model")
    (tmp_path / "m.enc").write_bytes(b"old contents")
    encrypt_file(tmp_path / "m", tmp_path / "m.enc", ENV)
    decrypt_file(tmp_path / "m.enc", tmp_path / "out", ENV)
    assert (tmp_path / "out").read_bytes() == b"new model"
    assert _listing(tmp_path) == {"m", "m.enc", "out"}


def test_verify_writes_nothing(tmp_path, use_key, key_a):
    use_key(key_a)
    data = _marked(3 * CHUNK + 5)
    enc = _encrypt_bytes(tmp_path, data)
    before = _listing(tmp_path)
    s = verify_file(enc, ENV)
    assert s["chunks"] == 4 and s["bytes"] == len(data)
    assert s["sha256"] == hashlib.sha256(data).hexdigest()
    assert _listing(tmp_path) == before


# ---------------------------------------------------------------------------------------- tampering


def _assert_no_plaintext_left(d: Path, expected: set[str]) -> None:
    assert _listing(d) == expected
    for p in d.rglob("*"):
        if p.is_file():
            assert b"PLAINTEXT-MARKER" not in p.read_bytes(), p


def test_1000_random_bit_flips_are_all_refused(tmp_path, use_key, key_a):
    use_key(key_a)
    data = _marked(4 * 256)
    enc = _encrypt_bytes(tmp_path, data, name="model.bin", chunk_size=256)
    good = enc.read_bytes()
    assert len(_chunk_records(good)) == 4
    out = tmp_path / "model.bin"  # decrypt next to the ciphertext: the strictest place for leftovers
    rng = random.Random(20240611)
    header_hits = 0
    t0 = time.perf_counter()
    for _ in range(1000):
        bit = rng.randrange(len(good) * 8)
        header_hits += bit < HEADER_SIZE * 8
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        enc.write_bytes(bad)
        with pytest.raises(IntegrityError) as ei:
            decrypt_file(enc, out, ENV)
        _check_refused(ei, IntegrityError, [key_a])
        assert _listing(tmp_path) == {"model.bin.enc"}, f"bit {bit}"
        with pytest.raises(IntegrityError):
            verify_file(enc, ENV)
    assert header_hits > 0
    _assert_no_plaintext_left(tmp_path, {"model.bin.enc"})
    print(f"1000 bit flips refused in {time.perf_counter() - t0:.2f}s")


def test_every_header_bit_is_authenticated(tmp_path, use_key, key_a):
    use_key(key_a)
    enc = _encrypt_bytes(tmp_path, _marked(3 * 256), name="m", chunk_size=256)
    good = enc.read_bytes()
    for bit in range(HEADER_SIZE * 8):
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        enc.write_bytes(bad)
        with pytest.raises(IntegrityError):
            decrypt_file(enc, tmp_path / "m", ENV)
    _assert_no_plaintext_left(tmp_path, {"m.enc"})


def _truncation_points(enc: bytes) -> dict[str, int]:
    recs = _chunk_records(enc)
    return {
        "empty": 0,
        "mid-magic": 5,
        "mid-header": HEADER_SIZE - 1,
        "header-only": HEADER_SIZE,
        "mid-length-prefix": HEADER_SIZE + 2,
        "after-first-length-prefix": HEADER_SIZE + 4,
        "mid-first-token": (recs[0][0] + recs[0][1]) // 2,
        "at-chunk-boundary": recs[2][0],
        "mid-second-prefix": recs[1][0] + 3,
        "last-byte-missing": len(enc) - 1,
    }


@pytest.mark.parametrize(
    "point",
    list(_truncation_points(b"\0" * HEADER_SIZE + (struct.pack(">I", 1) + b"x") * 4)),
)
def test_truncation_is_refused(tmp_path, use_key, key_a, point):
    use_key(key_a)
    enc = _encrypt_bytes(tmp_path, _marked(4 * CHUNK - 10))
    good = enc.read_bytes()
    cut = _truncation_points(good)[point]
    enc.write_bytes(good[:cut])
    out = tmp_path / "model.safetensors"
    with pytest.raises(IntegrityError) as ei:
        decrypt_file(enc, out, ENV)
    msg = _check_refused(ei, IntegrityError, [key_a])
    assert msg.startswith(str(enc))
    with pytest.raises(IntegrityError):
        verify_file(enc, ENV)
    _assert_no_plaintext_left(tmp_path, {enc.name})


def _other_file(tmp_path: Path, size: int) -> bytes:
    d = tmp_path / "other"
    d.mkdir()
    return _encrypt_bytes(d, _data(size, seed=99)).read_bytes()


SIZE = 4 * CHUNK - 10  # 4 chunks, the last one short


def _tamper(kind: str, good: bytes, tmp_path: Path) -> bytes:
    header, chunks = _split(good)
    if kind == "swap-chunks":
        chunks[1], chunks[2] = chunks[2], chunks[1]
    elif kind == "swap-last-two":  # different lengths: caught by the length field
        chunks[2], chunks[3] = chunks[3], chunks[2]
    elif kind == "drop-middle-chunk":
        del chunks[1]
    elif kind == "drop-last-chunk":
        del chunks[-1]
    elif kind == "duplicate-chunk":
        chunks.insert(2, chunks[1])
    elif kind == "duplicate-last-chunk":
        chunks.append(chunks[-1])
    elif kind == "append-chunk-from-other-file":
        chunks.append(_split(_other_file(tmp_path, SIZE))[1][-1])
    elif kind == "splice-chunk-from-other-file":
        chunks[1] = _split(_other_file(tmp_path, SIZE))[1][1]
    elif kind == "header-from-other-file":
        header = _split(_other_file(tmp_path, SIZE))[0]
    elif kind == "append-garbage":
        chunks.append(b"\x00garbage")
    elif kind == "append-one-byte":
        chunks.append(b"\x00")
    elif kind == "edit-header-file-id":
        header = header[: len(MAGIC)] + bytes(16) + header[len(MAGIC) + 16 :]
    elif kind == "edit-header-size":  # still self-consistent (same chunk count)
        magic, fid, total, cs, size = struct.unpack(">14s16sQIQ", header)
        header = struct.pack(">14s16sQIQ", magic, fid, total, cs, size - 1)
    elif kind == "truncate-with-consistent-header":  # drop the last chunk and fix up the header
        magic, fid, total, cs, size = struct.unpack(">14s16sQIQ", header)
        header = struct.pack(">14s16sQIQ", magic, fid, total - 1, cs, (total - 1) * cs)
        del chunks[-1]
    elif kind == "edit-header-chunk-size":
        magic, fid, total, cs, size = struct.unpack(">14s16sQIQ", header)
        header = struct.pack(">14s16sQIQ", magic, fid, total, cs + 1, size)
    elif kind == "edit-magic-version":
        header = MAGIC[:-1] + b"2" + header[len(MAGIC) :]
    else:  # pragma: no cover
        raise AssertionError(kind)
    return header + b"".join(chunks)


TAMPERINGS = [
    "swap-chunks",
    "swap-last-two",
    "drop-middle-chunk",
    "drop-last-chunk",
    "duplicate-chunk",
    "duplicate-last-chunk",
    "append-chunk-from-other-file",
    "splice-chunk-from-other-file",
    "header-from-other-file",
    "append-garbage",
    "append-one-byte",
    "edit-header-file-id",
    "edit-header-size",
    "truncate-with-consistent-header",
    "edit-header-chunk-size",
    "edit-magic-version",
]


@pytest.mark.parametrize("kind", TAMPERINGS)
def test_structural_tampering_is_refused(tmp_path, use_key, key_a, kind):
    use_key(key_a)
    enc = _encrypt_bytes(tmp_path, _marked(SIZE))
    good = enc.read_bytes()
    bad = _tamper(kind, good, tmp_path)
    assert bad != good
    enc.write_bytes(bad)
    out = tmp_path / "model.safetensors"
    with pytest.raises(IntegrityError) as ei:
        decrypt_file(enc, out, ENV)
    msg = _check_refused(ei, IntegrityError, [key_a])
    with pytest.raises(IntegrityError):
        verify_file(enc, ENV)
    with pytest.raises(IntegrityError):
        rotate_file(enc, tmp_path / "rotated.enc", ENV)
    _assert_no_plaintext_left(tmp_path, {enc.name} | ({"other"} if "other" in kind else set()))
    print(f"{kind}: {msg}")


def test_messages_name_the_chunk(tmp_path, use_key, key_a):
    use_key(key_a)
    enc = _encrypt_bytes(tmp_path, _marked(SIZE))
    good = enc.read_bytes()
    header, chunks = _split(good)
    # flip a bit inside the ciphertext of chunk 3
    c = bytearray(chunks[2])
    c[40] ^= 0x10
    enc.write_bytes(header + chunks[0] + chunks[1] + bytes(c) + chunks[3])
    with pytest.raises(IntegrityError) as ei:
        decrypt_file(enc, tmp_path / "out", ENV)
    msg = _check_refused(ei, IntegrityError, [key_a])
    assert f"{enc}: chunk 3 of 4 failed authentication" in msg
    assert "tampered" in msg and "key" in msg and ENV in msg
    # swapped chunks are reported as out of place
    enc.write_bytes(header + chunks[0] + chunks[2] + chunks[1] + chunks[3])
    with pytest.raises(IntegrityError, match=r"chunk 2 of 4 is out of place \(it is chunk 3\)"):
        verify_file(enc, ENV)
    enc.write_bytes(good + b"junk")
    with pytest.raises(IntegrityError, match="after the last chunk"):
        verify_file(enc, ENV)


def test_failed_decrypt_after_writing_some_chunks_leaves_no_plaintext(tmp_path, use_key, key_a):
    """Chunks 1-7 verify and are written to the temp file; chunk 8 fails: the temp file must go."""
    use_key(key_a)
    enc = _encrypt_bytes(tmp_path, _marked(8 * CHUNK))
    good = bytearray(enc.read_bytes())
    good[-1] ^= 1  # last byte of the last chunk's HMAC
    enc.write_bytes(good)
    existing = tmp_path / "model.safetensors"
    existing.write_bytes(b"previous version")
    with pytest.raises(IntegrityError, match="chunk 8 of 8 failed authentication"):
        decrypt_file(enc, existing, ENV)
    assert existing.read_bytes() == b"previous version"  # untouched
    _assert_no_plaintext_left(tmp_path, {enc.name, existing.name})


def test_forged_huge_chunk_size_is_refused_without_reading_past_the_file(tmp_path, use_key, key_a):
    """A consistent forged header + length field claiming a 256 MiB chunk: truncated, not an OOM."""
    use_key(key_a)
    enc = _encrypt_bytes(tmp_path, _marked(3 * CHUNK))
    bad = bytearray(enc.read_bytes())
    cs = MAX_CHUNK_SIZE
    bad[30:50] = struct.pack(">QIQ", 1, cs, cs)
    bad[50:54] = struct.pack(">I", 57 + ((59 + cs) // 16 + 1) * 16)
    enc.write_bytes(bad)
    with pytest.raises(IntegrityError, match="chunk 1 of 1: truncated"):
        decrypt_file(enc, tmp_path / "out", ENV)
    _assert_no_plaintext_left(tmp_path, {enc.name})


# --------------------------------------------------------------------------------------------- keys


def test_wrong_key_is_an_integrity_error(tmp_path, use_key, key_a, key_b):
    use_key(key_a)
    enc = _encrypt_bytes(tmp_path, _marked(2 * CHUNK))
    use_key(key_b)
    with pytest.raises(IntegrityError) as ei:
        decrypt_file(enc, tmp_path / "out", ENV)
    msg = _check_refused(ei, IntegrityError, [key_a, key_b])
    assert "chunk 1 of 2 failed authentication" in msg
    assert "cannot tell these apart" in msg
    with pytest.raises(IntegrityError):
        verify_file(enc, ENV)
    _assert_no_plaintext_left(tmp_path, {enc.name})


def test_old_key_still_in_the_ring_decrypts(tmp_path, use_key, key_a, key_b):
    use_key(key_a)
    data = _marked(3 * CHUNK)
    enc = _encrypt_bytes(tmp_path, data)
    use_key(f"{key_b}, {key_a}")
    decrypt_file(enc, tmp_path / "out", ENV)
    assert (tmp_path / "out").read_bytes() == data


def _bad_key_cases(key_a: str) -> dict[str, str | None]:
    return {
        "missing": None,
        "empty": "",
        "blank": "   \n",
        "malformed": "this-is-SECRET-not-a-fernet-key",
        "truncated-key": key_a[:-2],
        "valid-then-malformed": f"{key_a},SECRETnotakey",
        "trailing-comma": f"{key_a},",
        "non-ascii": "s\u00e9cret-\u2603-value",
    }


@pytest.mark.parametrize("case", list(_bad_key_cases("k" * 44)))
@pytest.mark.parametrize("op", ["encrypt", "decrypt", "verify", "rotate", "load_keys"])
def test_bad_key_values_are_user_errors_without_the_key(tmp_path, monkeypatch, key_a, key_b, case, op):
    # a real encrypted file, made with another valid key
    monkeypatch.setenv(ENV, key_b)
    enc = _encrypt_bytes(tmp_path, _marked(2 * CHUNK))
    (tmp_path / "plain").write_bytes(b"PLAINTEXT-MARKER")
    value = _bad_key_cases(key_a)[case]
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    before = _listing(tmp_path)
    call = {
        "encrypt": lambda: encrypt_file(tmp_path / "plain", tmp_path / "new.enc", ENV),
        "decrypt": lambda: decrypt_file(enc, tmp_path / "out", ENV),
        "verify": lambda: verify_file(enc, ENV),
        "rotate": lambda: rotate_file(enc, tmp_path / "rot.enc", ENV),
        "load_keys": lambda: load_keys(ENV),
    }[op]
    with pytest.raises(UserError) as ei:
        call()
    secrets = [key_a, key_b] + ([value.strip()] if value and value.strip() else [])
    secrets += [s for s in (value or "").split(",") if s.strip()]
    msg = _check_refused(ei, UserError, secrets)
    assert ENV in msg
    assert ei.value.__cause__ is None and ei.value.__context__ is None
    assert _listing(tmp_path) == before


def test_key_passed_instead_of_variable_name_is_not_echoed(key_a):
    for wrong in (key_a, f"{key_a},{key_a}", "", "1ABC", "has space", "A=B"):
        with pytest.raises(UserError) as ei:
            load_keys(wrong)
        msg = _check_refused(ei, UserError, [key_a])
        assert "by NAME" in msg


def test_load_keys_ring(monkeypatch, key_a, key_b):
    monkeypatch.setenv(ENV, f" {key_a} ,{key_b}\n")
    ring = load_keys(ENV)
    assert isinstance(ring, KeyRing)
    assert len(ring) == 2 and ring.env_var == ENV
    assert key_a not in repr(ring) and key_b not in repr(ring)
    token = ring.encrypt(b"x")
    assert Fernet(key_a).decrypt(token) == b"x"  # encrypts with the first key
    assert ring.decrypt(Fernet(key_b).encrypt(b"y")) == b"y"  # decrypts with any


# ----------------------------------------------------------------------------------------- rotation


def test_rotation_moves_the_file_to_the_new_key(tmp_path, use_key, key_a, key_b):
    use_key(key_a)
    data = _marked(5 * CHUNK + 3)
    enc = _encrypt_bytes(tmp_path, data)
    rot = tmp_path / "model.rotated.enc"

    use_key(f"{key_b},{key_a}")
    s = rotate_file(enc, rot, ENV)
    assert s["chunks"] == 6 and s["bytes"] == len(data)
    assert s["sha256"] == hashlib.sha256(data).hexdigest()
    old, new = enc.read_bytes(), rot.read_bytes()
    assert old[:HEADER_SIZE] == new[:HEADER_SIZE] and len(old) == len(new)
    assert all(o != n for o, n in zip(_split(old)[1], _split(new)[1]))

    use_key(key_b)
    decrypt_file(rot, tmp_path / "out", ENV)
    assert (tmp_path / "out").read_bytes() == data
    (tmp_path / "out").unlink()

    use_key(key_a)
    with pytest.raises(IntegrityError) as ei:
        decrypt_file(rot, tmp_path / "out", ENV)
    _check_refused(ei, IntegrityError, [key_a, key_b])
    assert not (tmp_path / "out").exists()
    # the original is untouched and still opens with A
    assert verify_file(enc, ENV)["sha256"] == s["sha256"]


def test_rotation_in_place(tmp_path, use_key, key_a, key_b):
    use_key(key_a)
    data = _data(3 * CHUNK, seed=3)
    enc = _encrypt_bytes(tmp_path, data)
    use_key(f"{key_b},{key_a}")
    rotate_file(enc, enc, ENV)
    assert _listing(tmp_path) == {enc.name}
    use_key(key_b)
    assert verify_file(enc, ENV)["sha256"] == hashlib.sha256(data).hexdigest()


def test_rotation_with_only_the_wrong_key_fails_cleanly(tmp_path, use_key, key_a, key_b):
    use_key(key_a)
    enc = _encrypt_bytes(tmp_path, _marked(2 * CHUNK))
    use_key(key_b)
    with pytest.raises(IntegrityError) as ei:
        rotate_file(enc, tmp_path / "rot.enc", ENV)
    _check_refused(ei, IntegrityError, [key_a, key_b])
    assert _listing(tmp_path) == {enc.name}


# ------------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize("chunk_size", [0, -1, MAX_CHUNK_SIZE + 1, 1.5, True, "4096"])
def test_bad_chunk_size(tmp_path, use_key, key_a, chunk_size):
    use_key(key_a)
    (tmp_path / "m").write_bytes(b"abc")
    with pytest.raises(UserError) as ei:
        encrypt_file(tmp_path / "m", tmp_path / "m.enc", ENV, chunk_size=chunk_size)
    _check_refused(ei, UserError, [key_a])
    assert _listing(tmp_path) == {"m"}


def test_bad_paths_are_user_errors(tmp_path, use_key, key_a):
    use_key(key_a)
    (tmp_path / "m").write_bytes(b"abc")
    (tmp_path / "adir").mkdir()
    cases = [
        lambda: encrypt_file(tmp_path / "missing", tmp_path / "x.enc", ENV),
        lambda: encrypt_file(tmp_path / "adir", tmp_path / "x.enc", ENV),
        lambda: encrypt_file(tmp_path / "m", tmp_path / "adir", ENV),
        lambda: decrypt_file(tmp_path / "missing.enc", tmp_path / "x", ENV),
        lambda: verify_file(tmp_path / "missing.enc", ENV),
        lambda: rotate_file(tmp_path / "missing.enc", tmp_path / "x", ENV),
    ]
    for call in cases:
        with pytest.raises(UserError) as ei:
            call()
        _check_refused(ei, UserError, [key_a])
    assert _listing(tmp_path) == {"m", "adir"}
    assert not any((tmp_path / "adir").iterdir())


def test_plain_file_given_to_decrypt(tmp_path, use_key, key_a):
    use_key(key_a)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 200)
    with pytest.raises(IntegrityError, match="not a sweeper-encrypted file"):
        decrypt_file(tmp_path / "model.safetensors", tmp_path / "out", ENV)
    assert _listing(tmp_path) == {"model.safetensors"}


def test_exit_codes_of_raised_errors(tmp_path, monkeypatch, key_a, key_b):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(UserError) as ue:
        load_keys(ENV)
    assert ue.value.exit_code == 2 == UserError.exit_code
    monkeypatch.setenv(ENV, key_a)
    enc = _encrypt_bytes(tmp_path, b"weights")
    monkeypatch.setenv(ENV, key_b)
    with pytest.raises(IntegrityError) as ie:
        verify_file(enc, ENV)
    assert ie.value.exit_code == 5 == IntegrityError.exit_code


def test_header_layout_matches_docs(tmp_path, use_key, key_a):
    use_key(key_a)
    enc = _encrypt_bytes(tmp_path, b"z" * 2500)
    blob = enc.read_bytes()
    magic, fid, total, cs, size = struct.unpack(">14s16sQIQ", blob[:HEADER_SIZE])
    assert (magic, total, cs, size) == (b"SWEEPER-ENC\x00v1", 3, CHUNK, 2500)
    assert HEADER_SIZE == 50
    # records: u32 length + raw (base64-decoded) Fernet token: version 0x80 first
    for a, b in _chunk_records(blob):
        (n,) = struct.unpack(">I", blob[a : a + 4])
        assert n == b - a - 4 and blob[a + 4] == 0x80
    # the token's plaintext: header copy || index u64 || is_last u8 || data
    a, b = _chunk_records(blob)[2]
    inner = Fernet(key_a).decrypt(base64.urlsafe_b64encode(blob[a + 4 : b]))
    assert inner[:HEADER_SIZE] == blob[:HEADER_SIZE]
    assert struct.unpack(">QB", inner[HEADER_SIZE : HEADER_SIZE + 9]) == (2, 1)
    assert inner[HEADER_SIZE + 9 :] == b"z" * (2500 - 2 * CHUNK)
    assert fid.hex() == verify_file(enc, ENV)["file_id"]


# ------------------------------------------------------------------------------------ peak memory

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time
    t0 = time.perf_counter()
    from sweeper import crypto
    op = sys.argv[1]
    if op == "baseline":
        summary = None
    elif op == "encrypt":
        summary = crypto.encrypt_file(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        summary = crypto.decrypt_file(sys.argv[2], sys.argv[3], sys.argv[4])
    def peak_rss():
        # VmHWM: this process's own peak since exec. ru_maxrss is not: Linux carries the forking
        # parent's high-water mark across fork+exec, so a child of a 450 MiB pytest process
        # "peaked" at 450 MiB before doing anything.
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "summary": summary,
        "seconds": time.perf_counter() - t0,
        "maxrss_bytes": peak_rss(),
    }))
    """
)


def _measure(*args: str, key: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **{ENV: key})
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args, ENV],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_encrypting_1gb(tmp_path, capsys, key_a):
    size = 1024 * MIB
    block = os.urandom(4 * MIB)
    src, enc, out = tmp_path / "big.bin", tmp_path / "big.bin.enc", tmp_path / "big.out"
    sha = hashlib.sha256()
    try:
        with open(src, "wb") as fh:
            for _ in range(size // len(block)):
                fh.write(block)
                sha.update(block)
        limit = 2 * DEFAULT_CHUNK_SIZE + 300 * 1000 * 1000
        base = _measure("baseline", key=key_a)
        e = _measure("encrypt", str(src), str(enc), key=key_a)
        src.unlink()
        d = _measure("decrypt", str(enc), str(out), key=key_a)
        with capsys.disabled():
            print(
                f"\n[crypto 1 GiB, chunk {DEFAULT_CHUNK_SIZE // MIB} MiB] "
                f"interpreter+import baseline {base['maxrss_bytes'] / MIB:.1f} MiB; "
                f"encrypt peak RSS {e['maxrss_bytes'] / MIB:.1f} MiB in {e['seconds']:.2f}s; "
                f"decrypt peak RSS {d['maxrss_bytes'] / MIB:.1f} MiB in {d['seconds']:.2f}s; "
                f"limit {limit / MIB:.1f} MiB"
            )
        assert e["summary"]["bytes"] == size and e["summary"]["chunks"] == 256
        assert e["summary"]["sha256"] == sha.hexdigest() == d["summary"]["sha256"]
        assert out.stat().st_size == size
        assert e["maxrss_bytes"] < limit
        assert d["maxrss_bytes"] < limit
    finally:
        for p in (src, enc, out):
            p.unlink(missing_ok=True)
