"""ASHA that writes down why: every decision at every rung, with the cutoff and the rung size.

Users should never have to guess why a trial stopped. The decision is computed by Ray Tune's own
``AsyncHyperBandScheduler``; this subclass only reads the bracket's state just before Tune
decides, so the recorded cutoff is exactly the one the decision used.
"""

from __future__ import annotations

import json

import logging
import os
import time

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

log = logging.getLogger(__name__)


# experiment dir (storage) -> the driver's staging dir where Tune writes each snapshot set whole,
# before a background thread uploads it file by file; read by runner.snapshot_keeper
STAGING: dict[str, str] = {}
# experiment dir (realpath) -> Tune's experiment checkpoint manager, whose ``_last_save_time`` changes when a
# snapshot has been written: the keeper looks at the staging dir only then, not after every step
SAVER: dict[str, object] = {}


def _register_staging(ctrl) -> None:
    storage = getattr(ctrl, "__dict__", {}).get("_storage")
    try:
        key = os.path.realpath(storage.experiment_fs_path)
        STAGING[key] = storage.experiment_driver_staging_path
        mgr = ctrl.__dict__.get("_checkpoint_manager")
        if mgr is not None and hasattr(mgr, "_last_save_time"):
            SAVER[key] = mgr
    except Exception:  # noqa: BLE001 - no staging dir known: the keeper copies from storage instead
        pass


# How long after a trial is added its snapshot is taken: long enough for the trial's actor to be reset
# and the trial started first (a few ms), short against any epoch.
SNAPSHOT_DELAY_S = 0.05


def drop_stale_decisions(tune_controller, trial) -> None:
    """Forget any decision Tune holds back for ``trial`` as it is added to the controller.

    Tune caches a decision (``STOP``, ``PAUSE``, ``CONTINUE``) for a trial whose checkpoint is being saved and
    carries it out when the save resolves. The cache is part of the experiment snapshot. A trial killed while
    its save was in flight leaves its entry there for good: its save never resolves, and Tune caches a STOP
    for it as it errors. When ``sweeper resume --retry-errored`` (or a resume after a killed driver) restores
    the snapshot, the stale decision comes back with it, and the first checkpoint the restored trial saves
    carries it out. Seen in a CI run (``test_faults_trial.py``, fifteenth session): the retried trial was
    stopped after one epoch and recorded ``stopped at epoch 8 of 14``, with no error and no stopper; a stale
    PAUSE would park a trial that no scheduler had paused. A trial is added only when it is new or restored,
    and then nothing of it is in flight, so whatever is held back for it is stale (Ray 2.60 keeps these in the
    controller's ``_cached_trial_decisions`` and ``_queued_trial_decisions``; a Ray without them is left as
    it is)."""
    ctrl = getattr(tune_controller, "_tune_controller", tune_controller)
    for name in ("_cached_trial_decisions", "_queued_trial_decisions"):
        held = getattr(ctrl, "__dict__", {}).get(name)
        if isinstance(held, dict) and trial.trial_id in held:
            decision = held.pop(trial.trial_id)
            log.warning("trial %s: dropped a %s decision left in the experiment snapshot by the run before "
                        "(its checkpoint save never finished)", trial.trial_id, decision)


