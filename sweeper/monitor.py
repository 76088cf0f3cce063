"""``sweeper monitor [SWEEP_DIR] [--follow]``: the live view of a sweep, from its directory alone.

Reads what the running driver keeps on disk: ``state.json`` (status and phase),
``<phase>/progress.json`` (counts, best, ETA, one entry per trial; refreshed every few seconds by
the progress callback) and, once a phase has ended, its ``trials.parquet``. With ``--follow`` it
re-renders until ``state.json`` says the sweep is no longer running. Works from any shell that
sees the results directory (the head node, a laptop with the shared storage mounted).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import artifacts, liveview, results
from .errors import UserError
from .progress import PROGRESS

RUNNING = "running"


def _phase_dir(sweep_dir: Path, state: dict) -> Path:
    phase = state.get("phase") or "sweep"
    cands = [sweep_dir / phase, sweep_dir / "sweep"]
    # promotion phases have their own directories; show the newest one that has progress
    cands += sorted((p.parent for p in sweep_dir.glob("*/" + PROGRESS)), key=lambda p: (p / PROGRESS).stat().st_mtime,
                    reverse=True)
    for d in cands:
        if (d / PROGRESS).exists() or (d / results.TRIALS).exists():
            return d
    return sweep_dir / "sweep"


def snapshot(sweep_dir: Path) -> dict:
    """The current snapshot: progress.json when present, completed from the tables when they exist."""
    state = artifacts.read_state(sweep_dir)
    d = _phase_dir(sweep_dir, state)
    snap: dict = {}
    if (d / PROGRESS).exists():
        try:
            snap = json.loads((d / PROGRESS).read_text())
        except (OSError, json.JSONDecodeError):
            snap = {}
    status = state.get("status") or "unknown"
    if (d / results.TRIALS).exists() and (status != RUNNING or not snap):
        rows = results.read_rows(d / results.TRIALS)
        by = {r["trial_id"]: r for r in rows}
        counts = {k: sum(1 for r in rows if r["status"] in v) for k, v in
                  {"finished": ("completed", "failed"), "stopped": ("stopped",), "errored": ("error",)}.items()}
        ranked = [r for r in rows if r.get("rank")]
        best = min(ranked, key=lambda r: r["rank"]) if ranked else None
        trials = [{"trial_id": r["trial_id"], "status": {"completed": "TERMINATED", "failed": "TERMINATED",
                                                         "stopped": "STOPPED", "error": "ERROR"}.get(r["status"], "PENDING"),
                   "epoch": r.get("epochs"), "last": r.get("final"), "best": r.get("best"), "node_id": r.get("node_id"),
                   "config": " ".join(f"{k[7:]}={v}" for k, v in r.items() if k.startswith("config.") and v is not None
                                      and not k[7:].startswith("_"))} for r in rows]
        metric = rows[0]["metric"] if rows else snap.get("metric", "metric")
        snap = {**snap, "sweep": snap.get("sweep") or sweep_dir.name, "phase": d.name, "metric": metric,
                "total": max(snap.get("total") or 0, len(rows)), "running": 0, **counts,
                "best": best["best"] if best else None, "best_trial": best["trial_id"] if best else None,
                "trials": trials, "eta_s": None}
        snap.setdefault("mode", "")
        if not snap.get("elapsed_s"):
            snap["elapsed_s"] = sum(by[t]["wall_s"] or 0 for t in by) if rows else 0
    if not snap:
        snap = {"sweep": sweep_dir.name, "phase": d.name, "metric": "-", "mode": "", "total": 0, "running": 0,
                "finished": 0, "stopped": 0, "errored": 0, "best": None, "trials": [], "elapsed_s": 0}
    elif status == RUNNING and snap.get("status") == "running" and snap.get("updated"):
        snap["elapsed_s"] = time.time() - snap.get("started", time.time())  # keeps ticking between flushes
    snap["status"] = status
    return snap


def resolve(arg: str | None) -> Path:
    d = Path(arg) if arg else Path("results") / "latest"
    if not d.exists():
        raise UserError(f"{d}: no such sweep directory" + ("" if arg else " (run a sweep first, or pass SWEEP_DIR)"))
    if not (d / "state.json").exists() and not (d / "manifest.resolved.yaml").exists():
        raise UserError(f"{d}: not a sweep directory (no state.json)")
    return d


def monitor(sweep_dir: Path, *, follow: bool = False, interval: float = 2.0, timeout: float | None = None,
            console=None) -> dict:
    from rich.console import Console

    console = console or Console()
    snap = snapshot(sweep_dir)
    if not follow:
        if console.is_terminal:
            console.print(liveview.table(snap))
        else:
            print(liveview.line(snap), f"({snap['status']})", flush=True)
        return snap
    t_end = None if timeout is None else time.time() + timeout
    if console.is_terminal:
        from rich.live import Live

        with Live(liveview.table(snap), console=console, auto_refresh=False) as live:
            while snap["status"] == RUNNING and (t_end is None or time.time() < t_end):
                time.sleep(interval)
                snap = snapshot(sweep_dir)
                live.update(liveview.table(snap), refresh=True)
        return snap
    last = None
    while True:
        ln = liveview.line(snap) + f" ({snap['status']})"
        if ln != last:
            print(ln, flush=True)
            last = ln
        if snap["status"] != RUNNING or (t_end is not None and time.time() >= t_end):
            return snap
        time.sleep(interval)
        snap = snapshot(sweep_dir)


def main_args(args) -> int:
    d = resolve(args.sweep_dir)
    monitor(d, follow=args.follow, interval=args.interval)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
