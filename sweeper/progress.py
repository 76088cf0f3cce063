"""A quiet progress view: one live line (or a rich live table on a terminal), details in files."""

from __future__ import annotations

import math
import sys
import time

from ray.tune import Callback


class ProgressCallback(Callback):
    def __init__(self, sweep: str, phase: str, metric: str, mode: str, quiet: bool = False):
        self.sweep, self.phase, self.metric, self.mode, self.quiet = sweep, phase, metric, mode, quiet
        self.running: set[str] = set()
        self.done = self.stopped = self.errored = 0
        self.best: float | None = None
        self._last = 0.0
        self._t0 = time.time()
        self._tty = sys.stdout.isatty()

    def note(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def _line(self) -> str:
        best = "-" if self.best is None else f"{self.best:.4g}"
        return (f"[{self.sweep}/{self.phase} {time.time() - self._t0:5.0f}s] running {len(self.running)}  "
                f"finished {self.done}  stopped by ASHA {self.stopped}  errored {self.errored}  "
                f"best {self.metric} {best}")

    def _show(self, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.time()
        if not force and now - self._last < (1.0 if self._tty else 10.0):
            return
        self._last = now
        if self._tty:
            sys.stdout.write("\r" + self._line() + "\x1b[K")
            sys.stdout.flush()
        else:
            print(self._line(), flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and math.isfinite(v) and not result.get("sweeper_failed"):
            if self.best is None or (v < self.best if self.mode == "min" else v > self.best):
                self.best = float(v)
        self._last_epoch = result.get("epoch")
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        last = trial.last_result or {}
        max_t = None
        try:
            max_t = trial.config and None
        except Exception:  # noqa: BLE001
            pass
        if trial.status == "TERMINATED" and last.get("done") is False:
            self.stopped += 1
        self.done += 1
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.errored += 1
        self._show()

    def on_experiment_end(self, trials, **info):
        self.stopped = sum(1 for t in trials if t.status == "TERMINATED" and not (t.last_result or {}).get("done", True))
        self._show(force=True)
        if self._tty and not self.quiet:
            print()