class SnapshotOnChange:
    """Scheduler mixin: Tune snapshots the experiment within ``SNAPSHOT_DELAY_S`` of a trial being
    added, not only when its snapshot period has passed.

    A driver killed between snapshots loses every trial the last snapshot did not name: restore
    drops it (the restored searcher never issued it) and a new configuration replaces it, so its
    work is lost. Under CPU load Tune's steps stretch out and whole trials could start and finish
    between two periodic snapshots. With this, a trial is in the snapshot before its first epoch
    ends. The snapshot waits ``SNAPSHOT_DELAY_S`` so that it is written after the trial has been
    started, not between its actor's reset and its start: at the end of the step that adds the
    trial, its ~6 ms (Tune's save and the keeper's zip) sat on the path from one trial's end to the
    next one's start, 0.1-0.2 s of a 40 x 1 s sweep on 2 CPUs (benchmarks/RESULTS.md (a5)).
    (A trial that finished after the last snapshot needs none: the restore resumes it from its
    final checkpoint and it reports its last epoch once more, nothing retrained. Snapshotting on
    completions too cost 40 x 1 s trials 5 % more wall time: benchmarks/RESULTS.md (a2).)

    Tune gives schedulers the controller wrapped; the wrapper keeps the controller itself in
    ``_tune_controller``, and its ``_checkpoint_manager`` snapshots once ``_last_save_time`` is a
    period old (Ray 2.60, ``ray/tune/execution/experiment_state.py``). Both are private, so a Ray
    without them only loses this guarantee, with a warning, never the sweep.
    """

    _warned = False

    def _force_snapshot(self, tune_controller) -> None:
        ctrl = getattr(tune_controller, "_tune_controller", tune_controller)
        _register_staging(ctrl)
        mgr = getattr(ctrl, "__dict__", {}).get("_checkpoint_manager")
        if mgr is None or not hasattr(mgr, "_last_save_time"):
            if not SnapshotOnChange._warned:
                SnapshotOnChange._warned = True
                log.warning("this Ray Tune has no experiment-snapshot flag: a killed driver may lose "
                            "the trials started since Tune's last periodic snapshot")
            return
        # due SNAPSHOT_DELAY_S from now, not forced: Tune writes the set to its staging dir at the end
        # of the first step after that (which runner.snapshot_keeper zips) and starts the upload
        # without waiting for the last one, as its own periodic snapshot does.
        # (``_should_force_sync_up`` would block the driver loop on every upload: 10 % slower on
        # 40 x 1 s trials.) A snapshot already due stays due.
        period = getattr(mgr, "_checkpoint_period", None)
        due = (time.monotonic() - period + SNAPSHOT_DELAY_S) if isinstance(period, (int, float)) else float("-inf")
        mgr._last_save_time = min(mgr._last_save_time, due)

    def on_trial_add(self, tune_controller, trial):
        drop_stale_decisions(tune_controller, trial)
        super().on_trial_add(tune_controller, trial)
        self._force_snapshot(tune_controller)



class SnapshottingFIFO(SnapshotOnChange, FIFOScheduler):
    """Tune's default first-in-first-out scheduler, snapshotting on every trial added or finished."""


class RecordingASHA(SnapshotOnChange, AsyncHyperBandScheduler):
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


