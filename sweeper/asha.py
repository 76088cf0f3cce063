"""ASHA that writes down why: every decision at every rung, with the cutoff and the rung size.

Users should never have to guess why a trial stopped. The decision is computed by Ray Tune's own
``AsyncHyperBandScheduler``; this subclass only reads the bracket's state just before Tune
decides, so the recorded cutoff is exactly the one the decision used.
"""

from __future__ import annotations

import json

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler


class RecordingASHA(AsyncHyperBandScheduler):
    def __init__(self, *args, decisions_path: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._decisions_path = decisions_path

    def on_trial_result(self, tune_controller, trial, result):
        t, metric = self._time_attr, self._metric
        if t not in result or metric not in result or trial.trial_id not in self._trial_info:
            return super().on_trial_result(tune_controller, trial, result)
        bracket = self._trial_info[trial.trial_id]
        cur = result[t]
        # the rung this result lands on (rungs are stored highest first), as the bracket will see it
        rung = next(((ms, rec) for ms, rec in bracket._rungs if cur >= ms and trial.trial_id not in rec), None)
        cutoff = bracket.cutoff(rung[1]) if rung else None
        rung_size = len(rung[1]) if rung else 0
        action = super().on_trial_result(tune_controller, trial, result)
        if rung is not None or action == TrialScheduler.STOP:
            value = float(result[metric])
            self._write({
                "trial_id": trial.trial_id,
                "time": cur,
                "rung": rung[0] if rung else None,
                "value": value,
                # the bracket stores metric_op * value; show the cutoff in the metric's own sign
                "cutoff": (float(cutoff) * self._metric_op) if cutoff is not None else None,
                "rung_size": rung_size,
                "action": "stop" if action == TrialScheduler.STOP and cur < self._max_t else
                          ("complete" if cur >= self._max_t else "continue"),
            })
        return action

    def _write(self, rec: dict) -> None:
        # one short append per decision; a crash can tear at most the last line, which readers skip
        with open(self._decisions_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
