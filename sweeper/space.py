"""Search space translation: manifest parameters -> Optuna distributions.

Both algorithms go through Ray Tune's ``OptunaSearch`` (``optuna``: seeded TPE; ``random``:
seeded ``RandomSampler``), so both have one translation, one seeded stream of configurations,
and a searcher whose state Tune checkpoints and restores with the experiment.
Fixed values go to Tune's ``param_space`` as constants and are merged into every config.
"""

from __future__ import annotations

import logging
from typing import Any

from .manifest import Choice, IntRange, LogUniform, Quantized, SearchSpec, Uniform

log = logging.getLogger(__name__)


def to_optuna(space: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (distributions, fixed values)."""
    import optuna.distributions as od

    dists, fixed = {}, {}
    for name, p in space.items():
        if isinstance(p, LogUniform):
            dists[name] = od.FloatDistribution(p.low, p.high, log=True)
        elif isinstance(p, Uniform):
            dists[name] = od.FloatDistribution(p.low, p.high)
        elif isinstance(p, IntRange):
            dists[name] = od.IntDistribution(p.low, p.high, log=p.log)
        elif isinstance(p, Quantized):
            # Optuna needs (high - low) to be a multiple of step; round high down to the grid
            n = int((p.high - p.low) / p.q + 1e-9)
            dists[name] = od.FloatDistribution(p.low, round(p.low + n * p.q, 12), step=p.q)
        elif isinstance(p, Choice):
            dists[name] = od.CategoricalDistribution(list(p.values))
        else:
            fixed[name] = p
    return dists, fixed


def make_searcher(search: SearchSpec, metric: str, mode: str):
    """A seeded OptunaSearch (``RetryAwareOptunaSearch``). The runner bounds its concurrency with
    ``PauseAwareLimiter``. (The metric is given here too: Tune only forwards TuneConfig's to a searcher
    that has no space of its own.)"""
    import optuna

    dists, fixed = to_optuna(search.space)
    if search.algorithm == "optuna":
        # multivariate TPE models parameter interactions; n_startup_trials random points first
        sampler = optuna.samplers.TPESampler(seed=search.seed, multivariate=True,
                                             n_startup_trials=min(10, max(2, search.num_samples // 3)))
    else:
        sampler = optuna.samplers.RandomSampler(seed=search.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not dists:  # every value fixed: Tune needs no searcher, one config repeated num_samples times
        return None, fixed
    return RetryAwareOptunaSearch(space=dists, metric=metric, mode=mode, sampler=sampler), fixed


RETRY_ATTR = "sweeper_retried_ray_trial"  # user attr of the Optuna trial that records a retried trial's result


def _optuna_base():
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class RetryAwareOptunaSearch(_optuna_base()):
    """Tune's OptunaSearch, told the result of a trial that errored and was then retried.

    When a trial errors for good, Tune tells the searcher, and Optuna records the trial as FAIL. If
    ``sweeper resume --retry-errored`` then finishes it, Tune's OptunaSearch ignores every result of the
    retry ("Received additional result ... already finished", a warning per epoch), so the sampler never
    learns the value the retried configuration reached. Here the retry's final result goes into the study
    as a new COMPLETE trial with the same parameters (an Optuna trial cannot leave FAIL), marked with the
    Tune trial's id in ``RETRY_ATTR``; its per-epoch results are passed over quietly. The study is part of
    the searcher state Tune snapshots, so a later resume keeps it."""

    def errored_before(self, trial_id: str) -> bool:
        """Whether Tune already told this searcher that the trial errored (Ray 2.60's private state; a Ray
        without it gets Tune's own behaviour)."""
        done, asked = getattr(self, "_completed_trials", ()), getattr(self, "_ot_trials", {})
        if trial_id not in done or trial_id not in asked or getattr(self, "_ot_study", None) is None:
            return False
        from optuna.trial import TrialState

        number = asked[trial_id].number
        frozen = self._ot_study.get_trials(deepcopy=False)
        return number < len(frozen) and frozen[number].state == TrialState.FAIL

    def on_trial_result(self, trial_id: str, result: dict):
        if self.errored_before(trial_id):
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if not self.errored_before(trial_id):
            return super().on_trial_complete(trial_id, result=result, error=error)
        value = (result or {}).get(self.metric) if isinstance(self.metric, str) else None
        if error or value is None or any(t.user_attrs.get(RETRY_ATTR) == trial_id
                                         for t in self._ot_study.get_trials(deepcopy=False)):
            return
        from optuna.trial import create_trial

        old = self._ot_trials[trial_id]
        try:
            self._ot_study.add_trial(create_trial(params=old.params, distributions=old.distributions,
                                                  value=value, user_attrs={RETRY_ATTR: trial_id}))
        except Exception as exc:  # noqa: BLE001 - a NaN value, say: the searcher goes on without it
            log.warning("trial %s: the searcher could not record its retried result: %s", trial_id, exc)


def _limiter_base():
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter


class PauseAwareLimiter(_limiter_base()):
    """Tune's ConcurrencyLimiter, except that trials paused by ASHA with promotions (waiting at a
    rung, holding no resources) do not count: the scheduler (``asha.PromotingASHA``) keeps the set
    ``paused`` up to date. With Tune's own limiter, ``max_concurrent`` paused trials would stop the
    searcher from ever issuing another configuration, and the sweep would stall.

    And the completion of a trial that errored and was retried (``sweeper resume --retry-errored``)
    reaches the searcher: Tune's limiter forgets a trial when it errors and drops its later completion,
    so ``RetryAwareOptunaSearch`` would never see it. Every sweep with a searcher and a concurrency
    limit goes through this limiter (runner), not only those with promotions."""

    def __init__(self, searcher, max_concurrent: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.paused: set[str] = set()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        errored_before = getattr(self.searcher, "errored_before", None)
        if trial_id not in self.live_trials and errored_before is not None and errored_before(trial_id):
            return self.searcher.on_trial_complete(trial_id, result=result, error=error)
        return super().on_trial_complete(trial_id, result=result, error=error)

    def suggest(self, trial_id: str):
        if not self._limit_concurrency:
            return self.searcher.suggest(trial_id)
        if len(self.live_trials - self.paused) >= self.max_concurrent:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, "FINISHED"):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion
