"""A quiet progress view: one line (logs, pipes), or a rich live table on a terminal; details in files.

Besides drawing, the callback keeps ``<sweep>/<phase>/progress.json`` (written atomically every few
seconds and at the end) with the counts, best so far, elapsed/ETA and one entry per trial; that is
what ``sweeper monitor`` renders, from any shell, while the sweep runs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from ray.tune import Callback

from . import liveview
from .metrics import stopped_early

PROGRESS = "progress.json"
FLUSH_EVERY_S = 5.0


def _short_config(cfg: dict) -> str:
    items = [(k, v) for k, v in (cfg or {}).items() if not str(k).startswith("_")]
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


class ProgressCallback(Callback):
    def __init__(self, sweep: str, phase: str, metric: str, mode: str, quiet: bool = False,
                 out_dir: Path | None = None, total: int | None = None, max_t: int | None = None):
        self.sweep, self.phase, self.metric, self.mode, self.quiet = sweep, phase, metric, mode, quiet
        self.max_t = max_t
        self.out_dir, self.total = (Path(out_dir) if out_dir else None), total
        self.running: set[str] = set()
        self.done = self.stopped = self.errored = 0
        self.best: float | None = None
        self.best_trial: str | None = None
        self.trials: dict[str, dict] = {}
        self._last = 0.0
        self._last_flush = 0.0
        self._t0 = time.time()
        self._tty = sys.stdout.isatty()
        self._live = None

    def note(self, msg: str) -> None:
        if not self.quiet:
            if self._live is not None:
                self._live.console.print(msg)
            else:
                print(msg, flush=True)

    # ----------------------------------------------------------------------------- state
    def _trial(self, trial) -> dict:
        t = self.trials.get(trial.trial_id)
        if t is None:
            t = self.trials[trial.trial_id] = {"trial_id": trial.trial_id, "status": "PENDING", "epoch": 0,
                                               "last": None, "best": None, "node_id": None,
                                               "config": _short_config(getattr(trial, "config", {}) or {})}
        return t

    def snapshot(self, status: str = "running") -> dict:
        elapsed = time.time() - self._t0
        ended = self.done + self.errored
        total = self.total or 0
        eta = None
        if 0 < ended < total:
            eta = elapsed / ended * (total - ended)
        return {"sweep": self.sweep, "phase": self.phase, "metric": self.metric, "mode": self.mode,
                "status": status, "started": self._t0, "updated": time.time(), "elapsed_s": elapsed,
                "eta_s": eta, "total": total, "running": len(self.running), "finished": self.done - self.stopped,
                "stopped": self.stopped, "errored": self.errored, "best": self.best, "best_trial": self.best_trial,
                "trials": list(self.trials.values())}

    def _flush(self, force: bool = False, status: str = "running") -> None:
        if self.out_dir is None:
            return
        now = time.time()
        if not force and now - self._last_flush < FLUSH_EVERY_S:
            return
        self._last_flush = now
        try:
            from .fsutil import atomic_write_text

            atomic_write_text(self.out_dir / PROGRESS, json.dumps(self.snapshot(status), default=str))
        except OSError:
            pass  # a full disk must not stop the sweep; the tables at the end are what count

    # ----------------------------------------------------------------------------- drawing
    def _line(self) -> str:
        return liveview.line(self.snapshot())

    def _show(self, force: bool = False) -> None:
        self._flush(force=force)
        if self.quiet:
            return
        now = time.time()
        if not force and now - self._last < (0.5 if self._tty else 10.0):
            return
        self._last = now
        if self._tty:
            try:
                if self._live is None:
                    from rich.live import Live

                    self._live = Live(liveview.table(self.snapshot()), auto_refresh=False, transient=False,
                                      redirect_stdout=False, redirect_stderr=False)
                    self._live.start()
                self._live.update(liveview.table(self.snapshot()), refresh=True)
                return
            except Exception:  # noqa: BLE001 - a terminal rich cannot drive: fall back to the line
                self._tty = False
        print(self._line(), flush=True)

    # ----------------------------------------------------------------------------- Tune events
    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._trial(trial)["status"] = "RUNNING"
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t = self._trial(trial)
        t["status"] = "RUNNING"
        self.running.add(trial.trial_id)
        t["epoch"] = result.get("epoch") or t["epoch"]
        t["node_id"] = result.get("node_id") or t["node_id"]
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and math.isfinite(v) and not result.get("sweeper_failed"):
            t["last"] = float(v)
            if t["best"] is None or (v < t["best"] if self.mode == "min" else v > t["best"]):
                t["best"] = float(v)
            if self.best is None or (v < self.best if self.mode == "min" else v > self.best):
                self.best, self.best_trial = float(v), trial.trial_id
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        stopped = stopped_early(trial, self.max_t)
        if stopped:
            self.stopped += 1
        self._trial(trial)["status"] = "STOPPED" if stopped else "TERMINATED"
        self.done += 1
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._trial(trial)["status"] = "ERROR"
        self.errored += 1
        self._show()

    def on_experiment_end(self, trials, **info):
        self.stopped = sum(1 for t in trials if t.status == "TERMINATED" and stopped_early(t, self.max_t))
        for t in trials:
            rec = self._trial(t)
            if t.status == "TERMINATED":
                rec["status"] = "STOPPED" if stopped_early(t, self.max_t) else "TERMINATED"
            elif t.status == "ERROR":
                rec["status"] = "ERROR"
        self.running.clear()
        self._flush(force=True, status="finished")
        if self.quiet:
            return
        if self._live is not None:
            self._live.update(liveview.table(self.snapshot("finished")), refresh=True)
            self._live.stop()
            self._live = None
        else:
            self._last = 0.0
            print(self._line(), flush=True)
