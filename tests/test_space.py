"""Space translation for every parameter kind, and seeded reproducibility of the proposals."""

from __future__ import annotations

import logging

import optuna
import optuna.distributions as od
import pytest

from sweeper.manifest import SearchSpec
from sweeper.space import make_searcher, to_optuna


def spec(space, **kw):
    return SearchSpec(space=space, **kw)


def test_every_kind_translates():
    s = spec({
        "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-1},
        "wd": {"type": "uniform", "low": 0.0, "high": 0.3},
        "layers": {"type": "int", "low": 1, "high": 6},
        "width": {"type": "int", "low": 16, "high": 256, "log": True},
        "drop": {"type": "quniform", "low": 0.0, "high": 0.25, "q": 0.1},
        "bs": {"type": "choice", "values": [8, 16, 32]},
        "pool": {"type": "choice", "values": ["mean", "last"]},
        "fixed_f": 0.5, "fixed_s": "x", "fixed_b": True,
    })
    d, fixed = to_optuna(s.space)
    assert d["lr"] == od.FloatDistribution(1e-5, 1e-1, log=True)
    assert d["wd"] == od.FloatDistribution(0.0, 0.3)
    assert d["layers"] == od.IntDistribution(1, 6)
    assert d["width"] == od.IntDistribution(16, 256, log=True)
    # high rounded down onto the q-grid: 0.0, 0.1, 0.2
    assert d["drop"].step == 0.1 and d["drop"].low == 0.0 and d["drop"].high == pytest.approx(0.2)
    assert d["bs"] == od.CategoricalDistribution([8, 16, 32])
    assert d["pool"].choices == ("mean", "last")
    assert fixed == {"fixed_f": 0.5, "fixed_s": "x", "fixed_b": True}


def _sample(s, n=20):
    d, _ = to_optuna(s.space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=s.seed))
    out = []
    for _ in range(n):
        t = study.ask(d)
        out.append(t.params)
        study.tell(t, 0.0)
    return out


def test_samples_respect_bounds_and_grid():
    s = spec({"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
              "drop": {"type": "quniform", "low": 0.0, "high": 0.3, "q": 0.05},
              "n": {"type": "int", "low": 2, "high": 4}}, seed=3)
    for p in _sample(s, 50):
        assert 1e-4 <= p["lr"] <= 1e-2
        assert abs(p["drop"] / 0.05 - round(p["drop"] / 0.05)) < 1e-6 and 0 <= p["drop"] <= 0.3
        assert p["n"] in (2, 3, 4)


def test_seeded_searcher_is_reproducible():
    s = spec({"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}, seed=11)
    assert _sample(s) == _sample(s)
    assert _sample(s) != _sample(spec(s.space and {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}, seed=12))


@pytest.mark.parametrize("algo", ["optuna", "random"])
def test_make_searcher_builds_seeded_optuna_search(algo):
    from ray.tune.search.optuna import OptunaSearch

    s = spec({"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}, "bs": 16}, algorithm=algo, max_concurrent=3)
    searcher, fixed = make_searcher(s, "val_mae", "min")
    assert isinstance(searcher, OptunaSearch)
    assert fixed == {"bs": 16}
    sampler = searcher._sampler
    assert isinstance(sampler, optuna.samplers.TPESampler if algo == "optuna" else optuna.samplers.RandomSampler)


def test_retried_trial_result_reaches_the_study_once(tmp_path):
    """A trial Tune reported as errored (Optuna: FAIL) and then finished by ``resume --retry-errored``: its final
    value enters the study as a COMPLETE trial with the same parameters, once, and survives the searcher's
    save and restore; its per-epoch results raise no warnings. A trial that did not error is unaffected."""
    from optuna.trial import TrialState

    from sweeper.space import RETRY_ATTR

    s = spec({"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}, "wd": {"type": "uniform", "low": 0, "high": 1}})
    searcher, _ = make_searcher(s, "val_mae", "min")
    a, b = searcher.suggest("a"), searcher.suggest("b")
    searcher.on_trial_result("b", {"val_mae": 0.9, "training_iteration": 1})
    searcher.on_trial_complete("b", result={"val_mae": 0.8, "training_iteration": 2})
    searcher.on_trial_complete("a", error=True)
    states = [t.state for t in searcher._ot_study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]  # a was asked first

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    ray_log = logging.getLogger("ray.tune.search.optuna.optuna_search")  # Ray's loggers do not propagate
    ray_log.addHandler(handler)
    try:
        searcher.on_trial_result("a", {"val_mae": 0.5, "training_iteration": 8})
        searcher.on_trial_complete("a", result={"val_mae": 0.4, "training_iteration": 14})
        searcher.on_trial_complete("a", result={"val_mae": 0.4, "training_iteration": 14})  # a second notice
    finally:
        ray_log.removeHandler(handler)
    assert not seen, seen

    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    again, _ = make_searcher(s, "val_mae", "min")
    again.restore(str(path))
    trials = again._ot_study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    retried = trials[2]
    assert retried.value == 0.4 and retried.params == a and retried.user_attrs == {RETRY_ATTR: "a"}
    assert trials[1].params == b and trials[1].value == 0.8
    # the next configuration is proposed from a study that holds both values
    assert again.suggest("c") is not None and len(again._ot_study.get_trials()) == 4
