"""Crash-safe, verified checkpoints that never execute pickled code.

A checkpoint is a directory::

    model.safetensors   weights (safetensors: a flat tensor format, nothing in it can run)
    optimizer.pt        optional; torch.save(optimizer.state_dict()), loaded ONLY with weights_only=True
    state.json          epoch, global_step, metrics, seeds ... (whatever the trainer wants, JSON)
    <extra files>       optional blobs the caller passes by name
    CHECKSUMS.json      written LAST: {"format": "sweeper-ckpt-1", "files": {name: {"sha256", "bytes"}}}

Crash safety: everything is written into a hidden sibling ``.<name>.tmp-<random>``, every file is
fsynced, CHECKSUMS.json goes in last, and only then is the directory renamed to its final name. So a
directory under its final name is always complete; a crash leaves at most a stray tmp directory,
which readers skip and ``cleanup_partials`` removes. CHECKSUMS.json also catches what a rename
cannot: a copy that stopped halfway (Ray Tune uploading a checkpoint), a truncated or bit-flipped
file, a file swapped by someone who can write the directory.

No pickled code ever runs: weights come from safetensors, and the only pickle (optimizer.pt, or a
user's .pt/.bin/.ckpt) is read with ``torch.load(weights_only=True)``, whose unpickler admits only
tensors and plain containers. That holds even after the checksums verified, because a checksum only
proves the file is the one that was listed, not that whoever listed it was honest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import IntegrityError, UserError
from .fsutil import fsync_dir

log = logging.getLogger("sweeper.checkpoint")

FORMAT = "sweeper-ckpt-1"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CHECKSUMS_FILE = "CHECKSUMS.json"
_RESERVED = {MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CHECKSUMS_FILE}
_TMP_MARK = ".tmp-"  # hidden dirs ".<name>.tmp-<random>" are unfinished writes or old copies being removed
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


@dataclass
class LoadedCheckpoint:
    model_state: dict  # name -> Tensor
    optimizer_state: dict | None
    state: dict
    path: Path


# ----------------------------------------------------------------------------------------- write


def write_checkpoint(path, model_state: dict, optimizer_state: dict | None = None, state: dict | None = None,
                     extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a complete checkpoint at ``path`` (replacing one already there), or nothing at all."""
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        _check_file_name(name, UserError, "extra file")
        if name in _RESERVED:
            raise UserError(f"extra file {name!r}: name is reserved for the checkpoint itself")
    # Serialise state first: a value JSON cannot hold should fail before anything touches the disk.
    state_bytes = json.dumps(state or {}, sort_keys=True, indent=1, default=_json_default).encode("utf-8")

    tmp = _make_tmp_dir(parent, path.name)
    try:
        import safetensors.torch
        import torch

        files: dict[str, dict] = {}
        safetensors.torch.save_file(_plain_tensors(model_state), tmp / MODEL_FILE, metadata={"format": "pt"})
        files[MODEL_FILE] = _fsync_and_digest(tmp / MODEL_FILE)
        if optimizer_state is not None:
            with open(tmp / OPTIMIZER_FILE, "wb") as fh:
                torch.save(optimizer_state, fh)
            files[OPTIMIZER_FILE] = _fsync_and_digest(tmp / OPTIMIZER_FILE)
        for name, data in [(STATE_FILE, state_bytes), *extra_files.items()]:
            _write_bytes(tmp / name, bytes(data))
            files[name] = _fsync_and_digest(tmp / name)
        # Last: its presence is what says "every file above is complete and durable".
        _write_bytes(tmp / CHECKSUMS_FILE, json.dumps({"format": FORMAT, "files": files}, indent=1,
                                                      sort_keys=True).encode("utf-8"))
        _fsync_and_digest(tmp / CHECKSUMS_FILE)
        fsync_dir(tmp)  # the directory entries themselves, before the rename publishes them
        _install(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a clean failure leaves nothing; only a kill leaves a tmp dir
        raise
    return path


def remove_checkpoint(path) -> None:
    """Delete a checkpoint so that a crash midway never leaves a half-deleted dir under its real
    name (which would then fail verification and be reported as corrupt): rename it to a tmp name
    first, then delete."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    aside = _tmp_name(path.parent, path.name, "del")
    os.rename(path, aside)
    fsync_dir(path.parent)
    _delete(aside)


def _delete(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def cleanup_partials(parent) -> list[Path]:
    """Remove stray ``.<name>.tmp-*`` dirs in ``parent`` (left by a killed writer). Call it when no
    writer is active in ``parent`` (e.g. at trial start): it would delete a write in progress."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for p in sorted(parent.iterdir()):
        if _is_partial(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _make_tmp_dir(parent: Path, name: str) -> Path:
    # os.mkdir (not tempfile.mkdtemp, which forces mode 0700) so the checkpoint gets the umask's mode.
    for _ in range(100):
        tmp = _tmp_name(parent, name)
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary directory next to {parent / name}")


def _tmp_name(parent: Path, name: str, tag: str = "") -> Path:
    return parent / f".{name}{_TMP_MARK}{tag + '-' if tag else ''}{secrets.token_hex(6)}"


def _install(tmp: Path, path: Path) -> None:
    """Rename the finished tmp dir to ``path``. rename() cannot replace a non-empty directory, so an
    existing one is first renamed aside (to a tmp name readers ignore), then deleted. A crash between
    the two renames leaves no ``path`` but two complete copies under tmp names: never a partial one."""
    parent = path.parent
    aside = None
    if os.path.lexists(path):
        aside = _tmp_name(parent, path.name, "old")
        os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        if aside is not None:  # put the old one back rather than leave nothing under ``path``
            os.rename(aside, path)
        raise
    fsync_dir(parent)  # make the rename(s) durable
    if aside is not None:
        _delete(aside)


def _plain_tensors(model_state: dict) -> dict:
    """CPU, contiguous, one private storage per tensor. safetensors refuses tensors that share memory
    (tied weights: embedding and LM head are one Parameter under two names) and stores each tensor's
    own bytes, so shared or partial-storage views are cloned. Loading gives independent copies;
    ``model.load_state_dict`` copies them into the (still tied) parameters, so ties survive."""
    import torch

    out: dict = {}
    seen: set = set()
    for name, t in model_state.items():
        if not isinstance(name, str):
            raise TypeError(f"model_state key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(t).__name__}, not a Tensor")
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if t.numel() and (key in seen or storage.nbytes() != t.numel() * t.element_size()):
            t = t.clone()
            key = t.untyped_storage().data_ptr()
        seen.add(key)
        out[name] = t
    return out


def _json_default(obj: Any):
    # numpy / torch scalars and small arrays land in metrics all the time; paths in configs.
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"state value of type {type(obj).__name__} is not JSON-serialisable")


def _write_bytes(p: Path, data: bytes) -> None:
    # Plain open: atomicity comes from the directory rename; fsync happens in _fsync_and_digest.
    with open(p, "wb") as fh:
        fh.write(data)


def _fsync_and_digest(p: Path) -> dict:
    """fsync the file and hash what is actually on disk (not what we meant to write)."""
    return _digest(p, fsync=True)


def _digest(p: Path, fsync: bool = False) -> dict:
    h = hashlib.sha256()
    n = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(p, "rb") as fh:
        while k := fh.readinto(buf):
            h.update(view[:k])
            n += k
        if fsync:
            os.fsync(fh.fileno())  # works on a read-only fd: it flushes the file, not the descriptor
    return {"sha256": h.hexdigest(), "bytes": n}


# ---------------------------------------------------------------------------------------- verify


def verify_checkpoint(path) -> None:
    """Raise IntegrityError (one line naming the failing file) unless every listed file is present
    with the listed size and sha256. Unlisted files are ignored; model.safetensors must be listed."""
    path = Path(path)
    if not path.is_dir():
        raise IntegrityError(f"{path}: not a checkpoint directory")
    sums = path / CHECKSUMS_FILE
    if not sums.is_file():
        raise IntegrityError(f"{sums}: missing (checkpoint incomplete or not written by sweeper)")
    try:
        doc = json.loads(sums.read_bytes())
    except (ValueError, OSError) as e:
        raise IntegrityError(f"{sums}: unreadable: {_one_line(e)}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        raise IntegrityError(f"{sums}: not a {FORMAT} checksum list")
    files = doc["files"]
    if MODEL_FILE not in files:
        raise IntegrityError(f"{sums}: does not list {MODEL_FILE}")
    for name, want in files.items():
        _check_file_name(name, IntegrityError, f"{sums}: listed file")
        if not (isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)):
            raise IntegrityError(f"{sums}: malformed entry for {name!r}")
        f = path / name
        if not f.is_file():
            raise IntegrityError(f"{f}: missing (listed in {CHECKSUMS_FILE})")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise IntegrityError(f"{f}: size mismatch: {size} bytes, expected {want['bytes']} (truncated or incomplete?)")
        got = _digest(f)["sha256"]
        if got != want["sha256"]:
            raise IntegrityError(f"{f}: sha256 mismatch: {got[:16]}..., expected {want['sha256'][:16]}... (corrupted or modified)")


# ------------------------------------------------------------------------------------------ load


def load_checkpoint(path, map_location="cpu", verify: bool = True) -> LoadedCheckpoint:
    """Verify (unless told not to), then load. Never unpickles anything but tensors/containers."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    model_file = path / MODEL_FILE
    if not model_file.is_file():
        raise IntegrityError(f"{model_file}: missing")
    model_state = _load_safetensors(model_file, map_location, IntegrityError)
    optimizer_state = None
    if (path / OPTIMIZER_FILE).is_file():
        optimizer_state = torch_load_weights_only(path / OPTIMIZER_FILE, map_location, IntegrityError)
        if not isinstance(optimizer_state, dict):
            raise IntegrityError(f"{path / OPTIMIZER_FILE}: not an optimizer state dict")
    state: dict = {}
    if (path / STATE_FILE).is_file():
        try:
            state = json.loads((path / STATE_FILE).read_bytes())
        except ValueError as e:
            raise IntegrityError(f"{path / STATE_FILE}: unreadable: {_one_line(e)}") from None
        if not isinstance(state, dict):
            raise IntegrityError(f"{path / STATE_FILE}: not a JSON object")
    return LoadedCheckpoint(model_state=model_state, optimizer_state=optimizer_state, state=state, path=path)


def load_weights_file(path) -> dict:
    """Weights from a path the user gave (``--from-checkpoint PATH``): a checkpoint dir (verified),
    a .safetensors file, or a .pt/.pth/.bin/.ckpt file read with weights_only=True (a dict holding
    "state_dict" or "model" is unwrapped). Anything else is a UserError. Never unrestricted pickle."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if p.is_dir():
        if _is_checkpoint_dir(p):
            return load_checkpoint(p).model_state
        raise UserError(f"{p}: directory is not a sweeper checkpoint (no {MODEL_FILE} or {CHECKSUMS_FILE})")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        weights = _load_safetensors(p, "cpu", UserError)
    elif suffix in _PICKLE_SUFFIXES:
        weights = torch_load_weights_only(p, "cpu", UserError)
        if isinstance(weights, dict):
            for key in ("state_dict", "model"):
                if isinstance(weights.get(key), dict):
                    weights = weights[key]
                    break
    else:
        raise UserError(f"{p}: unsupported weights file {suffix or '(no suffix)'!r}; expected a checkpoint "
                        f"directory, .safetensors, {', '.join(sorted(_PICKLE_SUFFIXES))}")
    import torch

    if not (isinstance(weights, dict) and weights
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())):
        raise UserError(f"{p}: does not hold a state dict of tensors (name -> Tensor)")
    return weights


