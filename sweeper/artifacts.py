"""What a sweep directory holds besides the tables: inputs, metadata, state, links, the lock.

```
<root>/latest -> <name>-<hash>
<root>/<name>-<hash>/
    manifest.resolved.yaml   manifest.original.yaml   overrides.yaml ({} when none)
    run_metadata.json        state.json               logs/sweeper.log
    sweep/trials.parquet     sweep/metrics.parquet    sweep/decisions.jsonl   sweep/tune/...
    checkpoints/best -> ...  checkpoints/second_best  checkpoints/third_best
```
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from .errors import UserError
from .fsutil import atomic_write_text, remove_stale_temp, replace_symlink
from .manifest import Loaded
from .paths import contained, ensure_dir, safe_name

log = logging.getLogger("sweeper")
LINKS = ("best", "second_best", "third_best")
PHASE_DIRS = ("sweep", "finetune", "fanout")  # a sweep dir's Tune phases, each with its own tables


def results_root(m) -> Path:
    root = Path(m.output.root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def sweep_dir_for(loaded: Loaded, root: Path, rerun: bool = False) -> Path:
    base = safe_name(f"{loaded.manifest.name}-{loaded.identity()}", "`name`")
    d = contained(root, base)
    if rerun and d.exists():
        k = 2
        while contained(root, f"{base}.{k}").exists():
            k += 1
        d = contained(root, f"{base}.{k}")
    elif not rerun:
        # the newest re-run of this manifest is the one to resume or report
        reruns = sorted((p for p in root.glob(f"{base}.*") if p.name[len(base) + 1:].isdigit()),
                        key=lambda p: int(p.name[len(base) + 1:]))
        if reruns:
            d = reruns[-1]
    return ensure_dir(root, d.name)


def read_state(sweep_dir: Path) -> dict:
    p = sweep_dir / "state.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_state(sweep_dir: Path, **kw) -> None:
    s = read_state(sweep_dir)
    s.update(kw, updated=_now())
    atomic_write_text(sweep_dir / "state.json", json.dumps(s, indent=2))


_TEMP_SWEPT: set[str] = set()  # sweep dirs whose stale temp files this process has removed (SweepLock)


class SweepLock:
    """One driver per sweep directory: a second one would duplicate trials."""

    def __init__(self, sweep_dir: Path):
        self.path = sweep_dir / ".lock"

    def __enter__(self):
        if self.path.exists():
            try:
                pid = int(self.path.read_text().split()[0])
                os.kill(pid, 0)
                if pid != os.getpid():
                    raise UserError(f"{self.path.parent}: another sweeper process (pid {pid}) is running this sweep")
            except (ValueError, ProcessLookupError, IndexError):
                pass  # stale lock from a killed driver: take it over
            except PermissionError:
                raise UserError(f"{self.path.parent}: locked by another user's process") from None
        # rename over the path: a planted symlink is replaced, never written through
        atomic_write_text(self.path, f"{os.getpid()} {socket.gethostname()}\n")
        # the temp files of writers killed mid-write (tables, state, promotion): only the lock holder writes here.
        # Once per sweep dir and process, at its first lock: later, this driver's own background writers (the study
        # export after phase 1) may be writing theirs when the promotion takes the lock.
        sweep_dir = self.path.parent
        key = os.path.realpath(sweep_dir)
        if key not in _TEMP_SWEPT:
            _TEMP_SWEPT.add(key)
            n = sum(remove_stale_temp(d) for d in (sweep_dir, *(sweep_dir / p for p in PHASE_DIRS)))
            if n:
                log.info("%s: removed %d temp file(s) left by a killed writer", sweep_dir, n)
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_inputs(loaded: Loaded, sweep_dir: Path, resumed: bool = False) -> None:
    atomic_write_text(sweep_dir / "manifest.resolved.yaml", yaml.safe_dump(loaded.resolved(), sort_keys=False))
    atomic_write_text(sweep_dir / "manifest.original.yaml", loaded.original_text)
    # always written ({} when none) so a results directory has the same files whatever the command line
    atomic_write_text(sweep_dir / "overrides.yaml", yaml.safe_dump(dict(loaded.overrides), sort_keys=False))
    meta_path = sweep_dir / "run_metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    runs = meta.get("runs", [])
    runs.append({"command": _command(), "started": _now(), "resumed": resumed, "host": socket.gethostname()})
    m = loaded.manifest
    meta.update(
        sweep=sweep_dir.name,
        manifest=str(loaded.path) if loaded.path else None,
        identity=loaded.identity(),
        runs=runs,
        versions=versions(),
        hardware=hardware(),
        seeds={"search": m.search.seed, "training": m.training.seed},
        git_commit=git_commit(),
    )
    atomic_write_text(meta_path, json.dumps(meta, indent=2, default=str))
    ensure_dir(sweep_dir, "logs")  # refuses a planted symlink


@contextlib.contextmanager
def driver_log(sweep_dir: Path):
    """Everything the driver logs at INFO (sweeper, Tune, Train) goes to ``logs/sweeper.log`` while
    the console shows only the progress view; each trial's own log is ``trial.log`` in its trial dir."""
    log_file = ensure_dir(sweep_dir, "logs") / "sweeper.log"
    if log_file.is_symlink():  # a planted link would make the append land outside the results root
        log_file.unlink()
    h = logging.FileHandler(log_file)
    h.setLevel(logging.INFO)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    touched = []
    for name in ("sweeper", "ray.tune", "ray.train"):
        lg = logging.getLogger(name)
        lg.addHandler(h)
        touched.append((lg, lg.level))
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    # the console handlers keep showing warnings only
    for ch in logging.getLogger().handlers + logging.getLogger("ray").handlers:
        if ch.level < logging.WARNING:
            ch.setLevel(logging.WARNING)
    try:
        yield h
    finally:
        for lg, lvl in touched:
            lg.removeHandler(h)
            lg.setLevel(lvl)
        h.close()