class PromotingASHA(SnapshotOnChange, FIFOScheduler):
    """ASHA with promotions (Li et al., "A System for Massively Parallel Hyperparameter Tuning",
    Algorithm 2), not Ray's stopping variant: a trial that reaches a rung waits there (paused, its
    checkpoint kept) unless it is in the rung's top ``1/rf`` right away; a free slot first promotes
    the best waiting trial that has entered the top ``1/rf`` of its rung, and only then starts a new
    configuration. About ``floor(n / rf)`` trials leave a rung that ``n`` trials reached (a few more
    when a trial promoted early drops out of the top later), so a sweep trains close to the ideal
    schedule's epochs (rf 3, rungs 1/3/9 of 27: 11 %), where Ray's stopping rule lets the first trials
    at each rung through unopposed.

    When the searcher has issued every configuration and nothing runs or waits to start, no waiting
    trial can be promoted any more: each is stopped at its rung, with the cutoff it missed.

    Every decision goes to ``decisions.jsonl`` (``pause`` at a rung, ``promote``, ``continue``, ``stop``,
    ``complete``), and the scheduler rebuilds its rungs from that file when a sweep resumes, since Tune
    snapshots searchers but not schedulers. Paused trials do not count against
    ``search.max_concurrent``: the runner wraps the searcher in ``PauseAwareLimiter``.
    """

    def __init__(self, *, time_attr: str, max_t: int, grace_period: int, reduction_factor: float,
                 decisions_path: str, metric: str, mode: str):
        super().__init__()
        self._time_attr, self._max_t, self._rf = time_attr, max_t, float(reduction_factor)
        self._metric, self._mode = metric, mode
        self._decisions_path = decisions_path
        self._grace = float(grace_period)
        self._fresh_state()

    def _fresh_state(self) -> None:
        ms, t = [], self._grace
        while t < self._max_t:
            ms.append(t)
            t *= self._rf
        self._milestones = ms  # ascending
        self._rungs: dict[float, dict[str, float]] = {m: {} for m in ms}  # trial -> value, larger is better
        self._promoted: dict[float, set[str]] = {m: set() for m in ms}
        self._waiting: dict[str, float] = {}  # trial -> the rung it waits at
        self._stopped: set[str] = set()
        self._limiter = None
        self._replay()

    def __getstate__(self):  # Tune pickles the scheduler into tuner.pkl when the sweep starts
        return {k: v for k, v in self.__dict__.items()
                if k in ("_time_attr", "_max_t", "_rf", "_metric", "_mode", "_decisions_path", "_grace")}

    def __setstate__(self, state):  # a resumed sweep: the rungs come back from decisions.jsonl
        self.__dict__.update(state)
        FIFOScheduler.__init__(self)
        self._fresh_state()

    # -- Tune's scheduler interface -------------------------------------------------------------
    def set_search_properties(self, metric, mode, **spec) -> bool:
        return (metric is None or metric == self._metric) and (mode is None or mode == self._mode)

    def on_trial_result(self, tune_controller, trial, result):
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        tid, t = trial.trial_id, float(result[self._time_attr])
        if tid in self._stopped:
            return TrialScheduler.STOP
        rung = max((m for m in self._milestones if t >= m), default=None)
        if t >= self._max_t or rung is None:
            if t >= self._max_t:
                self._write({"trial_id": tid, "time": t, "rung": None, "value": float(result[self._metric]),
                             "cutoff": None, "rung_size": 0, "action": "complete"})
            return TrialScheduler.CONTINUE
        if tid in self._rungs[rung]:  # reported here before (a restart from the rung's checkpoint)
            if tid in self._promoted[rung]:
                return TrialScheduler.CONTINUE
            self._wait(tune_controller, tid, rung)
            return TrialScheduler.PAUSE
        value = float(result[self._metric])
        self._rungs[rung][tid] = self._op(value)
        if self._promotable(rung, tid):
            self._promoted[rung].add(tid)
            self._write(self._record(tid, t, rung, value, "continue"))
            return TrialScheduler.CONTINUE
        self._write(self._record(tid, t, rung, value, "pause"))
        self._wait(tune_controller, tid, rung)
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller):
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
        for rung in reversed(self._milestones):  # the highest rung first: closest to a finished trial
            waiting = sorted((tid for tid, r in self._waiting.items() if r == rung),
                             key=lambda tid: -self._rungs[rung][tid])
            for tid in waiting:
                tr = trials.get(tid)
                if tr is not None and tr.status == tr.PAUSED and self._promotable(rung, tid):
                    self._promoted[rung].add(tid)
                    del self._waiting[tid]
                    self._limiter_paused(tune_controller).discard(tid)
                    self._write(self._record(tid, None, rung, self._op(self._rungs[rung][tid]), "promote"))
                    return tr
        for tr in trials.values():
            if tr.status == tr.PENDING:
                return tr
        live = [tr for tr in trials.values() if tr.status in (tr.RUNNING, tr.PENDING)]
        if not live and tune_controller.search_alg.is_finished() and self._waiting:
            self._stop_waiting(tune_controller, trials)
        return None

    def on_trial_remove(self, tune_controller, trial):
        self._waiting.pop(trial.trial_id, None)

    def on_trial_complete(self, tune_controller, trial, result):
        self._waiting.pop(trial.trial_id, None)
        super().on_trial_complete(tune_controller, trial, result)

    def debug_string(self) -> str:
        sizes = ", ".join(f"{m:g}: {len(self._rungs[m])} ({len(self._promoted[m])} promoted)" for m in self._milestones)
        return f"ASHA with promotions, rungs {sizes}; {len(self._waiting)} waiting"

    # -- rules ----------------------------------------------------------------------------------
    def _op(self, value: float) -> float:
        return -value if self._mode == "min" else value

    def _quota(self, rung: float) -> int:
        return int(len(self._rungs[rung]) / self._rf + 1e-9)

    def _cutoff(self, rung: float) -> float | None:
        """The worst value still inside the rung's top ``floor(n / rf)`` (in the metric's own sign)."""
        k = self._quota(rung)
        if k == 0:
            return None
        return self._op(sorted(self._rungs[rung].values(), reverse=True)[k - 1])

    def _promotable(self, rung: float, tid: str) -> bool:
        # the paper's rule: in the rung's top floor(n / rf) and not promoted yet. A trial promoted
        # early may drop out of the top later, so a little more than the ideal share can leave a
        # rung, but every trial in a rung's final top share is promoted (a stopped trial is always
        # worse than the cutoff it is shown).
        k = self._quota(rung)
        if k == 0 or tid in self._promoted[rung]:
            return False
        top = sorted(self._rungs[rung], key=lambda x: -self._rungs[rung][x])[:k]
        return tid in top

    def _record(self, tid, t, rung, value, action) -> dict:
        return {"trial_id": tid, "time": t if t is not None else rung, "rung": rung, "value": float(value),
                "cutoff": self._cutoff(rung), "rung_size": len(self._rungs[rung]), "action": action}

    def _wait(self, tune_controller, tid: str, rung: float) -> None:
        self._waiting[tid] = rung
        self._limiter_paused(tune_controller).add(tid)

    def _limiter_paused(self, tune_controller) -> set:
        if self._limiter is None:
            s = getattr(getattr(tune_controller, "search_alg", None), "searcher", None)
            self._limiter = s if isinstance(getattr(s, "paused", None), set) else False
            if self._limiter:  # after a resume the limiter's saved set may be a snapshot behind
                self._limiter.paused.clear()
                self._limiter.paused.update(self._waiting)
        return self._limiter.paused if self._limiter else set()

    def _stop_waiting(self, tune_controller, trials) -> None:
        from ray.tune.utils import flatten_dict

        for tid, rung in sorted(self._waiting.items()):
            tr = trials.get(tid)
            if tr is None or tr.status != tr.PAUSED:
                continue
            self._stopped.add(tid)
            self._write(self._record(tid, None, rung, self._op(self._rungs[rung][tid]), "stop"))
            self._limiter_paused(tune_controller).discard(tid)
            # the searcher learns the trial's last result (Tune would tell it nothing for a paused trial)
            tune_controller.search_alg.on_trial_complete(tid, result=flatten_dict(tr.last_result or {}))
            tune_controller.stop_trial(tr)
        self._waiting.clear()

    # -- decisions file: the record, and the state a resumed sweep starts from -----------------
    def _write(self, rec: dict) -> None:
        with open(self._decisions_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def _replay(self) -> None:
        try:
            lines = open(self._decisions_path).read().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                d = json.loads(line)
                rung, tid, action = d.get("rung"), d["trial_id"], d["action"]
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a killed driver
            if rung not in self._rungs:
                continue
            self._rungs[rung][tid] = self._op(float(d["value"]))
            if action in ("continue", "promote"):
                self._promoted[rung].add(tid)
                self._waiting.pop(tid, None)
            elif action == "pause":
                self._waiting[tid] = rung
            elif action == "stop":
                self._stopped.add(tid)
                self._waiting.pop(tid, None)
