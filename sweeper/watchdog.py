"""Hung-trial watchdog (``training.hang_timeout_s``): a Tune callback on the driver.

A trial that is RUNNING and has reported nothing for ``timeout_s`` seconds (its startup counts)
is treated as hung: its actor is killed, which Tune sees as a trial failure and retries from the
trial's last checkpoint under ``training.max_failures``. It lives on the driver, not in the
trial, so it also catches hangs an in-process timer cannot: a stopped process, a C call holding
the GIL, a collective waiting forever on a dead peer.
"""

from __future__ import annotations

import logging
import sys
import time

from ray.tune import Callback

log = logging.getLogger("sweeper")


class HangWatchdog(Callback):
    def __init__(self, timeout_s: float, clock=time.monotonic):
        self.timeout_s = float(timeout_s)
        self.clock = clock
        self.last: dict[str, float] = {}
        self.kills: list[tuple[str, float]] = []  # (trial_id, silent seconds): for logs and tests

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = self.clock()

    def on_step_end(self, iteration, trials, **info):
        now = self.clock()
        for trial in trials:
            if trial.status != "RUNNING":
                self.last.pop(trial.trial_id, None)  # re-armed when it runs again (after a retry)
                continue
            since = self.last.setdefault(trial.trial_id, now)
            if now - since <= self.timeout_s:
                continue
            actor = getattr(getattr(trial, "temporary_state", None), "ray_actor", None)
            if actor is None:
                continue
            silent = now - since
            msg = (f"trial {trial.trial_id}: no report for {silent:.0f}s (training.hang_timeout_s="
                   f"{self.timeout_s:g}); killing it so it is retried from its last checkpoint")
            log.warning(msg)
            print(f"WARNING: {msg}", file=sys.stderr, flush=True)
            self.kills.append((trial.trial_id, silent))
            self.last[trial.trial_id] = now  # one kill per timeout, even if the failure is slow to surface
            import ray

            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # noqa: BLE001 - already dead: Tune sees the failure anyway
                log.warning("killing hung trial %s: %s", trial.trial_id, e)
