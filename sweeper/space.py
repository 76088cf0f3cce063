"""Search space translation: manifest parameters -> Optuna distributions.

Both algorithms go through Ray Tune's ``OptunaSearch`` (``optuna``: seeded TPE; ``random``:
seeded ``RandomSampler``), so both have one translation, one seeded stream of configurations,
and a searcher whose state Tune checkpoints and restores with the experiment.
Fixed values go to Tune's ``param_space`` as constants and are merged into every config.
"""

from __future__ import annotations

from typing import Any

from .manifest import Choice, IntRange, LogUniform, Quantized, SearchSpec, Uniform


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
    """A seeded OptunaSearch. Concurrency comes from TuneConfig's ``max_concurrent_trials``, which
    wraps the searcher in a ConcurrencyLimiter. (The metric is given here too: Tune only forwards
    TuneConfig's to a searcher that has no space of its own.)"""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

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
    return OptunaSearch(space=dists, metric=metric, mode=mode, sampler=sampler), fixed


def _limiter_base():
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter


class PauseAwareLimiter(_limiter_base()):
    """Tune's ConcurrencyLimiter, except that trials paused by ASHA with promotions (waiting at a
    rung, holding no resources) do not count: the scheduler (``asha.PromotingASHA``) keeps the set
    ``paused`` up to date. With Tune's own limiter, ``max_concurrent`` paused trials would stop the
    searcher from ever issuing another configuration, and the sweep would stall."""

    def __init__(self, searcher, max_concurrent: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.paused: set[str] = set()

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