def finish_metadata(sweep_dir: Path, **kw) -> None:
    p = sweep_dir / "run_metadata.json"
    meta = json.loads(p.read_text())
    rows = kw.pop("rows", None)
    if rows is not None:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        meta.setdefault("runs", [{}])[-1]["trial_counts"] = counts
    meta["runs"][-1].update(finished=_now(), **kw)
    atomic_write_text(p, json.dumps(meta, indent=2, default=str))


def _command() -> list[str]:
    # argv only: secrets come from the environment and are never recorded
    return [os.path.basename(sys.executable), "-m", "sweeper", *sys.argv[1:]]


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("sweeper", "ray", "torch", "lightning", "transformers", "optuna", "pyarrow", "deepspeed"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def hardware() -> dict:
    hw = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        hw["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import glob

        if "torch" not in sys.modules and not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
            hw["gpus"] = []  # no GPU device node: do not import torch for nothing (~2 s on the driver)
        else:
            import torch

            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        hw["gpus"] = []
    return hw


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def link_latest(root: Path, sweep_dir: Path) -> None:
    replace_symlink(root / "latest", sweep_dir.name)


def link_checkpoints(sweep_dir: Path, ranked: list[dict], phase: str = "sweep") -> None:
    """best/second_best/third_best -> the ranked trials' best checkpoints (relative links)."""
    d = ensure_dir(sweep_dir, "checkpoints")
    top = [r for r in ranked if r.get("rank") and r.get("checkpoint")][:3]
    for name, row in zip(LINKS, top):
        target = Path(row["checkpoint"])
        if target.exists():
            replace_symlink(d / name, os.path.relpath(target, d))
    for name in LINKS[len(top):]:
        with contextlib.suppress(FileNotFoundError):
            (d / name).unlink()


def warn_if_unauthenticated() -> None:
    """Joining a cluster without token authentication: anyone who reaches its ports runs code."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode != "token":
        msg = ("WARNING: joined a Ray cluster without token authentication (RAY_AUTH_MODE is not 'token'): "
               "anyone who can reach its ports can run code on it. See docs/cluster.md.")
        print(msg, file=sys.stderr, flush=True)
        log.warning(msg)