def _load_safetensors(p: Path, map_location, err: type[Exception]) -> dict:
    import safetensors.torch

    device = map_location if isinstance(map_location, (str, int)) else str(map_location)
    try:
        return safetensors.torch.load_file(p, device=device)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, a bad header: all mean "not loadable"
        raise err(f"{p}: not a readable safetensors file: {_one_line(e)}") from None


def torch_load_weights_only(p: Path, map_location, err: type[Exception], safe_globals=()):
    """torch.load with weights_only=True, always. Its unpickler resolves no globals except tensor
    rebuilders, plain containers and the classes in ``safe_globals`` (DeepSpeed's few, for its own
    checkpoint files: ``trainables.speed.restricted_ds_load``), so a crafted __reduce__ (os.system,
    exec, ...) is refused before it runs. Even a file whose checksum verified goes through this:
    defence in depth."""
    import torch

    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        hint = " (save a state_dict of tensors, or use .safetensors)" if err is UserError else ""
        raise err(f"{p}: refused to unpickle: {_unpickle_reason(e)}{hint}") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong format, ...
        raise err(f"{p}: could not be loaded with weights_only=True: {_one_line(e)}") from None


# ------------------------------------------------------------------------------------- discovery


def find_checkpoints(root) -> list[Path]:
    """Every checkpoint dir under ``root`` (or ``root`` itself), skipping tmp dirs, newest first:
    by state.json (epoch, global_step) where readable, then mtime. Dirs without a readable state
    sort after those with one. Symlinked dirs (checkpoints/best) are not followed: no duplicates."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        if _is_checkpoint_dir(d):
            found.append(d)
            dirnames[:] = []  # a checkpoint holds no checkpoints
            continue
        dirnames[:] = sorted(n for n in dirnames if not _is_partial(n))
    return sorted(found, key=_recency, reverse=True)


def latest_valid_checkpoint(candidates: list) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The first of ``candidates`` (newest first) that verifies, and (path, reason) for each one
    skipped on the way. Only verification is checked here; load_checkpoint still refuses a listed
    optimizer.pt holding code (tampering should fail loudly, not fall back silently)."""
    skipped: list[tuple[Path, str]] = []
    for c in candidates:
        c = Path(c)
        try:
            verify_checkpoint(c)
        except (IntegrityError, OSError) as e:
            reason = str(e) if isinstance(e, IntegrityError) else _one_line(e)
            skipped.append((c, reason))
            log.warning("skipping checkpoint %s: %s", c, reason)
            continue
        return c, skipped
    return None, skipped


