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


def free_placement_group(pg_hex: str) -> str | None:
    """Removes the placement group with this hex id unless it is already gone; returns the state
    it was in when removed, or None when there was nothing to remove."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
    state = placement_group_table(pg).get("state")
    if state in (None, "REMOVED"):
        return None
    remove_placement_group(pg)
    return state


class WorkerGroupReaper(Callback):
    """Frees a multi-worker trial's Ray Train worker group when Tune ends the trial.

    A trial that ASHA stops (or that fails and is retried, or that the hang watchdog kills) is
    torn down while its ``TorchTrainer.fit()`` is still running: the Train controller dies with
    the trial, but the workers' placement group was created by the controller, a non-detached
    actor, so Ray scopes it to the *driver's job*: its CPUs/GPUs stay reserved until the whole
    sweep ends. Ray Train's own PlacementGroupCleaner only helps where the State API (the
    dashboard) is up. Rank 0 reports its placement group id with every result
    (``sweeper_worker_pg``); when the trial ends or is about to be retried, the driver removes
    that group if it still exists, so the next trial (or the retry) gets the GPUs.
    """

    def __init__(self):
        self.pgs: dict[str, str] = {}
        self.reaped: list[tuple[str, str]] = []  # (trial_id, pg hex): for logs and tests

    def on_trial_result(self, iteration, trials, trial, result, **info):
        pg = result.get("sweeper_worker_pg")
        if isinstance(pg, str) and pg:
            self.pgs[trial.trial_id] = pg

    def _reap(self, trial) -> None:
        pg_hex = self.pgs.pop(trial.trial_id, None)
        if not pg_hex:
            return
        try:
            state = free_placement_group(pg_hex)
            if state is None:
                return  # the controller shut its worker group down itself (a normal finish)
            self.reaped.append((trial.trial_id, pg_hex))
            log.info("trial %s: freed its worker group's placement group %s (%s)", trial.trial_id, pg_hex, state)
        except Exception as e:  # noqa: BLE001 - never fail the sweep over cleanup
            log.warning("trial %s: could not free worker placement group %s: %s", trial.trial_id, pg_hex, e)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._reap(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._reap(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._reap(trial)
