"""Export: the winner's weights as safetensors with its resolved manifest and metrics, optionally
encrypted (streamed, chunked Fernet; see docs/encryption.md).

```
<sweep>/export/
    model.safetensors        (or model.safetensors.enc when encrypted; the plaintext is not kept)
    manifest.resolved.yaml   metrics.json   EXPORT.json (what, from where, sha256 of the weights)
```
The key comes from the environment variable the manifest names (``export.key_env``); it is never
written to the manifest, logs, results or Ray job metadata.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from . import crypto
from .errors import IntegrityError, UserError
from .fsutil import atomic_write_text, fsync_dir
from .manifest import Loaded

EXPORT_META = "EXPORT.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_checkpoint(loaded: Loaded, sweep_dir: Path, ckpt: str, state: dict, *, encrypt: bool | None = None,
                      key_env: str | None = None, out: Path | None = None) -> dict:
    from . import checkpoint as ckpt_mod
    from .trial import evaluate

    m = loaded.manifest
    encrypt = m.export.encrypt if encrypt is None else encrypt
    key_env = key_env or m.export.key_env
    if encrypt:
        crypto.load_keys(key_env)  # fail before writing anything
    ckpt_mod.verify_checkpoint(ckpt)
    out = Path(out) if out else sweep_dir / "export"
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src_state = json.loads((Path(ckpt) / "state.json").read_text())
    config = src_state.get("config") or state.get("winner", {}).get("config") or {}
    # the final report: the held-out test split, evaluated once, on the exported weights only
    test = evaluate(loaded.resolved(), config, ckpt, "test", "report")
    metrics = {"selection": {m.selection.metric: src_state.get("metrics", {}).get(m.selection.metric)},
               "checkpoint_metrics": src_state.get("metrics", {}), "test": test,
               "fanout": {k: state.get("fanout", {}).get(k) for k in ("chosen", "chosen_seed")} if state.get("fanout") else None}
    plain = tmp / "model.safetensors"
    shutil.copyfile(Path(ckpt) / "model.safetensors", plain)
    sha = _sha256(plain)
    if encrypt:
        info = crypto.encrypt_file(plain, tmp / "model.safetensors.enc", key_env, chunk_size=m.export.chunk_mb << 20)
        plain.unlink()
        weights = "model.safetensors.enc"
    else:
        weights = "model.safetensors"
    atomic_write_text(tmp / "manifest.resolved.yaml", yaml.safe_dump(loaded.resolved(), sort_keys=False))
    atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2, default=str))
    meta = {"weights": weights, "encrypted": encrypt, "key_env": key_env if encrypt else None,
            "cipher": "Fernet (AES-128-CBC + HMAC-SHA256), chunked; see docs/encryption.md" if encrypt else None,
            "sha256_plaintext": sha, "source_checkpoint": str(Path(ckpt).resolve()), "config": config,
            "trainable": m.trainable, "model": m.model.model_dump(),
            # training.gelu_epilogue trained (and the test report evaluated) the MLPs with the tanh GELU: a loader
            # of these weights builds the model with hidden_act gelu_pytorch_tanh to compute the same function
            **({"hidden_act": "gelu_pytorch_tanh"} if m.training.gelu_epilogue else {})}
    atomic_write_text(tmp / EXPORT_META, json.dumps(meta, indent=2, default=str))
    fsync_dir(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    fsync_dir(out.parent)
    return {"path": str(out), "weights": str(out / weights), "encrypted": encrypt, "sha256": sha, "test": test}


def verify_export(path: Path, key_env: str | None = None) -> dict:
    """Check an export directory (or a single .enc file): the weights' sha256 matches EXPORT.json,
    and an encrypted file authenticates chunk by chunk (needs the key)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".enc":
        if not key_env:
            raise UserError(f"{path}: encrypted; pass --key-env VAR naming the variable that holds the key")
        return crypto.verify_file(path, key_env)
    meta_path = path / EXPORT_META
    if not meta_path.exists():
        raise UserError(f"{path}: not an export directory (no {EXPORT_META})")
    meta = json.loads(meta_path.read_text())
    w = path / meta["weights"]
    if not w.exists():
        raise IntegrityError(f"{w}: missing")
    if meta["encrypted"]:
        env = key_env or meta.get("key_env")
        info = crypto.verify_file(w, env)
        if info["sha256"] != meta["sha256_plaintext"]:
            raise IntegrityError(f"{w}: decrypts, but to different weights than were exported (sha256 mismatch)")
        return {**info, "encrypted": True}
    sha = _sha256(w)
    if sha != meta["sha256_plaintext"]:
        raise IntegrityError(f"{w}: sha256 {sha[:12]}… does not match EXPORT.json ({meta['sha256_plaintext'][:12]}…)")
    from safetensors import safe_open

    with safe_open(str(w), "pt") as f:
        n = len(list(f.keys()))
    return {"encrypted": False, "sha256": sha, "tensors": n}