def _is_checkpoint_dir(d: Path) -> bool:
    return (d / MODEL_FILE).is_file() or (d / CHECKSUMS_FILE).is_file()


def _is_partial(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


def _recency(d: Path) -> tuple:
    step = epoch = -1
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        st = json.loads((d / STATE_FILE).read_bytes())
        step = _as_int(st.get("global_step"))
        epoch = _as_int(st.get("epoch"))
    try:
        mtime = d.stat().st_mtime_ns
    except OSError:
        mtime = 0
    # epoch first: it counts the whole run, while a step count written by an older version (or by a
    # trainer that restarts its own counter on resume) may go back after a restore. Ordering by step
    # first picked an epoch-2 checkpoint (32 steps in its first run) over the epoch-3 one written
    # after a resume (16 steps in the new run): a repeated epoch after each worker kill.
    return (epoch, step, mtime, d.name)


def _as_int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else -1


# ----------------------------------------------------------------------------------------- misc


def _check_file_name(name, err: type[Exception], what: str) -> None:
    """A plain file name inside the checkpoint: no separators, no '..', no hidden tmp names."""
    if not (isinstance(name, str) and name and "/" not in name and "\\" not in name and "\0" not in name
            and name not in (".", "..") and not name.startswith(".")):
        raise err(f"{what} {name!r}: must be a plain file name inside the checkpoint")


def _unpickle_reason(e: BaseException) -> str:
    """torch's weights_only message is a paragraph that ends up suggesting weights_only=False;
    keep only the fact: which global the file tried to load."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"it references {m.group(1)}, which weights_only=True does not allow"
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return m.group(1).strip() if m else f"{type(e).__name__} (not a weights-only pickle)"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0].strip() if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
