"""ASHA with promotions (scheduler.variant: promotion): about floor(n / rf) trials leave a rung, so
9 trials over rungs 1/3 of max_t 9 train close to the ideal 9·1 + 3·2 + 1·6 = 21 epochs (of 81); paused
trials resume from their checkpoint (no epoch twice), the best configuration runs to max_t, every
decision is written down, and the searcher keeps issuing configurations while trials wait.

Real Tune, real OptunaSearch, the shared local Ray.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("ray_session")

MAX_T = 9


def _trainable(config):
    from ray import tune

    ck = tune.get_checkpoint()
    start = 0
    if ck is not None:
        with ck.as_directory() as d:
            start = json.loads((Path(d) / "s.json").read_text())["epoch"]
    for epoch in range(start + 1, MAX_T + 1):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "s.json").write_text(json.dumps({"epoch": epoch}))
            tune.report({"epoch": epoch, "loss": config["x"] + 1.0 / epoch, "start": start},
                        checkpoint=tune.Checkpoint.from_directory(d))


def _sweep(tmp_path: Path, *, restore: bool = False):
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from sweeper.asha import PromotingASHA
    from sweeper.space import PauseAwareLimiter

    decisions = tmp_path / "decisions.jsonl"
    sched = PromotingASHA(time_attr="epoch", max_t=MAX_T, grace_period=1, reduction_factor=3,
                          decisions_path=str(decisions), metric="loss", mode="min")
    search = PauseAwareLimiter(OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0, 1)},
                                            metric="loss", mode="min",
                                            sampler=optuna.samplers.RandomSampler(seed=3)), 2)
    tuner = tune.Tuner(
        _trainable,
        tune_config=tune.TuneConfig(search_alg=search, scheduler=sched, num_samples=9, metric="loss",
                                    mode="min", reuse_actors=True),
        run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0),
    )
    return tuner.fit(), decisions


def test_promotions_train_the_ideal_schedule_and_nothing_twice(tmp_path):
    """Every sweep's schedule is checked in full. Two trials run at once, so the order in which results reach a
    rung varies from run to run, and some orders (each new arrival better than all before it) leave no waiting
    trial in a rung's top third: a correct schedule, but not the path this test is about. Such a run is
    checked and the sweep run again, at most three times in all."""
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        grid, decisions = _sweep(run)
        if _check_schedule(grid, decisions):
            return
    pytest.fail("no trial waited and was promoted, in three sweeps")


def _check_schedule(grid, decisions) -> dict:
    """Assert the schedule's invariants; returns {trial: rung} for the trials that waited and were promoted."""
    assert len(grid) == 9 and not grid.errors
    epochs, configs, final_start = {}, {}, {}
    for r in grid:
        df = r.metrics_dataframe
        eps = list(df["epoch"])
        # (Tune may drop a paused trial's earlier result lines, its "lost result history"; never repeat one)
        assert eps == sorted(set(eps)), f"an epoch ran twice or out of order: {eps}"
        epochs[r.metrics["trial_id"]] = r.metrics["epoch"]
        configs[r.metrics["trial_id"]] = r.config["x"]
        final_start[r.metrics["trial_id"]] = r.metrics["start"]
    best = min(configs, key=configs.get)
    assert epochs[best] == MAX_T, "the best configuration ran to max_t"
    recs = [json.loads(x) for x in decisions.read_text().splitlines()]
    # every trial that left a rung ("continue" on arrival, "promote" later) was, at that moment, in the top
    # floor(n / 3) of the n trials recorded at the rung so far (the paper's rule), and left it once. A trial
    # promoted early may drop out of that top later, so more than n / 3 can leave in the end (which arrival
    # orders make happen): the epochs spent are exactly what the decisions say, at least the ideal 21.
    arrived: dict[float, dict[str, float]] = {1: {}, 3: {}}
    left: dict[float, set] = {1: set(), 3: set()}
    waited: dict[str, float] = {}  # trial -> the highest rung it waited at and was promoted from
    for d in recs:
        rung, tid = d["rung"], d["trial_id"]
        if d["action"] in ("continue", "pause"):
            arrived[rung][tid] = d["value"]
        if d["action"] in ("continue", "promote"):
            k = len(arrived[rung]) // 3
            top = sorted(arrived[rung], key=arrived[rung].get)[:k]
            assert tid in top and tid not in left[rung], (d, top, sorted(left[rung]))
            left[rung].add(tid)
        if d["action"] == "promote":
            waited[tid] = max(waited.get(tid, 0), rung)
    assert sum(epochs.values()) == 9 * 1 + 2 * len(left[1]) + 6 * len(left[3]) >= 21, (epochs, left)
    # a trial that waited at a rung and was promoted resumed from that rung's checkpoint (its last
    # run started there); one that went straight on never restarted
    for t, start in final_start.items():
        assert start == waited.get(t, 0), (t, start, waited.get(t, 0))
    acts = {}
    for d in recs:
        acts.setdefault(d["trial_id"], []).append((d["rung"], d["action"]))
    stopped = [t for t, e in epochs.items() if e < MAX_T]
    for t in stopped:
        assert acts[t][-1][1] == "stop", (t, acts[t])
        stop = [d for d in recs if d["trial_id"] == t and d["action"] == "stop"][-1]
        assert stop["value"] > stop["cutoff"], stop  # min mode: it missed the cutoff
    # every trial in a rung's final top third left it
    for rung, at in arrived.items():
        top = sorted(at, key=at.get)[: len(at) // 3]
        assert top and set(top) <= left[rung], (rung, top, sorted(left[rung]))
    assert [a for a in acts[best] if a[1] == "complete"], acts[best]
    return waited


def test_a_resumed_scheduler_rebuilds_its_rungs_from_the_decisions_file(tmp_path):
    import pickle

    from sweeper.asha import PromotingASHA

    path = tmp_path / "d.jsonl"
    recs = [("a", 1, 0.5, "pause"), ("b", 1, 0.2, "continue"), ("c", 1, 0.9, "pause"),
            ("d", 1, 0.1, "pause"), ("d", 1, 0.1, "promote"), ("b", 3, 0.15, "pause")]
    path.write_text("".join(json.dumps({"trial_id": t, "rung": r, "value": v, "action": a}) + "\n"
                            for t, r, v, a in recs) + '{"trial_id": "torn", "ru')
    s = PromotingASHA(time_attr="epoch", max_t=9, grace_period=1, reduction_factor=3,
                      decisions_path=str(path), metric="loss", mode="min")
    s2 = pickle.loads(pickle.dumps(s))  # how Tune.restore brings it back (tuner.pkl)
    for sch in (s, s2):
        assert sch._rungs[1] == {"a": -0.5, "b": -0.2, "c": -0.9, "d": -0.1}
        assert sch._promoted[1] == {"b", "d"} and sch._waiting == {"a": 1, "c": 1, "b": 3}
        assert not sch._promotable(1, "a")  # 4 trials at rung 1: only the best (d) makes the top 1
        assert not sch._promotable(3, "b")  # 1 trial at rung 3: a top third of none
