"""Helpers for fault-injection tests: drivers in their own session and Ray temp dir, SIGKILLed on
a progress signal read from the sweep directory, and cleanup of exactly the processes they started.

Nothing here kills a process it did not start: a driver runs in a new session (its own process
group) with ``RAY_TMPDIR`` set to a directory unique to the test, so the Ray processes it spawns
(gcs_server, raylet, workers, ...) are found by that directory in their command line or
environment, and only those are killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def short_tmp(prefix: str = "sw") -> Path:
    """A short directory for RAY_TMPDIR: Ray's unix socket paths must stay under ~100 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Driver:
    """``python -m sweeper ...`` in its own session, with its own embedded Ray."""

    def __init__(self, args: list[str], ray_tmp: Path, env_extra: dict | None = None, cwd=None):
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        env.update(env_extra or {})
        env["RAY_TMPDIR"] = str(ray_tmp)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.ray_tmp = ray_tmp
        self.log = open(ray_tmp / f"driver-{time.monotonic_ns()}.log", "w+b")
        self.proc = subprocess.Popen([sys.executable, "-m", "sweeper", *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"driver did not finish in {timeout}s; output:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the driver alone (what a crash or OOM kill does), then clean up its Ray."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        kill_ray_of(self.ray_tmp, self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        kill_ray_of(self.ray_tmp, self.proc.pid)
        self.log.close()


def _mine(p: psutil.Process, marker: str, pgid: int) -> bool:
    try:
        if os.getpgid(p.pid) == pgid:
            return True
        if any(marker in a for a in p.cmdline()):
            return True
        return p.environ().get("RAY_TMPDIR") == marker
    except (psutil.Error, ProcessLookupError, PermissionError, OSError):
        return False


def ray_processes(ray_tmp: Path, pgid: int) -> list[psutil.Process]:
    marker = str(ray_tmp)
    me = os.getpid()
    return [p for p in psutil.process_iter() if p.pid != me and _mine(p, marker, pgid)]


def kill_ray_of(ray_tmp: Path, pgid: int, timeout: float = 20) -> int:
    """Kill the Ray processes a driver started (its process group, or anything running with its
    RAY_TMPDIR); returns how many were still alive after the driver died."""
    left = ray_processes(ray_tmp, pgid)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=timeout)
    return len(left)


# ------------------------------------------------------------------------- sweep-dir progress


def line_key(r: dict) -> tuple:
    """What identifies one report, read from result.json or from its progress.csv twin alike (the CSV
    flattens nested values and types cells its own way, so whole lines compare unequal across the two)."""
    return (int(r["epoch"]), int(r["training_iteration"]), str(r["date"]), int(r["pid"]))


def result_lines(trial_dir: Path) -> list[dict]:
    """Tune's per-trial result lines. A driver killed while Tune's background thread uploaded the
    trial's files can leave result.json at 0 bytes; then its twin progress.csv (same reports) is
    read, as the product's results do (results._history_fallback)."""
    f = trial_dir / "result.json"
    out = []
    if not f.exists():
        return out
    for line in f.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    csv = trial_dir / "progress.csv"
    if not out and f.stat().st_size == 0 and csv.is_file() and csv.stat().st_size:
        import pandas as pd

        try:
            df = pd.read_csv(csv)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):  # torn as well
            return []
        out = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in df.to_dict("records")]
    return out


def trial_dirs(phase_dir: Path) -> list[Path]:
    tune = phase_dir / "tune"
    return sorted(p for p in tune.glob("*") if p.is_dir() and not p.name.startswith(".")) if tune.is_dir() else []


def finished_trials(phase_dir: Path, max_epochs: int) -> set[str]:
    """Trials that reported their last epoch (a progress signal independent of Tune's state file)."""
    return {d.name for d in trial_dirs(phase_dir) if any(r.get("epoch") == max_epochs for r in result_lines(d))}


def checkpoint_epochs(trial_dir: Path) -> list[int]:
    out = []
    for c in trial_dir.glob("checkpoint_*"):
        with contextlib.suppress(OSError, ValueError, json.JSONDecodeError):
            out.append(int(json.loads((c / "state.json").read_text())["epoch"]))
    return sorted(out)


def wait_for(pred, timeout: float, every: float = 0.05, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(every)
    return pred()


def find_sweep_dir(root: Path) -> Path | None:
    ds = [p for p in root.glob("*") if p.is_dir() and not p.is_symlink()]
    return ds[0] if len(ds) == 1 else None
