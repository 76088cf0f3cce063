"""The platform's own metrics on the Ray dashboard (and any Prometheus that scrapes Ray).

``MetricsCallback`` is a Tune callback in the driver. It publishes, through ``ray.util.metrics``,
tagged by ``sweep`` (the manifest's name) and ``phase``:

    sweeper_trials_running          gauge    trials started and not yet finished
    sweeper_trials_finished         gauge    trials that ran to max_t (or their own end)
    sweeper_trials_stopped          gauge    trials stopped early by ASHA
    sweeper_trials_errored          gauge    trials that raised (after their retries)
    sweeper_best_metric             gauge    best selection metric so far (tag ``metric``)
    sweeper_accelerator_seconds     gauge    accelerator seconds spent so far (trial wall x GPUs x workers;
                                             0 on CPU-only sweeps, still published)
    sweeper_trial_seconds           counter  trial wall seconds (every trial, CPU or GPU)

Ray exports them on every node's metrics endpoint (``ray.nodes()[i]["MetricsExportPort"]``) in
Prometheus text, prefixed ``ray_`` (``ray_sweeper_trials_running``; counters add ``_total``),
which is what the dashboard's Grafana panels and a Prometheus scraper read. Publishing never
fails a sweep: any error in the metrics path is logged once and ignored. ``SWEEPER_RAY_METRICS=0``
turns publishing off.
"""

from __future__ import annotations

import logging
import math
import os
import time

from ray.tune import Callback

log = logging.getLogger("sweeper")

TAGS = ("sweep", "phase")
GAUGES = {
    "sweeper_trials_running": "Trials of the sweep currently running",
    "sweeper_trials_finished": "Trials that ran to completion (max_t)",
    "sweeper_trials_stopped": "Trials stopped early by ASHA",
    "sweeper_trials_errored": "Trials that errored",
    "sweeper_accelerator_seconds": "Accelerator seconds spent by trials so far (wall x GPUs x workers)",
}
COUNTERS = {
    "sweeper_trial_seconds": "Wall seconds spent by trials",
}


def stopped_early(trial, max_t: int | None) -> bool:
    """Ended before max_t without failing: the scheduler (ASHA) stopped it. (Tune marks the last
    result of a stopped trial ``done`` too, so the epoch count is what tells.)"""
    last = trial.last_result or {}
    ep = last.get("epoch")
    if not max_t or not isinstance(ep, (int, float)) or last.get("sweeper_failed"):
        return False
    return ep < max_t


class MetricsCallback(Callback):
    def __init__(self, sweep: str, phase: str, metric: str, mode: str, *, gpus: float = 0.0, workers: int = 1,
                 max_t: int | None = None):
        self.sweep, self.phase, self.metric, self.mode, self.max_t = sweep, phase, metric, mode, max_t
        self.gpus, self.workers = float(gpus or 0.0), int(workers or 1)
        self.running: set[str] = set()
        self.finished, self.stopped, self.errored = set(), set(), set()
        self.best: float | None = None
        self.accel_s = self.trial_s = 0.0
        self._m: dict | None = None
        self._last_pub = 0.0
        self._broken = False

    # ----------------------------------------------------------------------------- publishing
    def _metrics(self) -> dict | None:
        if os.environ.get("SWEEPER_RAY_METRICS", "1") == "0":  # opt out: publish nothing
            return None
        if self._m is None and not self._broken:
            try:
                from ray.util import metrics as rm

                m = {n: rm.Gauge(n, description=d, tag_keys=TAGS) for n, d in GAUGES.items()}
                m["sweeper_best_metric"] = rm.Gauge("sweeper_best_metric", description="Best selection metric so far",
                                                    tag_keys=(*TAGS, "metric"))
                m.update({n: rm.Counter(n, description=d, tag_keys=TAGS) for n, d in COUNTERS.items()})
                self._m = m
            except Exception as e:  # noqa: BLE001 - metrics are best effort
                self._broken = True
                log.warning("sweeper metrics disabled: %s", e)
        return self._m

    def _tags(self) -> dict:
        return {"sweep": self.sweep, "phase": self.phase}

    def _publish(self, accel_inc: float = 0.0, wall_inc: float = 0.0) -> None:
        m = self._metrics()
        if m is None:
            return
        self._last_pub = time.monotonic()
        try:
            tags = self._tags()
            m["sweeper_trials_running"].set(len(self.running), tags=tags)
            m["sweeper_trials_finished"].set(len(self.finished), tags=tags)
            m["sweeper_trials_stopped"].set(len(self.stopped), tags=tags)
            m["sweeper_trials_errored"].set(len(self.errored), tags=tags)
            if self.best is not None:
                m["sweeper_best_metric"].set(self.best, tags={**tags, "metric": self.metric})
            m["sweeper_accelerator_seconds"].set(self.accel_s, tags=tags)
            if wall_inc > 0:
                m["sweeper_trial_seconds"].inc(wall_inc, tags=tags)
        except Exception as e:  # noqa: BLE001
            if not self._broken:
                log.warning("sweeper metrics: %s", e)
            self._broken = True

    # ----------------------------------------------------------------------------- Tune events
    def setup(self, **info):
        self._publish()

    def on_step_end(self, iteration, trials, **info):
        # republish about once a second: Ray's exporter only keeps gauges recorded recently, so a
        # quiet stretch (long epochs) would otherwise make them vanish from the endpoint
        now = time.monotonic()
        if now - self._last_pub >= 1.0:
            self._publish()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._publish()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.running.add(trial.trial_id)
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and math.isfinite(v) and not result.get("sweeper_failed"):
            if self.best is None or (v < self.best if self.mode == "min" else v > self.best):
                self.best = float(v)
        dt = result.get("time_this_iter_s")
        dt = float(dt) if isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0 else 0.0
        accel = dt * self.gpus * self.workers
        self.accel_s += accel
        self.trial_s += dt
        self._publish(accel, dt)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        if stopped_early(trial, self.max_t):
            self.stopped.add(trial.trial_id)
        else:
            self.finished.add(trial.trial_id)
        self._publish()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.errored.add(trial.trial_id)
        self._publish()

    def on_experiment_end(self, trials, **info):
        self.running.clear()
        self._publish()

    def snapshot(self) -> dict:
        return {"running": len(self.running), "finished": len(self.finished), "stopped": len(self.stopped),
                "errored": len(self.errored), "best": self.best, "accelerator_seconds": self.accel_s,
                "trial_seconds": self.trial_s}
